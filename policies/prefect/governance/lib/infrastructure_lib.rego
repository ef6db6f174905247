# Helpers of rules/infrastructure.rego.
package prefect.governance.lib.infrastructure

# What the run would start (envelope.infrastructure); undefined when the caller did
# not say (an older worker), so that the rules say nothing of such a run.
infrastructure := input.envelope.infrastructure if is_object(input.envelope.infrastructure)

# Every container the run would start (Kubernetes: init and ephemeral ones too).
containers := [container | some container in infrastructure.containers]

# The agent's limits when its constraints say nothing (constraints.infrastructure
# absent, or a field of it null): nothing privileged, no added capability, no host
# path or host namespace, no unrecognised setting; any registry, namespace and
# service account, images by tag, root allowed.
defaults := {
	"registries": null,
	"require_digest": false,
	"allow_privileged": false,
	"allow_privilege_escalation": false,
	"capabilities": [],
	"host_paths": [],
	"host_network": false,
	"host_pid": false,
	"host_ipc": false,
	"require_non_root": false,
	"namespaces": null,
	"service_accounts": null,
	"settings": [],
}

# The agent's infrastructure constraints, each one it does not set at its default.
allowed[name] := setting(name) if some name, _ in defaults

setting(name) := value if {
	value := input.agent.constraints.infrastructure[name]
	value != null
} else := defaults[name]

# How a message names a container (always defined: a message must never be undefined).
label(container) := container.name if is_string(container.name)

else := sprintf("(unnamed %v)", [container.role]) if is_string(container.role)

else := "(unnamed)"

# A field of a container's image (registry, digest, reference), null when absent: a
# container without an image is judged as one whose image is nowhere allowed.
image(container, name) := object.get(container, ["image", name], null)

# A field of what the run would start, null when absent (for messages).
field(name) := object.get(infrastructure, name, null)

# A host path is allowed when one of the agent's prefixes covers it: the prefix
# itself or a path below it (/data covers /data/x, not /database; / covers all).
host_path_allowed(path) if {
	some prefix in allowed.host_paths
	covers(trim_right(prefix, "/"), path)
}

covers(prefix, path) if path == prefix

covers(prefix, path) if startswith(path, concat("", [prefix, "/"]))

# A container that cannot run as root: it says so, or it runs as a user id above 0.
non_root(container) if container.run_as_non_root == true

non_root(container) if container.run_as_user > 0

# The host namespaces the run may share, by the setting that allows each.
host_namespaces := {"network": "host_network", "PID": "host_pid", "IPC": "host_ipc"}
