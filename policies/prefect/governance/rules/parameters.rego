# Parameter constraints declared in agent.constraints.parameters: required,
# type (JSON Schema's names), minimum, maximum, enum, pattern (RE2) and
# max_length. Each rule tests the constraint first: most constraints set few
# fields.
package prefect.governance.rules.parameters

import data.prefect.governance.lib.parameters as helpers

deny contains msg if {
	some name, constraint in input.agent.constraints.parameters
	constraint.required == true
	not name in object.keys(input.envelope.parameters)
	msg := sprintf("parameter %q is required", [name])
}

deny contains msg if {
	some name, constraint in input.agent.constraints.parameters
	is_string(constraint.type)
	value := input.envelope.parameters[name]
	type_name(value) != constraint.type
	not helpers.integer(value, constraint.type)
	msg := sprintf("parameter %q must be of type %s", [name, constraint.type])
}

deny contains msg if {
	some name, constraint in input.agent.constraints.parameters
	is_number(constraint.maximum)
	value := input.envelope.parameters[name]
	is_number(value)
	value > constraint.maximum
	msg := sprintf("parameter %q is %v, above the maximum %v", [name, value, constraint.maximum])
}

deny contains msg if {
	some name, constraint in input.agent.constraints.parameters
	is_number(constraint.minimum)
	value := input.envelope.parameters[name]
	is_number(value)
	value < constraint.minimum
	msg := sprintf("parameter %q is %v, below the minimum %v", [name, value, constraint.minimum])
}

deny contains msg if {
	some name, constraint in input.agent.constraints.parameters
	is_array(constraint.enum)
	value := input.envelope.parameters[name]
	not value in constraint.enum
	msg := sprintf("parameter %q must be one of %v", [name, constraint.enum])
}

deny contains msg if {
	some name, constraint in input.agent.constraints.parameters
	is_string(constraint.pattern)
	value := input.envelope.parameters[name]
	is_string(value)
	not regex.match(constraint.pattern, value)
	msg := sprintf("parameter %q does not match the pattern %q", [name, constraint.pattern])
}

deny contains msg if {
	some name, constraint in input.agent.constraints.parameters
	is_number(constraint.max_length)
	value := input.envelope.parameters[name]
	helpers.sized(value)
	count(value) > constraint.max_length
	msg := sprintf("parameter %q is longer than %v", [name, constraint.max_length])
}
