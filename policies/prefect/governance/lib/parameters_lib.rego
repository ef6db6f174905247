# Helpers of rules/parameters.rego.
package prefect.governance.lib.parameters

# A value with a length: a string or an array.
sized(value) if is_string(value)

sized(value) if is_array(value)

# A whole number where the declared type is "integer" (JSON Schema's
# integer: a number without a fraction; type_name calls it a number).
integer(value, "integer") if {
	is_number(value)
	value == round(value)
}
