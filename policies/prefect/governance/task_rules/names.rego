# Task names: a task whose name the agent's constraints.tasks.deny lists is
# refused before its body runs.
package prefect.governance.task_rules.names

deny contains msg if {
	input.envelope.task.name in input.agent.constraints.tasks.deny
	msg := sprintf(
		"task %q is refused for agent %q: its name is in constraints.tasks.deny",
		[input.envelope.task.name, input.agent.id],
	)
}
