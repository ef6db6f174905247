# Task memory: a task writes only the memory fields it declares, under the
# memory schema its run started with.
#
# On commit (context.purpose "commit": the task ended with a proposal, which is
# about to apply), each top-level field the proposal writes
# (envelope.memory.proposed) must be one the task declared
# (envelope.memory.writes). On admit and on commit, the memory schema the task
# sees (envelope.memory.schema_hash) must be the run's (posture.schema_hash).
package prefect.governance.task_rules.memory

import data.prefect.governance.lib.task

deny contains msg if {
	task.commit
	some field in input.envelope.memory.proposed
	not declared(field)
	msg := sprintf(
		"task %q may not write memory field %q: its declaration names only %v",
		[input.envelope.task.name, field, declared_fields],
	)
}

deny contains msg if {
	task.commit
	not is_array(input.envelope.memory.proposed)
	msg := sprintf(
		"task %q commits a memory proposal without the fields it writes (envelope.memory.proposed is not an array)",
		[input.envelope.task.name],
	)
}

deny contains msg if {
	seen_schema != run_schema
	msg := sprintf(
		"task %q sees memory schema %v, not the one its run started under (%v)",
		[input.envelope.task.name, seen_schema, run_schema],
	)
}

# A function, not `not field in <writes>`: that is undefined when writes is missing.
declared(field) if field in input.envelope.memory.writes

# The fields the task declares it writes, for the message (none: an empty list).
default declared_fields := []

declared_fields := input.envelope.memory.writes if is_array(input.envelope.memory.writes)

# The memory schema the task sees and the one its run started under (null: none).
default seen_schema := null

seen_schema := input.envelope.memory.schema_hash

default run_schema := null

run_schema := input.posture.schema_hash
