# Trust: the score and its slope over the agent's last runs.
#
# Always: trust that fell at each of the last three runs refuses; a score below
# low_trust warns. With agent.constraints.trust: min_score and min_slope refuse.
package prefect.governance.rules.trust

import data.prefect.governance.lib.trust as helpers

# Trust below this score is allowed, with a warning.
low_trust := 0.5

deny contains msg if {
	fell := helpers.fell_across_three(input.agent.trust.window)
	msg := sprintf("trust of agent %q fell across its last three runs: %v", [input.agent.id, fell])
}

deny contains msg if {
	minimum := helpers.min_score
	input.agent.trust.score < minimum
	msg := sprintf(
		"trust of agent %q is %v, below the minimum %v",
		[input.agent.id, input.agent.trust.score, minimum],
	)
}

deny contains msg if {
	minimum := input.agent.constraints.trust.min_slope
	is_number(minimum)
	input.agent.trust.slope < minimum
	msg := sprintf(
		"trust of agent %q is falling by %v per run, faster than %v allows",
		[input.agent.id, input.agent.trust.slope, minimum],
	)
}

warn contains msg if {
	input.agent.trust.score < low_trust
	msg := sprintf(
		"trust of agent %q is low: %v (below %v)",
		[input.agent.id, input.agent.trust.score, low_trust],
	)
}
