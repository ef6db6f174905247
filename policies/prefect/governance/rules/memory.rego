# Memory schema continuity.
#
# A run may not write memory under a schema other than the agent's pinned one
# (agent.memory_schema_hash). A run that changes the schema (the committed
# memory was written under another one) warns, and refuses when the agent's
# constraints.memory sets allow_schema_change to false.
package prefect.governance.rules.memory

deny contains msg if {
	proposed := input.envelope.memory.schema_hash
	is_string(proposed)
	proposed != input.agent.memory_schema_hash
	msg := sprintf(
		"run would write memory under schema %s, not the pinned schema %s of agent %q",
		[proposed, input.agent.memory_schema_hash, input.agent.id],
	)
}

deny contains msg if {
	previous := input.envelope.memory.previous_schema_hash
	is_string(previous)
	previous != input.agent.memory_schema_hash
	input.agent.constraints.memory.allow_schema_change == false
	msg := sprintf(
		"agent %q may not change its memory schema (%s, was %s)",
		[input.agent.id, input.agent.memory_schema_hash, previous],
	)
}

warn contains msg if {
	previous := input.envelope.memory.previous_schema_hash
	is_string(previous)
	previous != input.agent.memory_schema_hash
	not input.agent.constraints.memory.allow_schema_change == false
	msg := sprintf(
		"agent %q runs under a new memory schema (%s, was %s)",
		[input.agent.id, input.agent.memory_schema_hash, previous],
	)
}
