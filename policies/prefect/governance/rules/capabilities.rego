# Capability allowlist: a run may only use capabilities granted to its agent.
package prefect.governance.rules.capabilities

deny contains msg if {
	some capability in input.envelope.capabilities
	not capability in input.agent.capabilities
	msg := sprintf("capability %q is not granted to agent %q", [capability, input.agent.id])
}

# A capability whose minimum trust (constraints.capability_trust) the agent's
# score is below is withheld from the run's grants: the run goes ahead without it.
withhold contains capability if {
	some capability, minimum in input.agent.constraints.capability_trust
	input.agent.trust.score < minimum
	capability in input.envelope.capabilities
}

warn contains msg if {
	some capability in withhold
	msg := sprintf(
		"capability %q is withheld from agent %q: trust %v is below its minimum %v",
		[capability, input.agent.id, input.agent.trust.score, input.agent.constraints.capability_trust[capability]],
	)
}
