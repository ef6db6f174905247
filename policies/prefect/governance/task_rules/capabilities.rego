# Task capabilities: a task may only declare capabilities its flow run was
# granted (envelope.parent.grants: what the run asked for, less what the flow
# decision withheld).
package prefect.governance.task_rules.capabilities

import data.prefect.governance.lib.task_capabilities as helpers

deny contains msg if {
	some capability in input.envelope.capabilities
	not helpers.granted(capability)
	msg := sprintf(
		"task %q of agent %q declares capability %q, which its flow run was not granted",
		[input.envelope.task.name, input.agent.id, capability],
	)
}
