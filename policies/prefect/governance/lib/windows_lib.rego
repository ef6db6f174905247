# Helpers of rules/windows.rego: times are nanoseconds since the epoch, UTC.
package prefect.governance.lib.windows

# The time is inside one of the agent's windows.
in_a_window(now) if {
	some window in input.agent.constraints.windows
	day(now) in window.days
	minutes(window.start) <= minute(now)
	minute(now) < minutes(window.end)
}

# The weekday ("mon") and the minutes since midnight of a time.
day(now) := lower(substring(time.weekday(now), 0, 3))

minute(now) := (clock[0] * 60) + clock[1] if clock := time.clock(now)

# Minutes since midnight of "HH:MM". The "1" prefix keeps a leading zero ("09")
# parseable by every engine: regorus's to_number rejects leading zeros.
minutes(text) := (two_digits(substring(text, 0, 2)) * 60) + two_digits(substring(text, 3, 2))

two_digits(text) := to_number(concat("", ["1", text])) - 100

hhmm(m) := sprintf("%02d:%02d", [floor(m / 60), m % 60])

# ": <reason>" for a freeze with a reason.
because(freeze) := sprintf(": %s", [freeze.reason]) if freeze.reason != ""

else := ""
