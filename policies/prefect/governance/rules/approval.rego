# Approval: a named approver must approve the run before it starts.
#
# agent.constraints.approval names the approvers, and how long the run may wait
# (timeout_seconds, one hour unset). An approval or a rejection counts only when
# the worker verified it (signed by the key it pins for that approver, bound to
# this run and its parameters, not expired): input.envelope.approvals and
# input.envelope.rejections. Labels and parameters approve nothing: whoever
# creates a run writes them.
#
# Not approved yet, the module asks for an approval (`approval`): the run waits,
# and is decided again. A rejection by an approver, the wait passing its timeout
# (from envelope.approval_requested_at, which the worker takes from its lineage),
# or no approvers at all, refuse it.
package prefect.governance.rules.approval

import data.prefect.governance.lib.approval as helpers

default_timeout_seconds := 3600

# The run waits for one of the approvers.
approval contains request if {
	approvers := input.agent.constraints.approval.approvers
	helpers.waiting(approvers)
	not helpers.timed_out(timeout_seconds)
	request := {
		"approvers": approvers,
		"timeout_seconds": timeout_seconds,
		"reason": sprintf(
			"run of agent %q needs a signed approval by one of %v (%s)",
			[input.agent.id, approvers, helpers.found],
		),
	}
}

deny contains msg if {
	approvers := input.agent.constraints.approval.approvers
	helpers.waiting(approvers)
	helpers.timed_out(timeout_seconds)
	msg := sprintf(
		"run of agent %q: approval timed out (awaiting since %s, %d s allowed; %s)",
		[input.agent.id, input.envelope.approval_requested_at, timeout_seconds, helpers.found],
	)
}

deny contains msg if {
	approvers := input.agent.constraints.approval.approvers
	is_array(approvers)
	by := helpers.rejected_by & {approver | some approver in approvers}
	count(by) > 0
	msg := sprintf("run of agent %q was rejected by %v", [input.agent.id, sort(by)])
}

deny contains msg if {
	approvers := input.agent.constraints.approval.approvers
	approvers == []
	msg := sprintf("run of agent %q needs a signed approval, but it names no approvers", [input.agent.id])
}

# How long the run may wait: the agent's timeout_seconds, an hour when unset (null).
timeout_seconds := seconds if {
	seconds := input.agent.constraints.approval.timeout_seconds
	is_number(seconds)
} else := default_timeout_seconds
