# Parameter constraints declared in agent.constraints.parameters: required,
# type, minimum, maximum, enum, pattern (RE2) and max_length.
package prefect.governance.rules.parameters

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
