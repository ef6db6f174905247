# Helpers for the rule modules' tests (not part of any decision).
#
# The tests of rules/<module>.rego are in package prefect.governance.rules_test.<module>
# (outside prefect.governance.rules, which the decision aggregates). Each defines `cases`: for each case, `changes` (JSON
# pointer -> value, applied to the base input) and exactly the `deny` and
# `warn` messages (and `withhold` capabilities) the module must give. `failures`
# names the cases that do not come out as expected.
#
# The task policy's modules (task_rules/<module>.rego) are tested the same way,
# in package prefect.governance.task_rules_test.<module>, with `task_failures`
# over the base task input (the `allowed` task example).
package prefect.governance.testing

# The base input every case starts from: the `allowed` example.
base := object.filter(data.examples.allowed, ["agent", "envelope", "context"])

with_values(changes) := json.patch(base, [op |
	some path, value in changes
	op := {"op": "add", "path": path, "value": value}
])

# What a module contributes: messages (deny, warn), withheld capabilities and approval requests.
kinds := ["deny", "warn", "withhold", "approval"]

# The cases of module's tests whose deny, warn or withhold sets differ from the expected.
failures(module, cases) := {name |
	some name, case in cases
	got := outcome(data.prefect.governance.rules[module]) with input as with_values(case.changes)
	got != expected(case)
}

# The sets a case expects (empty when it names none).
expected(case) := {kind: {item | some item in object.get(case, kind, [])} | some kind in kinds}

# The deny, warn and withhold sets of a rule module (empty when it has none).
outcome(rules) := {kind: {item | some item in rules[kind]} | some kind in kinds}

# Every case of every rule module's tests, as a full input: the engine parity
# suite decides each of them with both engines.
all_cases[sprintf("%s/%s", [module, name])] := with_values(case.changes) if {
	some module
	some name, case in data.prefect.governance.rules_test[module].cases
}

# --- the task policy ------------------------------------------------------------

# The base input every task case starts from: the `allowed` task example.
task_base := object.filter(data.task_examples.allowed, ["agent", "envelope", "context", "posture"])

task_with_values(changes) := json.patch(task_base, [op |
	some path, value in changes
	op := {"op": "add", "path": path, "value": value}
])

# The cases of a task rule module's tests whose deny or warn messages differ from the expected.
task_failures(module, cases) := {name |
	some name, case in cases
	got := outcome(data.prefect.governance.task_rules[module]) with input as task_with_values(case.changes)
	got != expected(case)
}

# Every case of every task rule module's tests, as a full task input (for the parity suite).
all_task_cases[sprintf("%s/%s", [module, name])] := task_with_values(case.changes) if {
	some module
	some name, case in data.prefect.governance.task_rules_test[module].cases
}
