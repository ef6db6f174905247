# Helpers of task_rules/capabilities.rego.
package prefect.governance.lib.task_capabilities

# The flow run was granted the capability. (A function, so that a parent without
# grants grants nothing in both engines: `not capability in <missing>` is
# undefined in OPA but true in regorus.)
granted(capability) if capability in input.envelope.parent.grants
