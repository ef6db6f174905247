# The governance decision for flow runs in a governed work pool.
#
# This package only aggregates: every module under prefect.governance.rules
# (rules/*.rego, or a module of your own in that namespace) contributes its
# `deny` and `warn` messages, and each message is reported with the rule that
# produced it. Load only the modules you want to adopt.
#
# Input and result: policies/schema/policy-contract.schema.json and
# policies/README.md.
package prefect.governance.decision

import data.prefect.governance.rules

default allow := false

allow if count(deny) == 0

# Each deny or warn message with the rule (package and rule name) behind it.
reasons contains reason if {
	some kind in ["deny", "warn"]
	some module
	some message in rules[module][kind]
	reason := {
		"kind": kind,
		"message": message,
		"rule": sprintf("prefect.governance.rules.%s.%s", [module, kind]),
	}
}

# An input without the contract's parts is refused: rules that cannot see a run
# must not let it through just because none of them fired.
reasons contains reason if {
	some part in ["agent", "envelope", "context"]
	not has_object(part)
	reason := {
		"kind": "deny",
		"message": sprintf("the input has no %s object: it is not a governance input", [part]),
		"rule": "prefect.governance.decision.deny",
	}
}

# (A helper, not `not is_object(input[part])`: OPA leaves that undefined when the
# part is missing, while regorus makes it true.)
has_object(part) if is_object(input[part])

deny contains reason.message if {
	some reason in reasons
	reason.kind == "deny"
}

warn contains reason.message if {
	some reason in reasons
	reason.kind == "warn"
}

annotations := {
	"governance.agent": input.agent.id,
	"governance.policy": "prefect/governance/decision",
}
