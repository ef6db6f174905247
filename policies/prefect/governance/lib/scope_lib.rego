# Helpers of rules/scope.rego.
package prefect.governance.lib.scope

# The tag prefix of each scope kind.
prefix := {"environment": "env", "tenant": "tenant"}

# The scope kinds an agent is restricted in, with the names it may act in.
scoped(scope) := {kind: allowed |
	some kind, field in {"environment": "environments", "tenant": "tenants"}
	allowed := scope[field]
	is_array(allowed)
}

# The names of one kind in the run's tags (flow run and deployment).
tagged(kind) := {substring(tag, count(start), -1) |
	start := concat("", [prefix[kind], ":"])
	some tag in run_tags(input.envelope)
	startswith(tag, start)
}

run_tags(envelope) := {tag | some tag in envelope.flow_run.tags} | {tag | some tag in envelope.deployment.tags}
