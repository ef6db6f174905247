# Approval: a named approver must have approved the run.
#
# agent.constraints.approval names the approvers and where the approval is:
# a flow-run label (default `governance.approved_by`) or, when `parameter` is
# set, that flow-run parameter.
package prefect.governance.rules.approval

approval := input.agent.constraints.approval

# Who approved the run, or null.
approved_by := object.get(input.envelope.parameters, approval.parameter, null) if {
	is_string(approval.parameter)
} else := object.get(input.envelope.flow_run.labels, approval.label, null)

where := sprintf("parameter %q", [approval.parameter]) if is_string(approval.parameter)

else := sprintf("label %q", [approval.label])

deny contains msg if {
	is_array(approval.approvers)
	approved_by == null
	msg := sprintf(
		"run of agent %q needs approval by one of %v (%s)",
		[input.agent.id, approval.approvers, where],
	)
}

deny contains msg if {
	is_array(approval.approvers)
	approved_by != null
	not approved_by in approval.approvers
	msg := sprintf(
		"%v is not an approver for agent %q (approvers: %v)",
		[approved_by, input.agent.id, approval.approvers],
	)
}
