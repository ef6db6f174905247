package prefect.governance.rules_test.scope

import data.prefect.governance.testing

cases := {
	"a pool in scope": {"changes": {}},
	"a pool outside scope": {
		"changes": {"/envelope/work_pool/name": "elsewhere"},
		"deny": ["work pool \"elsewhere\" is outside the trust scope of agent \"etl-agent\""],
	},
	"environment tags are ignored without a scope": {"changes": {"/envelope/flow_run/tags": ["env:prod"]}},
	"an environment in scope (deployment tag)": {"changes": {
		"/agent/constraints/scope": {"environments": ["staging", "prod"]},
		"/envelope/deployment/tags": ["env:prod"],
	}},
	"an environment outside scope": {
		"changes": {
			"/agent/constraints/scope": {"environments": ["staging"]},
			"/envelope/flow_run/tags": ["env:prod"],
		},
		"deny": ["environment \"prod\" is outside the trust scope of agent \"etl-agent\""],
	},
	"no environment tag": {
		"changes": {"/agent/constraints/scope": {"environments": ["staging"], "tenants": null}},
		"deny": ["run has no environment tag (env:<name>) and agent \"etl-agent\" may only act in environments [\"staging\"]"],
	},
	"a tenant in scope": {"changes": {
		"/agent/constraints/scope": {"tenants": ["acme"]},
		"/envelope/flow_run/tags": ["tenant:acme", "nightly"],
	}},
	"a tenant outside scope and no tenant": {
		"changes": {
			"/agent/constraints/scope": {"tenants": ["acme"], "environments": ["prod"]},
			"/envelope/flow_run/tags": ["tenant:globex"],
		},
		"deny": [
			"tenant \"globex\" is outside the trust scope of agent \"etl-agent\"",
			"run has no environment tag (env:<name>) and agent \"etl-agent\" may only act in environments [\"prod\"]",
		],
	},
}

failures := testing.failures("scope", cases)

test_cases if count(failures) == 0
