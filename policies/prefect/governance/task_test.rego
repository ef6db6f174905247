package prefect.governance.task_test

import data.prefect.governance.task
import data.prefect.governance.testing

# Every example in policies/task_examples/<name>/ (input.json + expected.json,
# loaded by OPA as data.task_examples[name]) is decided exactly as expected.
example_failures := {name |
	some name, example in data.task_examples
	got := task with input as object.filter(example, ["agent", "envelope", "context", "posture"])
	not same(got, example)
}

same(got, want) if {
	got.allow == want.allow
	as_set(got.deny) == as_set(want.deny)
	as_set(got.warn) == as_set(want.warn)
	as_set(got.reasons) == as_set(want.reasons)
	got.annotations == want.annotations
}

as_set(xs) := {x | some x in xs}

test_task_examples_decide_as_expected if {
	count(data.task_examples) > 0
	count(example_failures) == 0
}

several := testing.task_with_values({
	"/envelope/task/name": "drop_tables",
	"/envelope/capabilities": ["write:warehouse"],
	"/envelope/memory/schema_hash": "sha256:1111111111111111111111111111111111111111111111111111111111111111",
	"/posture/window": [0.92, 0.82, 0.72],
})

test_every_task_module_contributes_with_its_rule if {
	reasons := task.reasons with input as several
	reasons == {
		{
			"kind": "deny",
			"message": "task \"drop_tables\" of agent \"etl-agent\" declares capability \"write:warehouse\", which its flow run was not granted",
			"rule": "prefect.governance.task_rules.capabilities.deny",
		},
		{
			"kind": "deny",
			"message": "task \"drop_tables\" sees memory schema sha256:1111111111111111111111111111111111111111111111111111111111111111, not the one its run started under (sha256:0000000000000000000000000000000000000000000000000000000000000000)",
			"rule": "prefect.governance.task_rules.memory.deny",
		},
		{
			"kind": "deny",
			"message": "task \"drop_tables\" is refused for agent \"etl-agent\": its name is in constraints.tasks.deny",
			"rule": "prefect.governance.task_rules.names.deny",
		},
		{
			"kind": "deny",
			"message": "trust of agent \"etl-agent\" fell across its last three tasks: [0.92, 0.82, 0.72]",
			"rule": "prefect.governance.task_rules.posture.deny",
		},
	}
	count(task.deny) == 4 with input as several
	not task.allow with input as several
}

test_a_task_module_of_your_own_is_aggregated if {
	got := task with input as testing.task_base
		with data.prefect.governance.task_rules.custom.warn as {"a slow task"}
	got.allow
	got.warn == {"a slow task"}
	got.reasons == {{
		"kind": "warn",
		"message": "a slow task",
		"rule": "prefect.governance.task_rules.custom.warn",
	}}
}

test_annotations_name_the_agent_and_task_policy if {
	task.annotations == {
		"governance.agent": "etl-agent",
		"governance.policy": "prefect/governance/task",
	} with input as testing.task_base
}

test_every_task_rule_test_case_is_collected_for_parity if {
	count(testing.all_task_cases) > 10
	testing.all_task_cases["names/a refused task"].envelope.task.name == "drop_tables"
}

# With no input at all (as the sidecar reads a request without one, or
# `{"input": null}`): refused, not allowed because no rule could fire.
test_no_input_is_refused if {
	not task.allow
	count(task.deny) == 4
}

test_an_input_without_the_contract_is_refused if {
	not task.allow with input as {}
	count(task.deny) == 4 with input as {}
	no_context := object.remove(testing.task_base, ["context"])
	task.deny == {"the input has no context object: it is not a task governance input"} with input as no_context
}

# Without the posture the task inherits, neither its trust nor the run's memory
# schema can be checked: refused (the memory rule also names the unknown schema).
test_an_input_without_a_posture_is_refused if {
	no_posture := object.remove(testing.task_base, ["posture"])
	not task.allow with input as no_posture
	task.deny == {
		"the input has no posture object: it is not a task governance input",
		"task \"load_orders\" sees memory schema sha256:0000000000000000000000000000000000000000000000000000000000000000, not the one its run started under (null)",
	} with input as no_posture
	"the input has no posture object: it is not a task governance input" in task.deny with input as json.patch(
		testing.task_base,
		[{"op": "replace", "path": "/posture", "value": [0.92]}],
	)
}

test_an_envelope_without_a_parent_is_refused if {
	orphan := json.patch(testing.task_base, [{"op": "remove", "path": "/envelope/parent"}])
	not task.allow with input as orphan
	task.deny == {
		"the task envelope has no parent object: the flow run it belongs to is unknown",
		"task \"load_orders\" of agent \"etl-agent\" declares capability \"read:warehouse\", which its flow run was not granted",
	} with input as orphan
}

test_a_flow_decision_input_is_not_a_task_input if {
	flow_input := testing.base
	"the task envelope has no parent object: the flow run it belongs to is unknown" in task.deny with input as flow_input
}
