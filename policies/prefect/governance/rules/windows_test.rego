package prefect.governance.rules_test.windows

import data.prefect.governance.testing

# The base input's time is Tuesday 2026-11-24T12:00:00Z.
cases := {
	"no windows or freezes": {"changes": {}},
	"inside a weekday window": {"changes": {"/agent/constraints/windows": [{"days": ["mon", "tue", "wed", "thu", "fri"], "start": "09:00", "end": "17:00"}]}},
	"inside the second of two windows": {"changes": {"/agent/constraints/windows": [
		{"days": ["sat", "sun"], "start": "00:00", "end": "24:00"},
		{"days": ["tue"], "start": "12:00", "end": "12:01"},
	]}},
	"after the window closes": {
		"changes": {"/agent/constraints/windows": [{"days": ["tue"], "start": "09:00", "end": "12:00"}]},
		"deny": ["run at 2026-11-24T12:00:00Z (tue 12:00 UTC) is outside the time windows of agent \"etl-agent\""],
	},
	"on the wrong day, with fractional seconds": {
		"changes": {
			"/agent/constraints/windows": [{"days": ["sat", "sun"], "start": "00:00", "end": "24:00"}],
			"/context/time": "2026-11-24T07:05:59.250Z",
		},
		"deny": ["run at 2026-11-24T07:05:59.250Z (tue 07:05 UTC) is outside the time windows of agent \"etl-agent\""],
	},
	"inside a freeze": {
		"changes": {"/agent/constraints/freezes": [{"start": "2026-11-20T00:00:00Z", "end": "2026-11-27T00:00:00Z", "reason": "quarter close"}]},
		"deny": ["agent \"etl-agent\" is frozen from 2026-11-20T00:00:00Z until 2026-11-27T00:00:00Z: quarter close"],
	},
	"a freeze starting now, without a reason": {
		"changes": {"/agent/constraints/freezes": [{"start": "2026-11-24T12:00:00Z", "end": "2026-11-24T13:00:00Z", "reason": ""}]},
		"deny": ["agent \"etl-agent\" is frozen from 2026-11-24T12:00:00Z until 2026-11-24T13:00:00Z"],
	},
	"a freeze that ended now": {"changes": {"/agent/constraints/freezes": [{"start": "2026-11-24T11:00:00Z", "end": "2026-11-24T12:00:00Z", "reason": ""}]}},
	"a freeze with another zone": {
		"changes": {"/agent/constraints/freezes": [{"start": "2026-11-24T13:30:00+02:00", "end": "2026-11-24T15:00:00+02:00", "reason": "release"}]},
		"deny": ["agent \"etl-agent\" is frozen from 2026-11-24T13:30:00+02:00 until 2026-11-24T15:00:00+02:00: release"],
	},
}

failures := testing.failures("windows", cases)

test_cases if count(failures) == 0
