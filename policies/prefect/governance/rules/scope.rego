# Trust scope: the work pools, environments and tenants an agent may act in.
#
# Pools come from agent.trust_scope. Environments and tenants are read from the
# run's tags (flow run and deployment): `env:<name>` and `tenant:<name>`, and
# are only checked when agent.constraints.scope lists them.
package prefect.governance.rules.scope

deny contains msg if {
	not input.envelope.work_pool.name in input.agent.trust_scope
	msg := sprintf(
		"work pool %q is outside the trust scope of agent %q",
		[input.envelope.work_pool.name, input.agent.id],
	)
}

deny contains msg if {
	some kind, allowed in scoped
	count(tagged(kind)) == 0
	msg := sprintf(
		"run has no %s tag (%s:<name>) and agent %q may only act in %ss %v",
		[kind, prefix[kind], input.agent.id, kind, allowed],
	)
}

deny contains msg if {
	some kind, allowed in scoped
	some name in tagged(kind)
	not name in allowed
	msg := sprintf("%s %q is outside the trust scope of agent %q", [kind, name, input.agent.id])
}

prefix := {"environment": "env", "tenant": "tenant"}

# The scope kinds this agent is restricted in, with the names it may act in.
scoped[kind] := allowed if {
	some kind, field in {"environment": "environments", "tenant": "tenants"}
	allowed := input.agent.constraints.scope[field]
	is_array(allowed)
}

tags contains tag if some tag in input.envelope.flow_run.tags

tags contains tag if some tag in input.envelope.deployment.tags

tagged(kind) := {substring(tag, count(start), -1) |
	start := concat("", [prefix[kind], ":"])
	some tag in tags
	startswith(tag, start)
}
