package prefect.governance.decision_test

import data.prefect.governance.decision

# Every example in policies/examples/<name>/ (input.json + expected.json, loaded
# by OPA as data.examples[name]) is decided as expected. The same examples are
# run through the embedded engine and OPA by the Python parity test.
example_failures contains name if {
	some name, example in data.examples
	inp := object.filter(example, ["agent", "envelope", "context"])
	got := decision with input as inp
	not same(got, example)
}

same(got, want) if {
	got.allow == want.allow
	as_set(got.deny) == as_set(want.deny)
	as_set(got.warn) == as_set(want.warn)
	got.annotations == want.annotations
}

as_set(xs) := {x | some x in xs}

test_examples_decide_as_expected if {
	count(data.examples) > 0
	count(example_failures) == 0
}

base := data.examples.allowed

with_capabilities(caps) := json.patch(base, [{"op": "replace", "path": "/envelope/capabilities", "value": caps}])

test_granted_capability_is_allowed if {
	decision.allow with input as with_capabilities(["write:warehouse"])
}

test_missing_capability_is_denied if {
	some msg in decision.deny with input as with_capabilities(["deploy:prod"])
	contains(msg, "deploy:prod")
}

test_no_capabilities_is_allowed if {
	decision.allow with input as with_capabilities([])
}

test_pool_outside_trust_scope_is_denied if {
	inp := json.patch(base, [{"op": "replace", "path": "/envelope/work_pool/name", "value": "elsewhere"}])
	not decision.allow with input as inp
}

test_low_trust_warns_but_allows if {
	inp := json.patch(base, [{"op": "replace", "path": "/agent/trust/score", "value": 0.2}])
	decision.allow with input as inp
	count(decision.warn) == 1 with input as inp
}

test_trust_at_threshold_does_not_warn if {
	inp := json.patch(base, [{"op": "replace", "path": "/agent/trust/score", "value": 0.5}])
	count(decision.warn) == 0 with input as inp
}

test_null_constraint_fields_are_ignored if {
	inp := json.patch(base, [{"op": "replace", "path": "/agent/constraints/parameters/rows", "value": {"type": null, "required": null, "maximum": null}}])
	decision.allow with input as inp
}

test_annotations_name_the_agent if {
	decision.annotations["governance.agent"] == "etl-agent" with input as base
}
