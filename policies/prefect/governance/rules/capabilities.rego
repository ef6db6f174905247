# Capability allowlist: a run may only use capabilities granted to its agent.
package prefect.governance.rules.capabilities

deny contains msg if {
	some capability in input.envelope.capabilities
	not capability in input.agent.capabilities
	msg := sprintf("capability %q is not granted to agent %q", [capability, input.agent.id])
}
