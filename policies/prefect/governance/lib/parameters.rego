# Helpers of rules/parameters.rego.
package prefect.governance.lib.parameters

# A value with a length: a string or an array.
sized(value) if is_string(value)

sized(value) if is_array(value)

# A value of a JSON Schema type: string, boolean, number, array, object or integer.
json_type(value, type) if {
	type in {"string", "boolean", "number", "array", "object"}
	type_name(value) == type
}

json_type(value, "integer") if {
	is_number(value)
	value == round(value)
}
