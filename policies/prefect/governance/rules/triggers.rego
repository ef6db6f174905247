# Who or what may start a run: agent.constraints.triggers.
#
# types: allowed envelope.flow_run.created_by.type values (SCHEDULE for runs
# the scheduler made, AUTOMATION, USER, DEPLOYMENT, ...; UNKNOWN when the
# server recorded no creator). users: when a USER started the run, the allowed
# created_by.display_value values.
package prefect.governance.rules.triggers

import data.prefect.governance.lib.triggers as helpers

deny contains msg if {
	allowed := input.agent.constraints.triggers.types
	is_array(allowed)
	trigger := helpers.started_by(input.envelope.flow_run)
	not trigger in allowed
	msg := sprintf(
		"runs of agent %q may only be started by %v, not %s",
		[input.agent.id, allowed, trigger],
	)
}

deny contains msg if {
	allowed := input.agent.constraints.triggers.users
	is_array(allowed)
	helpers.started_by(input.envelope.flow_run) == "USER"
	user := object.get(input.envelope.flow_run, ["created_by", "display_value"], "")
	not user in allowed
	msg := sprintf("user %q may not start runs of agent %q", [user, input.agent.id])
}
