# Trust scope: the work pools, environments and tenants an agent may act in.
#
# Pools come from agent.trust_scope. Environments and tenants are read from the
# run's tags (flow run and deployment): `env:<name>` and `tenant:<name>`, and
# are only checked when agent.constraints.scope lists them.
package prefect.governance.rules.scope

import data.prefect.governance.lib.scope as helpers

deny contains msg if {
	not input.envelope.work_pool.name in input.agent.trust_scope
	msg := sprintf(
		"work pool %q is outside the trust scope of agent %q",
		[input.envelope.work_pool.name, input.agent.id],
	)
}

deny contains msg if {
	is_object(input.agent.constraints.scope)
	some kind, allowed in helpers.scoped(input.agent.constraints.scope)
	count(helpers.tagged(kind)) == 0
	msg := sprintf(
		"run has no %s tag (%s:<name>) and agent %q may only act in %ss %v",
		[kind, helpers.prefix[kind], input.agent.id, kind, allowed],
	)
}

deny contains msg if {
	is_object(input.agent.constraints.scope)
	some kind, allowed in helpers.scoped(input.agent.constraints.scope)
	some name in helpers.tagged(kind)
	not name in allowed
	msg := sprintf("%s %q is outside the trust scope of agent %q", [kind, name, input.agent.id])
}
