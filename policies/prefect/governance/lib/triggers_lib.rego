# Helpers of rules/triggers.rego.
package prefect.governance.lib.triggers

# The creator's type, or UNKNOWN when the server recorded none.
started_by(flow_run) := type if {
	type := flow_run.created_by.type
	is_string(type)
} else := "UNKNOWN"
