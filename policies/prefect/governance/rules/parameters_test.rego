package prefect.governance.rules_test.parameters

import data.prefect.governance.testing

cases := {
	"parameters within their constraints": {"changes": {}},
	"an unconstrained parameter": {"changes": {"/envelope/parameters/anything": {"x": 1}}},
	"a missing required parameter": {
		"changes": {"/envelope/parameters": {"region": "eu"}},
		"deny": ["parameter \"rows\" is required"],
	},
	"a wrong type": {
		"changes": {"/envelope/parameters/region": 3},
		"deny": [
			"parameter \"region\" must be of type string",
			"parameter \"region\" must be one of [\"eu\", \"us\"]",
		],
	},
	"a float for an integer": {
		"changes": {"/envelope/parameters/rows": 2.5},
		"deny": ["parameter \"rows\" must be of type integer"],
	},
	"above the maximum": {
		"changes": {"/envelope/parameters/rows": 5000},
		"deny": ["parameter \"rows\" is 5000, above the maximum 1000"],
	},
	"below the minimum": {
		"changes": {"/envelope/parameters/rows": 0},
		"deny": ["parameter \"rows\" is 0, below the minimum 1"],
	},
	"not in the enum": {
		"changes": {"/envelope/parameters/region": "apac"},
		"deny": ["parameter \"region\" must be one of [\"eu\", \"us\"]"],
	},
	"not matching the pattern": {
		"changes": {"/envelope/parameters/table": "Orders"},
		"deny": ["parameter \"table\" does not match the pattern \"^[a-z_]+$\""],
	},
	"too long": {
		"changes": {"/envelope/parameters/table": "a_very_long_table_name"},
		"deny": ["parameter \"table\" is longer than 16"],
	},
	"an array too long": {
		"changes": {
			"/agent/constraints/parameters/ids": {"type": "array", "max_length": 2},
			"/envelope/parameters/ids": [1, 2, 3],
		},
		"deny": ["parameter \"ids\" is longer than 2"],
	},
	"every type": {"changes": {
		"/agent/constraints/parameters/flag": {"type": "boolean"},
		"/agent/constraints/parameters/ratio": {"type": "number"},
		"/agent/constraints/parameters/options": {"type": "object"},
		"/envelope/parameters/flag": true,
		"/envelope/parameters/ratio": 0.5,
		"/envelope/parameters/options": {},
	}},
	"null constraint fields are ignored": {"changes": {"/agent/constraints/parameters/rows": {"type": null, "required": null, "maximum": null}}},
}

failures := testing.failures("parameters", cases)

test_cases if count(failures) == 0
