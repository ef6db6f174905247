package prefect.governance.rules_test.capabilities

import data.prefect.governance.testing

cases := {
	"a granted capability": {"changes": {"/envelope/capabilities": ["write:warehouse"]}},
	"no capabilities": {"changes": {"/envelope/capabilities": []}},
	"an ungranted capability": {
		"changes": {"/envelope/capabilities": ["read:warehouse", "deploy:prod"]},
		"deny": ["capability \"deploy:prod\" is not granted to agent \"etl-agent\""],
	},
	"two ungranted capabilities": {
		"changes": {"/envelope/capabilities": ["a", "b"]},
		"deny": [
			"capability \"a\" is not granted to agent \"etl-agent\"",
			"capability \"b\" is not granted to agent \"etl-agent\"",
		],
	},
	"a capability below its minimum trust is withheld": {
		"changes": {
			"/envelope/capabilities": ["read:warehouse", "write:warehouse"],
			"/agent/constraints/capability_trust": {"write:warehouse": 0.95},
		},
		"withhold": ["write:warehouse"],
		"warn": ["capability \"write:warehouse\" is withheld from agent \"etl-agent\": trust 0.92 is below its minimum 0.95"],
	},
	"a capability at its minimum trust is kept": {"changes": {
		"/envelope/capabilities": ["write:warehouse"],
		"/agent/constraints/capability_trust": {"write:warehouse": 0.92},
	}},
	"a minimum for a capability the run does not ask for": {"changes": {"/agent/constraints/capability_trust": {"write:warehouse": 0.95}}},
	"two capabilities withheld": {
		"changes": {
			"/envelope/capabilities": ["read:warehouse", "write:warehouse"],
			"/agent/trust/score": 0.6,
			"/agent/constraints/capability_trust": {"read:warehouse": 0.7, "write:warehouse": 0.8},
		},
		"withhold": ["read:warehouse", "write:warehouse"],
		"warn": [
			"capability \"read:warehouse\" is withheld from agent \"etl-agent\": trust 0.6 is below its minimum 0.7",
			"capability \"write:warehouse\" is withheld from agent \"etl-agent\": trust 0.6 is below its minimum 0.8",
		],
	},
	"an ungranted capability below its minimum is refused and withheld": {
		"changes": {
			"/envelope/capabilities": ["deploy:prod"],
			"/agent/constraints/capability_trust": {"deploy:prod": 1},
		},
		"deny": ["capability \"deploy:prod\" is not granted to agent \"etl-agent\""],
		"withhold": ["deploy:prod"],
		"warn": ["capability \"deploy:prod\" is withheld from agent \"etl-agent\": trust 0.92 is below its minimum 1"],
	},
}

failures := testing.failures("capabilities", cases)

test_cases if count(failures) == 0
