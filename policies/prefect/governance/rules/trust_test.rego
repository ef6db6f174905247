package prefect.governance.rules_test.trust

import data.prefect.governance.testing

cases := {
	"steady trust": {"changes": {}},
	"trust falling across three runs": {
		"changes": {"/agent/trust/window": [0.82, 0.69, 0.59]},
		"deny": ["trust of agent \"etl-agent\" fell across its last three runs: [0.82, 0.69, 0.59]"],
	},
	"only the last three runs count": {
		"changes": {"/agent/trust/window": [0.9, 0.8, 0.85, 0.84]},
	},
	"a recovering trust": {"changes": {"/agent/trust/window": [0.9, 0.7, 0.75]}},
	"too short a window": {"changes": {"/agent/trust/window": [0.9, 0.8]}},
	"low trust warns": {
		"changes": {"/agent/trust/score": 0.2},
		"warn": ["trust of agent \"etl-agent\" is low: 0.2 (below 0.5)"],
	},
	"trust at the threshold does not warn": {"changes": {"/agent/trust/score": 0.5}},
	"below the minimum score": {
		"changes": {"/agent/constraints/trust": {"min_score": 0.95, "min_slope": null}},
		"deny": ["trust of agent \"etl-agent\" is 0.92, below the minimum 0.95"],
	},
	"falling faster than the minimum slope": {
		"changes": {"/agent/constraints/trust": {"min_slope": -0.005}},
		"deny": ["trust of agent \"etl-agent\" is falling by -0.01 per run, faster than -0.005 allows"],
	},
	"within the thresholds": {"changes": {"/agent/constraints/trust": {"min_score": 0.9, "min_slope": -0.05}}},
}

failures := testing.failures("trust", cases)

test_cases if count(failures) == 0
