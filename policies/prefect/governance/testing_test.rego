# Helpers for the rule modules' tests (not part of any decision).
#
# The tests of rules/<module>.rego are in package prefect.governance.rules_test.<module>
# (outside prefect.governance.rules, which the decision aggregates). Each defines `cases`: for each case, `changes` (JSON
# pointer -> value, applied to the base input) and exactly the `deny` and
# `warn` messages the module must give. `failures` names the cases that do not
# come out as expected.
package prefect.governance.testing

# The base input every case starts from: the `allowed` example.
base := object.filter(data.examples.allowed, ["agent", "envelope", "context"])

with_values(changes) := json.patch(base, [op |
	some path, value in changes
	op := {"op": "add", "path": path, "value": value}
])

# The cases of module's tests whose deny or warn messages differ from the expected.
failures(module, cases) := {name |
	some name, case in cases
	got := outcome(module) with input as with_values(case.changes)
	got != {kind: {message | some message in object.get(case, kind, [])} | some kind in ["deny", "warn"]}
}

# The deny and warn messages of a rule module, as sets (empty when it has none).
outcome(module) := {kind: {message | some message in data.prefect.governance.rules[module][kind]} |
	some kind in ["deny", "warn"]
}

# Every case of every rule module's tests, as a full input: the engine parity
# suite decides each of them with both engines.
all_cases[sprintf("%s/%s", [module, name])] := with_values(case.changes) if {
	some module
	some name, case in data.prefect.governance.rules_test[module].cases
}
