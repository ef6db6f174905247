package prefect.governance.task_rules_test.capabilities

import data.prefect.governance.testing

cases := {
	"a granted capability": {"changes": {}},
	"no capabilities declared": {"changes": {"/envelope/capabilities": []}},
	"a capability the run did not ask for": {
		"changes": {"/envelope/capabilities": ["read:warehouse", "write:warehouse"]},
		"deny": ["task \"load_orders\" of agent \"etl-agent\" declares capability \"write:warehouse\", which its flow run was not granted"],
	},
	"a capability withheld from the run": {
		"changes": {
			"/envelope/capabilities": ["write:warehouse"],
			"/envelope/parent/envelope/capabilities": ["read:warehouse", "write:warehouse"],
			"/envelope/parent/grants": ["read:warehouse"],
		},
		"deny": ["task \"load_orders\" of agent \"etl-agent\" declares capability \"write:warehouse\", which its flow run was not granted"],
	},
	"every capability granted": {
		"changes": {
			"/envelope/capabilities": ["write:warehouse", "read:warehouse"],
			"/envelope/parent/grants": ["read:warehouse", "write:warehouse"],
		},
	},
	"a run granted nothing": {
		"changes": {"/envelope/parent/grants": []},
		"deny": ["task \"load_orders\" of agent \"etl-agent\" declares capability \"read:warehouse\", which its flow run was not granted"],
	},
	"a parent without grants grants nothing": {
		"changes": {"/envelope/parent": {"decision_id": "d-1"}},
		"deny": ["task \"load_orders\" of agent \"etl-agent\" declares capability \"read:warehouse\", which its flow run was not granted"],
	},
}

failures := testing.task_failures("capabilities", cases)

test_cases if count(failures) == 0
