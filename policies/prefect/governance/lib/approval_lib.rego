# Helpers of rules/approval.rego.
package prefect.governance.lib.approval

# Who approved the run: the approvers of the approvals the worker verified.
approved_by contains approval.approver if {
	some approval in object.get(input.envelope, "approvals", [])
}

# Who rejected the run: the approvers of the rejections the worker verified.
rejected_by contains rejection.approver if {
	some rejection in object.get(input.envelope, "rejections", [])
}

# Whether one of the approvers approved the run.
approved(approvers) if {
	some approver in approvers
	approver in approved_by
}

# The run needs one of these approvers, has none of their approvals and none of
# their rejections.
waiting(approvers) if {
	is_array(approvers)
	count(approvers) > 0
	not approved(approvers)
	count(rejected_by & {approver | some approver in approvers}) == 0
}

# Whether the run has waited for at least `seconds` (since its first awaiting
# decision, as the worker's lineage holds it).
timed_out(seconds) if {
	since := input.envelope.approval_requested_at
	is_string(since)
	time.parse_rfc3339_ns(input.context.time) - time.parse_rfc3339_ns(since) >= seconds * 1000000000
}

# What was found instead.
found := "no verified approval" if count(approved_by) == 0

else := sprintf("verified approvals only by %v, who are not approvers", [sort(approved_by)])
