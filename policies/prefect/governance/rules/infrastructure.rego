# Infrastructure: what a Docker or Kubernetes run would start (envelope.infrastructure)
# stays within what the agent's owner allows (agent.constraints.infrastructure).
#
# Without constraints the defaults hold: no privileged container, no confinement
# turned off, no privilege escalation, no added capability, no host path (bind,
# hostPath or device), no host network, PID or IPC namespace, no setting the worker
# does not recognise. Registries, namespaces and service accounts are only checked
# when the agent lists them; digests and a non-root user only when it requires them.
# A run whose worker says nothing of its infrastructure is not judged here.
package prefect.governance.rules.infrastructure

import data.prefect.governance.lib.infrastructure as lib

deny contains msg if {
	is_object(input.envelope)
	found := object.get(input.envelope, "infrastructure", null)
	found != null
	not is_object(found)
	msg := "envelope.infrastructure is not an object: what the run would start cannot be checked"
}

deny contains msg if {
	some container in lib.containers
	container.privileged == true
	lib.allowed.allow_privileged != true
	msg := sprintf(
		"container %q is privileged: agent %q may not run privileged containers",
		[lib.label(container), input.agent.id],
	)
}

deny contains msg if {
	some container in lib.containers
	some confinement in container.unconfined
	lib.allowed.allow_privileged != true
	msg := sprintf(
		"container %q turns %s confinement off: agent %q may not run unconfined containers",
		[lib.label(container), confinement, input.agent.id],
	)
}

deny contains msg if {
	some container in lib.containers
	container.allow_privilege_escalation == true
	lib.allowed.allow_privilege_escalation != true
	msg := sprintf(
		"container %q allows privilege escalation: agent %q may not",
		[lib.label(container), input.agent.id],
	)
}

deny contains msg if {
	some container in lib.containers
	some capability in container.capabilities_added
	not capability in lib.allowed.capabilities
	msg := sprintf(
		"container %q adds capability %s: agent %q may add only %v",
		[lib.label(container), capability, input.agent.id, lib.allowed.capabilities],
	)
}

deny contains msg if {
	some path in lib.infrastructure.host_paths
	not lib.host_path_allowed(path)
	msg := sprintf(
		"host path %q is not one agent %q may mount (allowed: %v)",
		[path, input.agent.id, lib.allowed.host_paths],
	)
}

deny contains msg if {
	some namespace, setting in lib.host_namespaces
	lib.infrastructure[setting] == true
	lib.allowed[setting] != true
	msg := sprintf(
		"the run would share the host's %s namespace: agent %q may not (%s)",
		[namespace, input.agent.id, setting],
	)
}

deny contains msg if {
	is_array(lib.allowed.registries)
	some container in lib.containers
	not lib.image(container, "registry") in lib.allowed.registries
	msg := sprintf(
		"image %q of container %q is not from a registry agent %q may use %v",
		[lib.image(container, "reference"), lib.label(container), input.agent.id, lib.allowed.registries],
	)
}

deny contains msg if {
	lib.allowed.require_digest == true
	some container in lib.containers
	not is_string(lib.image(container, "digest"))
	msg := sprintf(
		"image %q of container %q is not pinned by digest (name@sha256:...), as agent %q requires",
		[lib.image(container, "reference"), lib.label(container), input.agent.id],
	)
}

deny contains msg if {
	lib.allowed.require_non_root == true
	some container in lib.containers
	not lib.non_root(container)
	msg := sprintf(
		"container %q may run as root: agent %q requires run_as_non_root or a user id above 0",
		[lib.label(container), input.agent.id],
	)
}

deny contains msg if {
	lib.infrastructure.kind == "kubernetes"
	is_array(lib.allowed.namespaces)
	not lib.field("namespace") in lib.allowed.namespaces
	msg := sprintf(
		"namespace %q is outside the namespaces of agent %q %v",
		[lib.field("namespace"), input.agent.id, lib.allowed.namespaces],
	)
}

deny contains msg if {
	lib.infrastructure.kind == "kubernetes"
	is_array(lib.allowed.service_accounts)
	not lib.field("service_account") in lib.allowed.service_accounts
	msg := sprintf(
		"service account %q is outside the service accounts of agent %q %v",
		[lib.field("service_account"), input.agent.id, lib.allowed.service_accounts],
	)
}

deny contains msg if {
	some name in lib.infrastructure.unrecognized
	not name in lib.allowed.settings
	msg := sprintf(
		"setting %q is not one the worker recognises (it could widen the run's privileges): agent %q does not accept it",
		[name, input.agent.id],
	)
}
