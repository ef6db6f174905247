# Time windows and freeze periods, judged at input.context.time (UTC).
#
# agent.constraints.windows: when non-empty, a run must start inside one of
# them (days, and start <= HH:MM < end). agent.constraints.freezes: no run
# starts between a freeze's start (inclusive) and end (exclusive).
package prefect.governance.rules.windows

import data.prefect.governance.lib.windows as helpers

deny contains msg if {
	count(input.agent.constraints.windows) > 0
	now := time.parse_rfc3339_ns(input.context.time)
	not helpers.in_a_window(now)
	msg := sprintf(
		"run at %s (%s %s UTC) is outside the time windows of agent %q",
		[input.context.time, helpers.day(now), helpers.hhmm(helpers.minute(now)), input.agent.id],
	)
}

deny contains msg if {
	some freeze in input.agent.constraints.freezes
	now := time.parse_rfc3339_ns(input.context.time)
	time.parse_rfc3339_ns(freeze.start) <= now
	now < time.parse_rfc3339_ns(freeze.end)
	msg := sprintf(
		"agent %q is frozen from %s until %s%s",
		[input.agent.id, freeze.start, freeze.end, helpers.because(freeze)],
	)
}
