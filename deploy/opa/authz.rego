# Authorization of the OPA sidecar's own API (`opa run --authentication=token
# --authorization=basic`). The worker may ask for decisions with its bearer token; nobody
# may change policies or data over the API, so code running next to OPA (a flow run in the
# worker's container or pod) cannot swap the policy it is judged by.
package system.authz

import rego.v1

default allow := false

# Health, for probes and healthchecks: no token needed, nothing revealed.
allow if {
	input.method == "GET"
	input.path == ["health"]
}

# Decisions: POST /v1/data/<policy path> (a read with input), with the worker's token.
allow if {
	input.method == "POST"
	input.path[0] == "v1"
	input.path[1] == "data"
	count(input.path) > 2
	valid_token
}

valid_token if {
	expected := opa.runtime().env.GOVERNANCE_OPA_TOKEN
	expected != ""
	input.identity == expected
}
