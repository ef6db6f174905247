# Time windows and freeze periods, judged at input.context.time (UTC).
#
# agent.constraints.windows: when non-empty, a run must start inside one of
# them (days, and start <= HH:MM < end). agent.constraints.freezes: no run
# starts between a freeze's start (inclusive) and end (exclusive).
package prefect.governance.rules.windows

now := time.parse_rfc3339_ns(input.context.time)

day := lower(substring(time.weekday(now), 0, 3))

clock := time.clock(now)

minute := (clock[0] * 60) + clock[1]

deny contains msg if {
	count(input.agent.constraints.windows) > 0
	not in_a_window
	msg := sprintf(
		"run at %s (%s %s UTC) is outside the time windows of agent %q",
		[input.context.time, day, hhmm(minute), input.agent.id],
	)
}

deny contains msg if {
	some freeze in input.agent.constraints.freezes
	time.parse_rfc3339_ns(freeze.start) <= now
	now < time.parse_rfc3339_ns(freeze.end)
	msg := sprintf(
		"agent %q is frozen from %s until %s%s",
		[input.agent.id, freeze.start, freeze.end, because(freeze)],
	)
}

in_a_window if {
	some window in input.agent.constraints.windows
	day in window.days
	minutes(window.start) <= minute
	minute < minutes(window.end)
}

# Minutes since midnight of "HH:MM". The "1" prefix keeps a leading zero ("09")
# parseable by every engine: regorus's to_number rejects leading zeros.
minutes(text) := (two_digits(substring(text, 0, 2)) * 60) + two_digits(substring(text, 3, 2))

two_digits(text) := to_number(concat("", ["1", text])) - 100

hhmm(m) := sprintf("%02d:%02d", [floor(m / 60), m % 60])

because(freeze) := sprintf(": %s", [freeze.reason]) if freeze.reason != ""

else := ""
