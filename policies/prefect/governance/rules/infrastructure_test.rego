package prefect.governance.rules_test.infrastructure

import data.prefect.governance.testing

# A Docker run as the worker describes it: one container of a public image, nothing more.
container := {
	"name": "quiet-otter",
	"role": "container",
	"image": {"reference": "python:3.11", "registry": "docker.io", "repository": "library/python", "tag": "3.11", "digest": null},
	"privileged": false,
	"allow_privilege_escalation": null,
	"capabilities_added": [],
	"unconfined": [],
	"user": null,
	"run_as_user": null,
	"run_as_non_root": null,
}

docker := {
	"kind": "docker",
	"containers": [container],
	"mounts": [],
	"host_paths": [],
	"network_mode": null,
	"host_network": false,
	"host_pid": false,
	"host_ipc": false,
	"env_names": ["PREFECT_API_URL"],
	"unrecognized": [],
}

# The same container with some of its settings changed.
with_container(changes) := object.union(docker, {"containers": [object.union(container, changes)]})

# A Kubernetes run: a Job's pod in namespace prefect, as service account prefect-runs.
kubernetes := object.union(docker, {
	"kind": "kubernetes",
	"containers": [object.union(container, {"name": "prefect-job"})],
	"namespace": "prefect",
	"service_account": "prefect-runs",
})

pinned := {
	"reference": "ghcr.io/acme/etl@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
	"registry": "ghcr.io",
	"repository": "acme/etl",
	"tag": null,
	"digest": "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
}

