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
}

failures := testing.failures("capabilities", cases)

test_cases if count(failures) == 0
