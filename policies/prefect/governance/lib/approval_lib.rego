# Helpers of rules/approval.rego.
package prefect.governance.lib.approval

# Who approved the run, or null.
approved_by(approval) := object.get(input.envelope.parameters, approval.parameter, null) if {
	is_string(approval.parameter)
} else := object.get(input.envelope.flow_run.labels, approval.label, null)

# Where the approval is looked for.
where(approval) := sprintf("parameter %q", [approval.parameter]) if is_string(approval.parameter)

else := sprintf("label %q", [approval.label])
