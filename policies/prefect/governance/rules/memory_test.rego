package prefect.governance.rules_test.memory

import data.prefect.governance.testing

new := "sha256:1111111111111111111111111111111111111111111111111111111111111111"

old := "sha256:0000000000000000000000000000000000000000000000000000000000000000"

cases := {
	"the pinned schema": {"changes": {"/envelope/memory/previous_schema_hash": old}},
	"no memory yet": {"changes": {"/envelope/memory/previous_schema_hash": null}},
	"writing under another schema": {
		"changes": {"/envelope/memory/schema_hash": new},
		"deny": [sprintf("run would write memory under schema %s, not the pinned schema %s of agent \"etl-agent\"", [new, old])],
	},
	"a schema change warns": {
		"changes": {
			"/agent/memory_schema_hash": new,
			"/envelope/memory/schema_hash": new,
			"/envelope/memory/previous_schema_hash": old,
		},
		"warn": [sprintf("agent \"etl-agent\" runs under a new memory schema (%s, was %s)", [new, old])],
	},
	"a schema change, explicitly allowed": {
		"changes": {
			"/agent/constraints/memory": {"allow_schema_change": true},
			"/agent/memory_schema_hash": new,
			"/envelope/memory/schema_hash": new,
			"/envelope/memory/previous_schema_hash": old,
		},
		"warn": [sprintf("agent \"etl-agent\" runs under a new memory schema (%s, was %s)", [new, old])],
	},
	"a schema change, not allowed": {
		"changes": {
			"/agent/constraints/memory": {"allow_schema_change": false},
			"/agent/memory_schema_hash": new,
			"/envelope/memory/schema_hash": new,
			"/envelope/memory/previous_schema_hash": old,
		},
		"deny": [sprintf("agent \"etl-agent\" may not change its memory schema (%s, was %s)", [new, old])],
	},
}

failures := testing.failures("memory", cases)

test_cases if count(failures) == 0
