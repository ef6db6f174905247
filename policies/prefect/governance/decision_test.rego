package prefect.governance.decision_test

import data.prefect.governance.decision
import data.prefect.governance.testing

# Every example in policies/examples/<name>/ (input.json + expected.json, loaded
# by OPA as data.examples[name]) is decided exactly as expected, rules included.
example_failures := {name |
	some name, example in data.examples
	got := decision with input as object.filter(example, ["agent", "envelope", "context", "exceptions"])
	not same(got, example)
}

same(got, want) if {
	got.allow == want.allow
	as_set(got.deny) == as_set(want.deny)
	as_set(got.warn) == as_set(want.warn)
	as_set(got.reasons) == as_set(want.reasons)
	got.annotations == want.annotations
	as_set(got.grants) == as_set(want.grants)
	as_set(got.approval) == as_set(object.get(want, "approval", []))
	as_set(got.waived) == as_set(object.get(want, "waived", []))
}

as_set(xs) := {x | some x in xs}

test_examples_decide_as_expected if {
	count(data.examples) > 0
	count(example_failures) == 0
}

several := testing.with_values({
	"/envelope/capabilities": ["deploy:prod"],
	"/envelope/work_pool/name": "elsewhere",
	"/agent/trust/score": 0.2,
})

test_every_module_contributes_with_its_rule if {
	reasons := decision.reasons with input as several
	reasons == {
		{
			"kind": "deny",
			"message": "capability \"deploy:prod\" is not granted to agent \"etl-agent\"",
			"rule": "prefect.governance.rules.capabilities.deny",
		},
		{
			"kind": "deny",
			"message": "work pool \"elsewhere\" is outside the trust scope of agent \"etl-agent\"",
			"rule": "prefect.governance.rules.scope.deny",
		},
		{
			"kind": "warn",
			"message": "trust of agent \"etl-agent\" is low: 0.2 (below 0.5)",
			"rule": "prefect.governance.rules.trust.warn",
		},
	}
}

test_deny_and_warn_are_the_messages_of_the_reasons if {
	count(decision.deny) == 2 with input as several
	count(decision.warn) == 1 with input as several
	not decision.allow with input as several
}

test_a_warning_alone_allows if {
	decision.allow with input as testing.with_values({"/agent/trust/score": 0.2})
}

test_a_module_of_your_own_is_aggregated if {
	reasons := decision.reasons with input as testing.base
		with data.prefect.governance.rules.custom.deny as {"no runs on a full moon"}
	reasons == {{
		"kind": "deny",
		"message": "no runs on a full moon",
		"rule": "prefect.governance.rules.custom.deny",
	}}
}

test_grants_are_the_requested_capabilities_less_the_withheld if {
	narrowed := testing.with_values({
		"/envelope/capabilities": ["read:warehouse", "write:warehouse"],
		"/agent/constraints/capability_trust": {"write:warehouse": 0.95},
	})
	decision.grants == {"read:warehouse"} with input as narrowed
	decision.allow with input as narrowed
	decision.grants == {"read:warehouse"} with input as testing.base
}

test_a_module_of_your_own_can_withhold if {
	grants := decision.grants with input as testing.base
		with data.prefect.governance.rules.custom.withhold as {"read:warehouse", "other"}
	grants == set()
}

test_annotations_name_the_agent_and_policy if {
	decision.annotations == {
		"governance.agent": "etl-agent",
		"governance.policy": "prefect/governance/decision",
	} with input as testing.base
}

test_every_rule_test_case_is_collected_for_parity if {
	count(testing.all_cases) > 40
	testing.all_cases["capabilities/no capabilities"].envelope.capabilities == []
}

# With no input at all (as the sidecar reads a request without one, or
# `{"input": null}`): refused, not allowed because no rule could fire.
test_no_input_is_refused if {
	not decision.allow
	count(decision.deny) == 3
}

test_an_input_without_the_contract_is_refused if {
	not decision.allow with input as {}
	count(decision.deny) == 3 with input as {}
	no_envelope := object.remove(testing.base, ["envelope"])
	not decision.allow with input as no_envelope
	"the input has no envelope object: it is not a governance input" in decision.deny with input as no_envelope
	decision.grants == set() with input as no_envelope
}
