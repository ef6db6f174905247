# Approval: a named approver must have approved the run.
#
# agent.constraints.approval names the approvers. An approval counts only when
# the worker verified it (signed by the key it pins for that approver, bound to
# this run and its parameters, not expired): those are input.envelope.approvals.
# Labels and parameters approve nothing: whoever creates a run writes them.
package prefect.governance.rules.approval

import data.prefect.governance.lib.approval as helpers

deny contains msg if {
	approval := input.agent.constraints.approval
	is_array(approval.approvers)
	not helpers.approved(approval.approvers)
	msg := sprintf(
		"run of agent %q needs a signed approval by one of %v (%s)",
		[input.agent.id, approval.approvers, helpers.found],
	)
}
