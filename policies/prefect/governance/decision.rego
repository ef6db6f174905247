# The default governance decision for flow runs in a governed work pool.
#
# Input: see policies/schema/input.schema.json. Result: allow, deny, warn,
# annotations (policies/schema/result.schema.json).
package prefect.governance.decision

# Trust below this score is allowed, with a warning.
low_trust := 0.5

default allow := false

allow if count(deny) == 0

# Every capability the run asks for must be granted to the agent.
deny contains msg if {
	some capability in input.envelope.capabilities
	not capability in input.agent.capabilities
	msg := sprintf("capability %q is not granted to agent %q", [capability, input.agent.id])
}

# The agent may only act in work pools inside its trust scope.
deny contains msg if {
	not input.envelope.work_pool.name in input.agent.trust_scope
	msg := sprintf(
		"work pool %q is outside the trust scope of agent %q",
		[input.envelope.work_pool.name, input.agent.id],
	)
}

# Parameter constraints declared in the agent object.
deny contains msg if {
	some name, constraint in input.agent.constraints.parameters
	constraint.required == true
	not name in object.keys(input.envelope.parameters)
	msg := sprintf("parameter %q is required", [name])
}

deny contains msg if {
	some name, value in input.envelope.parameters
	constraint := input.agent.constraints.parameters[name]
	is_string(constraint.type)
	not json_type(value, constraint.type)
	msg := sprintf("parameter %q must be of type %s", [name, constraint.type])
}

deny contains msg if {
	some name, value in input.envelope.parameters
	constraint := input.agent.constraints.parameters[name]
	is_number(value)
	is_number(constraint.maximum)
	value > constraint.maximum
	msg := sprintf("parameter %q is %v, above the maximum %v", [name, value, constraint.maximum])
}

deny contains msg if {
	some name, value in input.envelope.parameters
	constraint := input.agent.constraints.parameters[name]
	is_number(value)
	is_number(constraint.minimum)
	value < constraint.minimum
	msg := sprintf("parameter %q is %v, below the minimum %v", [name, value, constraint.minimum])
}

deny contains msg if {
	some name, value in input.envelope.parameters
	constraint := input.agent.constraints.parameters[name]
	is_array(constraint.enum)
	not value in constraint.enum
	msg := sprintf("parameter %q must be one of %v", [name, constraint.enum])
}

deny contains msg if {
	some name, value in input.envelope.parameters
	constraint := input.agent.constraints.parameters[name]
	is_string(value)
	is_string(constraint.pattern)
	not regex.match(constraint.pattern, value)
	msg := sprintf("parameter %q does not match the pattern %q", [name, constraint.pattern])
}

deny contains msg if {
	some name, value in input.envelope.parameters
	constraint := input.agent.constraints.parameters[name]
	is_number(constraint.max_length)
	sized(value)
	count(value) > constraint.max_length
	msg := sprintf("parameter %q is longer than %v", [name, constraint.max_length])
}

# Trust that fell at every one of the agent's last three runs stops it.
deny contains msg if {
	window := input.agent.trust.window
	n := count(window)
	n >= 3
	window[n - 3] > window[n - 2]
	window[n - 2] > window[n - 1]
	msg := sprintf(
		"trust of agent %q fell across its last three runs: %v",
		[input.agent.id, array.slice(window, n - 3, n)],
	)
}

# A run that changes the memory schema is a change to the agent: say so.
warn contains msg if {
	previous := input.envelope.memory.previous_schema_hash
	is_string(previous)
	previous != input.envelope.memory.schema_hash
	msg := sprintf(
		"agent %q runs under a new memory schema (%s, was %s)",
		[input.agent.id, input.envelope.memory.schema_hash, previous],
	)
}

# Low trust is allowed, with a warning.
warn contains msg if {
	input.agent.trust.score < low_trust
	msg := sprintf(
		"trust of agent %q is low: %v (below %v)",
		[input.agent.id, input.agent.trust.score, low_trust],
	)
}

annotations := {
	"governance.agent": input.agent.id,
	"governance.policy": "prefect/governance/decision",
}

# --- helpers -------------------------------------------------------------------

sized(value) if is_string(value)

sized(value) if is_array(value)

json_type(value, "string") if is_string(value)

json_type(value, "boolean") if is_boolean(value)

json_type(value, "number") if is_number(value)

json_type(value, "integer") if {
	is_number(value)
	value == round(value)
}

json_type(value, "array") if is_array(value)

json_type(value, "object") if is_object(value)
