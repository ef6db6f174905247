# The governance decision for one task inside an allowed flow run.
#
# Before each Prefect task of a governed run starts (context.purpose "admit"),
# and when a task ended with a memory proposal, before it applies ("commit"),
# the run's process asks this package (the grant's task policy path, default
# prefect/governance/task) with the task's envelope, which carries the flow
# run's signed envelope and the capabilities its decision granted
# (envelope.parent), and the posture the task inherits from the run's ended
# tasks (posture: trust over the last k tasks, the run's memory).
#
# Like decision.rego, this package only aggregates: every module under
# prefect.governance.task_rules (task_rules/*.rego, or a module of your own in
# that namespace) contributes its `deny` and `warn` messages, and each message
# is reported with the rule that produced it.
#
# Input and result: policies/schema/policy-contract.schema.json (task_input,
# task_result) and policies/README.md ("The task policy").
package prefect.governance.task

import data.prefect.governance.task_rules

allow := count(deny) == 0

# Each deny and warn message with the rule (package and rule name) behind it;
# only each module's deny and warn are evaluated (see decision.rego).
reasons contains reason if {
	some kind in ["deny", "warn"]
	some message in task_rules[module][kind]
	reason := {"kind": kind, "message": message, "rule": sprintf("prefect.governance.task_rules.%s.%s", [module, kind])}
}

# An input without the contract's parts is refused: rules that cannot see a task
# (the run it belongs to, or the posture it inherits) must not let it through
# because none of them fired.
reasons contains reason if {
	not well_formed
	some part in ["agent", "envelope", "context", "posture"]
	not input_has(part)
	reason := {
		"kind": "deny",
		"message": sprintf("the input has no %s object: it is not a task governance input", [part]),
		"rule": "prefect.governance.task.deny",
	}
}

reasons contains reason if {
	not well_formed
	input_has("envelope")
	not has_object(input.envelope, "parent")
	reason := {
		"kind": "deny",
		"message": "the task envelope has no parent object: the flow run it belongs to is unknown",
		"rule": "prefect.governance.task.deny",
	}
}

# All the parts are there: the usual case, which skips the part-by-part checks.
well_formed if {
	is_object(input.agent)
	is_object(input.envelope)
	is_object(input.context)
	is_object(input.posture)
	is_object(input.envelope.parent)
}

# Helpers, not `not is_object(document[key])`: that is undefined when the key is
# missing. `input_has` reads the input itself, so that no input at all is refused
# too: with `input` as an argument, the call (and so its `not`) would be undefined.
input_has(part) if is_object(input[part])

has_object(document, key) if is_object(document[key])

deny := {reason.message | some reason in reasons; reason.kind == "deny"}

warn := {reason.message | some reason in reasons; reason.kind == "warn"}

annotations := {
	"governance.agent": input.agent.id,
	"governance.policy": "prefect/governance/task",
}
