package prefect.governance.rules_test.triggers

import data.prefect.governance.testing

cases := {
	"no trigger rules": {"changes": {"/envelope/flow_run/created_by": null}},
	"a schedule, allowed": {"changes": {"/agent/constraints/triggers": {"types": ["SCHEDULE"]}}},
	"a schedule, not allowed": {
		"changes": {"/agent/constraints/triggers": {"types": ["AUTOMATION", "USER"]}},
		"deny": ["runs of agent \"etl-agent\" may only be started by [\"AUTOMATION\", \"USER\"], not SCHEDULE"],
	},
	"no recorded creator": {
		"changes": {
			"/agent/constraints/triggers": {"types": ["SCHEDULE"]},
			"/envelope/flow_run/created_by": null,
		},
		"deny": ["runs of agent \"etl-agent\" may only be started by [\"SCHEDULE\"], not UNKNOWN"],
	},
	"a named user, allowed": {"changes": {
		"/agent/constraints/triggers": {"types": ["USER"], "users": ["alice"]},
		"/envelope/flow_run/created_by": {"type": "USER", "display_value": "alice", "id": null},
	}},
	"another user": {
		"changes": {
			"/agent/constraints/triggers": {"types": null, "users": ["alice"]},
			"/envelope/flow_run/created_by": {"type": "USER", "display_value": "mallory", "id": null},
		},
		"deny": ["user \"mallory\" may not start runs of agent \"etl-agent\""],
	},
	"users only restrict runs users start": {"changes": {"/agent/constraints/triggers": {"types": ["SCHEDULE", "USER"], "users": ["alice"]}}},
}

failures := testing.failures("triggers", cases)

test_cases if count(failures) == 0
