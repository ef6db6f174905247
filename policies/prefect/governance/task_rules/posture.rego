# Task posture: the trust the task inherits from the run's ended tasks
# (input.posture). Asked before the task's body runs (context.purpose "admit"),
# not when it commits memory.
#
# Trust that fell across the run's last three tasks refuses (as the flow decision
# refuses trust that fell across the last three runs); with
# agent.constraints.trust.min_score, trust that fell below it refuses.
package prefect.governance.task_rules.posture

import data.prefect.governance.lib.task
import data.prefect.governance.lib.trust as helpers

deny contains msg if {
	task.admit
	fell := helpers.fell_across_three(input.posture.window)
	msg := sprintf("trust of agent %q fell across its last three tasks: %v", [input.agent.id, fell])
}

deny contains msg if {
	task.admit
	minimum := helpers.min_score
	input.posture.score < minimum
	msg := sprintf(
		"trust of agent %q fell to %v during this run, below the minimum %v",
		[input.agent.id, input.posture.score, minimum],
	)
}
