package prefect.governance.task_rules_test.names

import data.prefect.governance.testing

cases := {
	"a task not named": {"changes": {}},
	"a refused task": {
		"changes": {"/envelope/task/name": "drop_tables"},
		"deny": ["task \"drop_tables\" is refused for agent \"etl-agent\": its name is in constraints.tasks.deny"],
	},
	"names match exactly": {"changes": {"/envelope/task/name": "drop_tables_staging"}},
	"no task constraints": {"changes": {
		"/agent/constraints/tasks": null,
		"/envelope/task/name": "drop_tables",
	}},
	"an empty deny list": {"changes": {
		"/agent/constraints/tasks": {"deny": []},
		"/envelope/task/name": "drop_tables",
	}},
	"one of several names": {
		"changes": {
			"/agent/constraints/tasks": {"deny": ["vacuum", "drop_tables"]},
			"/envelope/task/name": "vacuum",
		},
		"deny": ["task \"vacuum\" is refused for agent \"etl-agent\": its name is in constraints.tasks.deny"],
	},
}

failures := testing.task_failures("names", cases)

test_cases if count(failures) == 0
