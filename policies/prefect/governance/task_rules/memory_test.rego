package prefect.governance.task_rules_test.memory

import data.prefect.governance.testing

# The base task: admit, declares no memory writes, sees the run's schema (sha256:0...0).
other := "sha256:1111111111111111111111111111111111111111111111111111111111111111"

cases := {
	"an admit under the run's schema": {"changes": {}},
	"a commit of declared fields": {"changes": {
		"/context/purpose": "commit",
		"/envelope/memory/writes": ["last_loaded_rows", "watermark"],
		"/envelope/memory/proposed": ["last_loaded_rows"],
	}},
	"a field outside the declaration": {
		"changes": {
			"/context/purpose": "commit",
			"/envelope/memory/writes": ["last_loaded_rows"],
			"/envelope/memory/proposed": ["last_loaded_rows", "watermark"],
		},
		"deny": ["task \"load_orders\" may not write memory field \"watermark\": its declaration names only [\"last_loaded_rows\"]"],
	},
	"each undeclared field is named": {
		"changes": {"/context/purpose": "commit", "/envelope/memory/proposed": ["a", "b"]},
		"deny": [
			"task \"load_orders\" may not write memory field \"a\": its declaration names only []",
			"task \"load_orders\" may not write memory field \"b\": its declaration names only []",
		],
	},
	"writes that are not a list declare nothing": {
		"changes": {
			"/context/purpose": "commit",
			"/envelope/memory/writes": "watermark",
			"/envelope/memory/proposed": ["watermark"],
		},
		"deny": ["task \"load_orders\" may not write memory field \"watermark\": its declaration names only []"],
	},
	"an empty proposal": {"changes": {"/context/purpose": "commit", "/envelope/memory/proposed": []}},
	"a commit without the proposal's fields": {
		"changes": {"/context/purpose": "commit"},
		"deny": ["task \"load_orders\" commits a memory proposal without the fields it writes (envelope.memory.proposed is not an array)"],
	},
	"proposed fields that are not a list": {
		"changes": {
			"/context/purpose": "commit",
			"/envelope/memory/writes": ["watermark"],
			"/envelope/memory/proposed": "watermark",
		},
		"deny": ["task \"load_orders\" commits a memory proposal without the fields it writes (envelope.memory.proposed is not an array)"],
	},
	"fields are checked on commit only": {"changes": {"/envelope/memory/proposed": ["watermark"]}},
	"a schema other than the run's": {
		"changes": {"/envelope/memory/schema_hash": other},
		"deny": ["task \"load_orders\" sees memory schema sha256:1111111111111111111111111111111111111111111111111111111111111111, not the one its run started under (sha256:0000000000000000000000000000000000000000000000000000000000000000)"],
	},
	"a schema other than the run's on commit": {
		"changes": {
			"/context/purpose": "commit",
			"/envelope/memory/proposed": [],
			"/envelope/memory/schema_hash": other,
		},
		"deny": ["task \"load_orders\" sees memory schema sha256:1111111111111111111111111111111111111111111111111111111111111111, not the one its run started under (sha256:0000000000000000000000000000000000000000000000000000000000000000)"],
	},
	"a task that sees no schema": {
		"changes": {"/envelope/memory": {"writes": []}},
		"deny": ["task \"load_orders\" sees memory schema null, not the one its run started under (sha256:0000000000000000000000000000000000000000000000000000000000000000)"],
	},
	"a posture without the run's schema": {
		"changes": {"/posture": {"score": 0.92, "window": [0.9, 0.93, 0.92]}},
		"deny": ["task \"load_orders\" sees memory schema sha256:0000000000000000000000000000000000000000000000000000000000000000, not the one its run started under (null)"],
	},
	"a run and a task without a schema": {"changes": {
		"/envelope/memory/schema_hash": null,
		"/posture/schema_hash": null,
	}},
	"the agent's pinned schema is the flow decision's concern": {"changes": {"/agent/memory_schema_hash": other}},
}

failures := testing.task_failures("memory", cases)

test_cases if count(failures) == 0
