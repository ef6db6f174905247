# Helpers of rules/approval.rego.
package prefect.governance.lib.approval

# Who approved the run: the approvers of the approvals the worker verified.
approved_by contains approval.approver if {
	some approval in object.get(input.envelope, "approvals", [])
}

# Whether one of the approvers approved the run.
approved(approvers) if {
	some approver in approvers
	approver in approved_by
}

# What was found instead.
found := "no verified approval" if count(approved_by) == 0

else := sprintf("verified approvals only by %v, who are not approvers", [sort(approved_by)])
