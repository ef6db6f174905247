# Helpers of rules/trust.rego (trust over the agent's last runs) and
# task_rules/posture.rego (over the run's last tasks).
package prefect.governance.lib.trust

# The last three scores of a window (oldest first), when each fell below the one before.
fell_across_three(window) := array.slice(window, n - 3, n) if {
	n := count(window)
	n >= 3
	window[n - 3] > window[n - 2]
	window[n - 2] > window[n - 1]
}

# The agent's minimum trust score (constraints.trust.min_score), when it sets one.
min_score := minimum if {
	minimum := input.agent.constraints.trust.min_score
	is_number(minimum)
}
