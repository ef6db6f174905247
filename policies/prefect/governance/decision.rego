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
reasons := denied | warned

denied contains {"kind": "deny", "message": message, "rule": sprintf("prefect.governance.rules.%s.deny", [module])} if {
	some module
	some message in rules[module].deny
}

warned contains {"kind": "warn", "message": message, "rule": sprintf("prefect.governance.rules.%s.warn", [module])} if {
	some module
	some message in rules[module].warn
}

# An input without the contract's parts is refused: rules that cannot see a run
# must not let it through just because none of them fired.
denied contains reason if {
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

deny := {reason.message | some reason in denied}

warn := {reason.message | some reason in warned}

annotations := {
	"governance.agent": input.agent.id,
	"governance.policy": "prefect/governance/decision",
}
