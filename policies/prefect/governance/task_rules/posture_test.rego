package prefect.governance.task_rules_test.posture

import data.prefect.governance.testing

# The base task's posture: score 0.92, window [0.9, 0.93, 0.92], purpose admit.
commit := {"/context/purpose": "commit", "/envelope/memory/proposed": []}

cases := {
	"steady trust": {"changes": {}},
	"trust falling across three tasks": {
		"changes": {"/posture/window": [0.92, 0.82, 0.72], "/posture/score": 0.72},
		"deny": ["trust of agent \"etl-agent\" fell across its last three tasks: [0.92, 0.82, 0.72]"],
	},
	"four falling tasks name the last three": {
		"changes": {"/posture/window": [0.95, 0.9, 0.85, 0.8]},
		"deny": ["trust of agent \"etl-agent\" fell across its last three tasks: [0.9, 0.85, 0.8]"],
	},
	"only the last three tasks count": {"changes": {"/posture/window": [0.95, 0.9, 0.85, 0.86]}},
	"a recovering trust": {"changes": {"/posture/window": [0.9, 0.7, 0.75]}},
	"an equal score is no fall": {"changes": {"/posture/window": [0.9, 0.9, 0.8]}},
	"too short a window": {"changes": {"/posture/window": [0.9, 0.8]}},
	"the run's trust, not the agent's at the start": {"changes": {"/agent/trust/window": [0.9, 0.8, 0.7]}},
	"any purpose but commit is an admit": {
		"changes": {"/posture/window": [0.92, 0.82, 0.72], "/context/purpose": null},
		"deny": ["trust of agent \"etl-agent\" fell across its last three tasks: [0.92, 0.82, 0.72]"],
	},
	"falling trust does not refuse a commit": {"changes": object.union(commit, {"/posture/window": [0.92, 0.82, 0.72]})},
	"below the minimum task trust": {
		"changes": {"/agent/constraints/trust": {"min_score": 0.8, "min_slope": null}, "/posture/score": 0.79},
		"deny": ["trust of agent \"etl-agent\" fell to 0.79 during this run, below the minimum 0.8"],
	},
	"at the minimum": {"changes": {"/agent/constraints/trust": {"min_score": 0.8}, "/posture/score": 0.8}},
	"the task's score, not the agent's at the start": {"changes": {
		"/agent/constraints/trust": {"min_score": 0.8},
		"/agent/trust/score": 0.5,
	}},
	"no minimum": {"changes": {"/posture/score": 0.1}},
	"a minimum that is not a number": {"changes": {"/agent/constraints/trust": {"min_score": "0.8"}, "/posture/score": 0.1}},
	"the minimum does not refuse a commit": {"changes": object.union(commit, {
		"/agent/constraints/trust": {"min_score": 0.8},
		"/posture/score": 0.79,
	})},
	"both at once": {
		"changes": {
			"/agent/constraints/trust": {"min_score": 0.8},
			"/posture/window": [0.92, 0.82, 0.72],
			"/posture/score": 0.72,
		},
		"deny": [
			"trust of agent \"etl-agent\" fell across its last three tasks: [0.92, 0.82, 0.72]",
			"trust of agent \"etl-agent\" fell to 0.72 during this run, below the minimum 0.8",
		],
	},
}

failures := testing.task_failures("posture", cases)

test_cases if count(failures) == 0
