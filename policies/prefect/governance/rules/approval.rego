# Approval: a named approver must have approved the run.
#
# agent.constraints.approval names the approvers and where the approval is:
# a flow-run label (default `governance.approved_by`) or, when `parameter` is
# set, that flow-run parameter.
package prefect.governance.rules.approval

import data.prefect.governance.lib.approval as helpers

deny contains msg if {
	approval := input.agent.constraints.approval
	is_array(approval.approvers)
	helpers.approved_by(approval) == null
	msg := sprintf(
		"run of agent %q needs approval by one of %v (%s)",
		[input.agent.id, approval.approvers, helpers.where(approval)],
	)
}

deny contains msg if {
	approval := input.agent.constraints.approval
	is_array(approval.approvers)
	approver := helpers.approved_by(approval)
	approver != null
	not approver in approval.approvers
	msg := sprintf(
		"%v is not an approver for agent %q (approvers: %v)",
		[approver, input.agent.id, approval.approvers],
	)
}
