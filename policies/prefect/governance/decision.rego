# The governance decision for flow runs in a governed work pool.
#
# This package only aggregates: every module under prefect.governance.rules
# (rules/*.rego, or a module of your own in that namespace) contributes its
# `deny` and `warn` messages, and each message is reported with the rule that
# produced it; a module may also `withhold` capabilities, which narrows the
# run's `grants`. Load only the modules you want to adopt.
#
# A rule module's deny that an active signed exception (input.exceptions) covers is
# not a deny: it is reported in `waived`, with the exception that waived it. The
# aggregator's own deny (a malformed input) is never waived.
#
# Input and result: policies/schema/policy-contract.schema.json and
# policies/README.md.
package prefect.governance.decision

import data.prefect.governance.lib.exceptions
import data.prefect.governance.rules

allow := (count(deny) + count(approval)) == 0

# Each deny and warn message with the rule (package and rule name) behind it.
# `rules[module][kind]` evaluates only each module's deny and warn (and what they
# use), never a module's whole document: half the decision's time, measured.
given contains reason if {
	some kind in ["deny", "warn"]
	some message in rules[module][kind]
	reason := {"kind": kind, "message": message, "rule": sprintf("prefect.governance.rules.%s.%s", [module, kind])}
}

reasons contains reason if {
	some reason in given
	not waived_reason(reason)
}

# Each rule module's deny an active exception covers, and the exception that waived it.
waived contains waiver if {
	some reason in given
	reason.kind == "deny"
	some exception in exceptions.active
	exceptions.covers(exception, reason)
	waiver := {"exception": exception.name, "rule": reason.rule, "message": reason.message}
}

waived_reason(reason) if {
	some waiver in waived
	waiver.rule == reason.rule
	waiver.message == reason.message
}

# An expired exception waives nothing; it warns where it would have waived a deny.
reasons contains reason if {
	some denied in given
	denied.kind == "deny"
	some exception in exceptions.expired
	exceptions.covers(exception, denied)
	reason := {
		"kind": "warn",
		"message": sprintf("exception %q expired at %s: it no longer waives %s (%s)", [exception.name, exception.expires_at, denied.rule, exception.ticket]),
		"rule": "prefect.governance.decision.warn",
	}
}

# An input without the contract's parts is refused: rules that cannot see a run
# must not let it through just because none of them fired.
reasons contains reason if {
	not well_formed
	some part in ["agent", "envelope", "context"]
	not has_object(part)
	reason := {
		"kind": "deny",
		"message": sprintf("the input has no %s object: it is not a governance input", [part]),
		"rule": "prefect.governance.decision.deny",
	}
}

# All three parts are there: the usual case, which skips the part-by-part check.
well_formed if {
	is_object(input.agent)
	is_object(input.envelope)
	is_object(input.context)
}

# (A helper: `not is_object(input[part])` is undefined when the part is missing.)
has_object(part) if is_object(input[part])

# Approvals the run waits for: each module's `approval` requests (who may approve,
# for how long, why), with the rule behind each. While one is here and nothing is
# denied, the run waits (verdict awaiting_approval) and is decided again.
approval contains object.union(request, {"rule": sprintf("prefect.governance.rules.%s.approval", [module])}) if {
	some request in rules[module].approval
}

deny := {reason.message | some reason in reasons; reason.kind == "deny"}

warn := {reason.message | some reason in reasons; reason.kind == "warn"}

# The capabilities the run may use: those it asked for (envelope.capabilities),
# less every capability a rule module withholds in its `withhold` set. Withholding
# narrows the run, it does not refuse it; say why in a warn message of the module.
grants := {capability | some capability in input.envelope.capabilities} - {capability |
	some capability in rules[_].withhold
}

annotations := {
	"governance.agent": input.agent.id,
	"governance.policy": "prefect/governance/decision",
}