cases := {
	"a run without infrastructure (an older worker)": {"changes": {}},
	"infrastructure null": {"changes": {"/envelope/infrastructure": null}},
	"infrastructure that is not an object": {
		"changes": {"/envelope/infrastructure": "docker"},
		"deny": ["envelope.infrastructure is not an object: what the run would start cannot be checked"],
	},
	"a process run": {"changes": {"/envelope/infrastructure": {
		"kind": "process", "command": "python -m prefect_governance.gate", "working_dir": "/srv", "env_names": ["HOME"],
	}}},
	"a plain Docker run": {"changes": {"/envelope/infrastructure": docker}},
	"a privileged container": {
		"changes": {"/envelope/infrastructure": with_container({"privileged": true})},
		"deny": ["container \"quiet-otter\" is privileged: agent \"etl-agent\" may not run privileged containers"],
	},
	"a privileged container, null constraints keep the default": {
		"changes": {
			"/envelope/infrastructure": with_container({"privileged": true}),
			"/agent/constraints/infrastructure": {"allow_privileged": null},
		},
		"deny": ["container \"quiet-otter\" is privileged: agent \"etl-agent\" may not run privileged containers"],
	},
	"a privileged container the agent allows": {"changes": {
		"/envelope/infrastructure": with_container({"privileged": true, "unconfined": ["seccomp"]}),
		"/agent/constraints/infrastructure": {"allow_privileged": true},
	}},
	"confinement turned off": {
		"changes": {"/envelope/infrastructure": with_container({"unconfined": ["apparmor", "seccomp"]})},
		"deny": [
			"container \"quiet-otter\" turns apparmor confinement off: agent \"etl-agent\" may not run unconfined containers",
			"container \"quiet-otter\" turns seccomp confinement off: agent \"etl-agent\" may not run unconfined containers",
		],
	},
	"privilege escalation": {
		"changes": {"/envelope/infrastructure": with_container({"allow_privilege_escalation": true})},
		"deny": ["container \"quiet-otter\" allows privilege escalation: agent \"etl-agent\" may not"],
	},
	"privilege escalation the agent allows, and none asked": {"changes": {
		"/envelope/infrastructure": object.union(docker, {"containers": [
			object.union(container, {"allow_privilege_escalation": true}),
			object.union(container, {"name": "other", "allow_privilege_escalation": false}),
		]}),
		"/agent/constraints/infrastructure": {"allow_privilege_escalation": true},
	}},
	"an added capability": {
		"changes": {"/envelope/infrastructure": with_container({"capabilities_added": ["SYS_ADMIN"]})},
		"deny": ["container \"quiet-otter\" adds capability SYS_ADMIN: agent \"etl-agent\" may add only []"],
	},
	"an added capability the agent allows, and one it does not": {
		"changes": {
			"/envelope/infrastructure": with_container({"capabilities_added": ["NET_ADMIN", "NET_RAW"]}),
			"/agent/constraints/infrastructure": {"capabilities": ["NET_ADMIN"]},
		},
		"deny": ["container \"quiet-otter\" adds capability NET_RAW: agent \"etl-agent\" may add only [\"NET_ADMIN\"]"],
	},
	"a host path": {
		"changes": {"/envelope/infrastructure": object.union(docker, {"host_paths": ["/var/run/docker.sock"]})},
		"deny": ["host path \"/var/run/docker.sock\" is not one agent \"etl-agent\" may mount (allowed: [])"],
	},
	"host paths at and below an allowed prefix": {"changes": {
		"/envelope/infrastructure": object.union(docker, {"host_paths": ["/data", "/data/in/x.csv"]}),
		"/agent/constraints/infrastructure": {"host_paths": ["/data/"]},
	}},
	"a host path that only starts like an allowed prefix": {
		"changes": {
			"/envelope/infrastructure": object.union(docker, {"host_paths": ["/database", "/data/ok"]}),
			"/agent/constraints/infrastructure": {"host_paths": ["/data"]},
		},
		"deny": ["host path \"/database\" is not one agent \"etl-agent\" may mount (allowed: [\"/data\"])"],
	},
	"every host path under /": {"changes": {
		"/envelope/infrastructure": object.union(docker, {"host_paths": ["/etc", "/"]}),
		"/agent/constraints/infrastructure": {"host_paths": ["/"]},
	}},
	"the host's network": {
		"changes": {"/envelope/infrastructure": object.union(docker, {"network_mode": "host", "host_network": true})},
		"deny": ["the run would share the host's network namespace: agent \"etl-agent\" may not (host_network)"],
	},
	"the host's network the agent allows": {"changes": {
		"/envelope/infrastructure": object.union(docker, {"network_mode": "host", "host_network": true}),
		"/agent/constraints/infrastructure": {"host_network": true},
	}},
	"the host's PID and IPC namespaces": {
		"changes": {"/envelope/infrastructure": object.union(kubernetes, {"host_pid": true, "host_ipc": true})},
		"deny": [
			"the run would share the host's PID namespace: agent \"etl-agent\" may not (host_pid)",
			"the run would share the host's IPC namespace: agent \"etl-agent\" may not (host_ipc)",
		],
	},
	"an image from a registry outside the agent's": {
		"changes": {
			"/envelope/infrastructure": docker,
			"/agent/constraints/infrastructure": {"registries": ["ghcr.io"]},
		},
		"deny": ["image \"python:3.11\" of container \"quiet-otter\" is not from a registry agent \"etl-agent\" may use [\"ghcr.io\"]"],
	},
	"an image from the agent's registry": {"changes": {
		"/envelope/infrastructure": docker,
		"/agent/constraints/infrastructure": {"registries": ["docker.io", "ghcr.io"]},
	}},
	"no registry allowed, and a container without an image": {
		"changes": {
			"/envelope/infrastructure": object.union(kubernetes, {"containers": [{"role": "init"}, {}]}),
			"/agent/constraints/infrastructure": {"registries": []},
		},
		"deny": [
			"image \"null\" of container \"(unnamed init)\" is not from a registry agent \"etl-agent\" may use []",
			"image \"null\" of container \"(unnamed)\" is not from a registry agent \"etl-agent\" may use []",
		],
	},
	"an image not pinned by digest": {
		"changes": {
			"/envelope/infrastructure": docker,
			"/agent/constraints/infrastructure": {"require_digest": true},
		},
		"deny": ["image \"python:3.11\" of container \"quiet-otter\" is not pinned by digest (name@sha256:...), as agent \"etl-agent\" requires"],
	},
	"an image pinned by digest": {"changes": {
		"/envelope/infrastructure": with_container({"image": pinned}),
		"/agent/constraints/infrastructure": {"require_digest": true, "registries": ["ghcr.io"]},
	}},
	"a container that may run as root": {
		"changes": {
			"/envelope/infrastructure": with_container({"run_as_user": 0}),
			"/agent/constraints/infrastructure": {"require_non_root": true},
		},
		"deny": ["container \"quiet-otter\" may run as root: agent \"etl-agent\" requires run_as_non_root or a user id above 0"],
	},
	"containers that run as non-root": {"changes": {
		"/envelope/infrastructure": object.union(docker, {"containers": [
			object.union(container, {"run_as_user": 1000}),
			object.union(container, {"name": "other", "run_as_non_root": true}),
		]}),
		"/agent/constraints/infrastructure": {"require_non_root": true},
	}},
	"a namespace and a service account outside the agent's": {
		"changes": {
			"/envelope/infrastructure": kubernetes,
			"/agent/constraints/infrastructure": {"namespaces": ["etl"], "service_accounts": ["etl-runner"]},
		},
		"deny": [
			"namespace \"prefect\" is outside the namespaces of agent \"etl-agent\" [\"etl\"]",
			"service account \"prefect-runs\" is outside the service accounts of agent \"etl-agent\" [\"etl-runner\"]",
		],
	},
	"a namespace and a service account of the agent's": {"changes": {
		"/envelope/infrastructure": kubernetes,
		"/agent/constraints/infrastructure": {"namespaces": ["prefect"], "service_accounts": ["prefect-runs"]},
	}},
	"namespaces are not a Docker run's concern": {"changes": {
		"/envelope/infrastructure": docker,
		"/agent/constraints/infrastructure": {"namespaces": ["etl"], "service_accounts": []},
	}},
	"a setting the worker does not recognise": {
		"changes": {"/envelope/infrastructure": object.union(docker, {"unrecognized": ["container_create_kwargs.runtime", "container_create_kwargs.sysctls"]})},
		"deny": [
			"setting \"container_create_kwargs.runtime\" is not one the worker recognises (it could widen the run's privileges): agent \"etl-agent\" does not accept it",
			"setting \"container_create_kwargs.sysctls\" is not one the worker recognises (it could widen the run's privileges): agent \"etl-agent\" does not accept it",
		],
	},
	"a setting the agent accepts": {"changes": {
		"/envelope/infrastructure": object.union(docker, {"unrecognized": ["container_create_kwargs.runtime"]}),
		"/agent/constraints/infrastructure": {"settings": ["container_create_kwargs.runtime"]},
	}},
	"a privileged initContainer and a hostPath in a Kubernetes pod": {
		"changes": {"/envelope/infrastructure": object.union(kubernetes, {
			"containers": [
				object.union(container, {"name": "prefect-job"}),
				object.union(container, {"name": "setup", "role": "init", "privileged": true, "capabilities_added": ["ALL"]}),
			],
			"mounts": [{"type": "hostPath", "source": "/", "target": null, "read_only": false}],
			"host_paths": ["/"],
		})},
		"deny": [
			"container \"setup\" is privileged: agent \"etl-agent\" may not run privileged containers",
			"container \"setup\" adds capability ALL: agent \"etl-agent\" may add only []",
			"host path \"/\" is not one agent \"etl-agent\" may mount (allowed: [])",
		],
	},
}

failures := testing.failures("infrastructure", cases)

test_cases if count(failures) == 0
