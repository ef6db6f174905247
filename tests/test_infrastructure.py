"""What a run would start, as the policy sees it: the extractors, and the rules on them.

The Docker and Kubernetes jobs are built by prefect-docker's and prefect-kubernetes's own
job configurations from their default templates (as a worker prepares them for a flow
run), then read by ``core.infrastructure``; attack shapes are the settings a deployment's
job variables can reach. The decisions are the embedded engine's on the shipped policy.
"""

from __future__ import annotations

import copy
import json
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prefect.client.schemas.objects import FlowRun
from prefect.utilities.templating import apply_values

from prefect_governance.core.engines import EmbeddedEngine
from prefect_governance.core.infrastructure import (
    docker_infrastructure,
    job_infrastructure,
    kubernetes_infrastructure,
    parse_image,
    process_infrastructure,
)
from prefect_governance.core.models import Infrastructure, PolicyInput
from tests.conftest import POLICIES, missing

SECRET = "s3cr3t-value-never-sent"
DIGEST = "sha256:" + "ab" * 32


def _worker(kind: str) -> Any:
    try:
        if kind == "docker":
            from prefect_docker.worker import DockerWorker

            return DockerWorker
        from prefect_kubernetes.worker import KubernetesWorker

        return KubernetesWorker
    except ImportError:
        missing(f"prefect-{kind} (pip install 'prefect-governance[{kind}]')")


def prepared(kind: str, values: dict[str, Any]) -> Any:
    """The stock worker's job configuration from its default template and these job
    variables, prepared for a flow run as the worker prepares it."""
    worker = _worker(kind)
    template = worker.get_default_base_job_template()
    variables = {
        name: spec["default"]
        for name, spec in template["variables"]["properties"].items()
        if "default" in spec
    }
    variables.update(values)
    configuration = worker.job_configuration(
        **apply_values(template["job_configuration"], variables)
    )
    configuration.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="quiet-otter"))
    return configuration


def docker_job(**values: Any) -> Infrastructure:
    return docker_infrastructure(
        prepared("docker", {"image": "python:3.11", **values}).model_dump()
    )


def pod(spec: dict[str, Any] | None = None, namespace: str = "prefect", **container: Any):
    configuration = prepared("kubernetes", {"image": "python:3.11", "namespace": namespace})
    manifest = copy.deepcopy(configuration.job_manifest)
    pod_spec = manifest["spec"]["template"]["spec"]
    pod_spec["containers"][0].update(container)
    pod_spec.update(spec or {})
    return kubernetes_infrastructure(manifest, configuration.namespace, configuration.env)


# --- images ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reference", "registry", "repository", "tag", "digest"),
    [
        ("python:3.11", "docker.io", "library/python", "3.11", None),
        ("python", "docker.io", "library/python", None, None),
        ("prefecthq/prefect:3-latest", "docker.io", "prefecthq/prefect", "3-latest", None),
        ("docker.io/library/python:3.11", "docker.io", "library/python", "3.11", None),
        ("index.docker.io/x", "docker.io", "library/x", None, None),
        ("localhost:5000/x", "localhost:5000", "x", None, None),
        ("localhost/x:5", "localhost", "x", "5", None),
        ("ghcr.io/acme/etl:1@" + DIGEST, "ghcr.io", "acme/etl", "1", DIGEST),
        ("registry.local:5000/a/b@" + DIGEST, "registry.local:5000", "a/b", None, DIGEST),
        # a name component with a dot or colon is a registry: no Hub image hides behind it
        (
            "docker.io.evil.com/library/python:3.11",
            "docker.io.evil.com",
            "library/python",
            "3.11",
            None,
        ),
        ("python@sha256:short", "docker.io", "library/python", None, None),  # not a digest
    ],
)
def test_image_references_are_read_as_docker_normalizes_them(
    reference, registry, repository, tag, digest
):
    image = parse_image(reference)
    assert (image.registry, image.repository, image.tag, image.digest) == (
        registry,
        repository,
        tag,
        digest,
    )
    assert image.reference == reference


# --- process --------------------------------------------------------------------------


def test_a_process_run_is_its_command_directory_and_variable_names():
    infrastructure = process_infrastructure(
        "python -m prefect_governance.gate", "/srv/etl", {"TOKEN": SECRET, "HOME": None}
    )
    assert infrastructure.kind == "process"
    assert infrastructure.command == "python -m prefect_governance.gate"
    assert infrastructure.working_dir == "/srv/etl"
    assert infrastructure.env_names == ["HOME", "TOKEN"]
    assert SECRET not in infrastructure.model_dump_json()


# --- Docker ---------------------------------------------------------------------------


def test_the_stock_docker_job_is_read_with_nothing_unrecognised():
    infrastructure = docker_job(env={"TOKEN": SECRET}, mem_limit="512m")
    assert infrastructure.kind == "docker"
    (container,) = infrastructure.containers
    assert container.image is not None and container.image.registry == "docker.io"
    assert not container.privileged and container.capabilities_added == []
    assert container.limits == {"memory": "512m"}
    assert infrastructure.host_paths == [] and infrastructure.unrecognized == []
    assert (
        "TOKEN" in infrastructure.env_names and "PREFECT__FLOW_RUN_ID" in infrastructure.env_names
    )
    assert SECRET not in infrastructure.model_dump_json(), "names only, never values"


def test_the_network_mode_prefect_docker_infers_is_seen():
    """No network mode set, an API on loopback: prefect-docker runs the container on the
    host's network (on Linux), and the policy is told so."""
    loopback = {"PREFECT_API_URL": "http://127.0.0.1:4200/api"}
    infrastructure = docker_job(env=loopback)
    assert (infrastructure.network_mode, infrastructure.host_network) == ("host", True)
    configuration = prepared("docker", {"image": "python:3.11", "env": loopback})
    assert configuration.get_network_mode() == "host", "as prefect-docker decides it"
    assert not docker_job(env=loopback, networks=["etl"]).host_network
    assert docker_job(env=loopback, network_mode="none").network_mode == "none"
    assert not docker_job(env={"PREFECT_API_URL": "http://prefect:4200/api"}).host_network


def test_docker_volumes_are_host_paths_resolved_as_the_kernel_would():
    infrastructure = docker_job(volumes=["/srv/etl/../../etc:/host-etc:ro", "cache:/cache", "/tmp"])
    assert infrastructure.host_paths == ["/etc"]
    kinds = {(m.type, m.source, m.target, m.read_only) for m in infrastructure.mounts}
    assert kinds == {
        ("bind", "/etc", "/host-etc", True),
        ("volume", "cache", "/cache", False),
        ("volume", None, "/tmp", False),
    }


def test_privileged_through_container_create_kwargs_is_seen():
    """prefect-docker 0.7.4 drops a create kwarg that names a job field; another release
    may not: the policy sees the wider of the two."""
    infrastructure = docker_job(container_create_kwargs={"privileged": True})
    assert infrastructure.containers[0].privileged
    assert docker_job(privileged=True).containers[0].privileged


def test_a_bind_in_mounts_and_a_device_are_host_paths():
    infrastructure = docker_job(
        container_create_kwargs={
            "mounts": [
                {"Type": "bind", "Source": "/var/run/docker.sock", "Target": "/run/docker.sock"},
                {"type": "volume", "source": "data", "target": "/data"},
                "/proc:/host-proc",
            ],
            "devices": ["/dev/sda:/dev/xvda:rwm"],
        }
    )
    assert infrastructure.host_paths == ["/dev/sda", "/proc", "/var/run/docker.sock"]
    assert infrastructure.unrecognized == []


def test_a_volume_with_driver_options_is_unrecognised():
    """The local driver with o=bind is a bind mount in disguise: the policy sees it."""
    infrastructure = docker_job(
        container_create_kwargs={
            "mounts": [
                {
                    "Type": "volume",
                    "Target": "/x",
                    "VolumeOptions": {"DriverConfig": {"Options": {"o": "bind", "device": "/"}}},
                }
            ]
        }
    )
    assert infrastructure.unrecognized == ["container_create_kwargs.mounts[0].VolumeOptions"]


def test_docker_namespaces_capabilities_confinement_and_user():
    infrastructure = docker_job(
        network_mode="host",
        container_create_kwargs={
            "pid_mode": "host",
            "ipc_mode": "container:other",
            "userns_mode": "host",
            "cap_add": ["cap_sys_admin", "NET_ADMIN"],
            "security_opt": ["seccomp=unconfined", "no-new-privileges", "label=type:svirt_t"],
            "user": "root",
            "working_dir": "/work",
            "entrypoint": "sh -c",
            "labels": {"team": "data"},
        },
    )
    (container,) = infrastructure.containers
    assert infrastructure.host_network and infrastructure.network_mode == "host"
    assert infrastructure.host_pid and not infrastructure.host_ipc
    assert container.capabilities_added == ["NET_ADMIN", "SYS_ADMIN"]
    assert container.unconfined == ["seccomp", "userns"]
    assert container.allow_privilege_escalation is False
    assert (container.user, container.run_as_user, container.working_dir) == ("root", 0, "/work")
    assert container.command is not None and container.command[:2] == ["sh", "-c"]
    assert infrastructure.unrecognized == ["ipc_mode=container:other"]


def test_unknown_create_kwargs_are_listed_by_name():
    infrastructure = docker_job(
        container_create_kwargs={"runtime": "runc", "sysctls": {"net.x": "1"}, "hostname": "h"}
    )
    assert infrastructure.unrecognized == [
        "container_create_kwargs.runtime",
        "container_create_kwargs.sysctls",
    ]
    odd = docker_infrastructure({"image": "python", "container_create_kwargs": "privileged"})
    assert odd.unrecognized == ["container_create_kwargs"]


# --- Kubernetes -----------------------------------------------------------------------


def test_the_stock_kubernetes_job_is_read_with_nothing_unrecognised():
    infrastructure = pod(env=[{"name": "TOKEN", "value": SECRET}])
    assert infrastructure.kind == "kubernetes"
    assert (infrastructure.namespace, infrastructure.service_account) == ("prefect", "default")
    (container,) = infrastructure.containers
    assert container.name == "prefect-job" and container.role == "container"
    assert container.limits == {} and container.command == ["prefect", "flow-run", "execute"]
    assert infrastructure.unrecognized == []
    assert not (infrastructure.host_network or infrastructure.host_pid or infrastructure.host_ipc)
    assert (
        "TOKEN" in infrastructure.env_names and "PREFECT__FLOW_RUN_ID" in infrastructure.env_names
    )
    assert SECRET not in infrastructure.model_dump_json()


def test_a_host_path_for_an_init_container_and_host_pid_are_seen():
    infrastructure = pod(
        spec={
            "hostPID": True,
            "hostIPC": True,
            "volumes": [
                {"name": "root", "hostPath": {"path": "/var/lib/../../"}},
                {"name": "scratch", "emptyDir": {}},
            ],
            "initContainers": [
                {
                    "name": "setup",
                    "image": "busybox",
                    "volumeMounts": [{"name": "root", "mountPath": "/host"}],
                    "securityContext": {"privileged": True, "capabilities": {"add": ["ALL"]}},
                }
            ],
            "ephemeralContainers": [
                {"name": "debug", "image": "ghcr.io/x/y@" + DIGEST, "targetContainerName": "a"}
            ],
        }
    )
    assert infrastructure.host_paths == ["/"]
    assert infrastructure.host_pid and infrastructure.host_ipc and not infrastructure.host_network
    roles = {
        c.name: (c.role, c.privileged, c.capabilities_added) for c in infrastructure.containers
    }
    assert roles == {
        "prefect-job": ("container", False, []),
        "setup": ("init", True, ["ALL"]),
        "debug": ("ephemeral", False, []),
    }
    assert {m.type for m in infrastructure.mounts} == {"hostPath", "emptyDir"}


def test_the_pod_security_context_applies_where_a_container_sets_none():
    infrastructure = pod(
        spec={
            "securityContext": {"runAsUser": 1000, "runAsNonRoot": True},
            "initContainers": [
                {
                    "name": "setup",
                    "image": "busybox",
                    "securityContext": {
                        "runAsUser": 0,
                        "allowPrivilegeEscalation": True,
                        "seccompProfile": {"type": "Unconfined"},
                    },
                }
            ],
        }
    )
    by_name = {c.name: c for c in infrastructure.containers}
    assert (by_name["prefect-job"].run_as_user, by_name["prefect-job"].run_as_non_root) == (
        1000,
        True,
    )
    setup = by_name["setup"]
    assert (setup.run_as_user, setup.allow_privilege_escalation) == (0, True)
    assert setup.unconfined == ["seccomp"]


def test_unknown_and_unmodelled_pod_fields_are_listed():
    infrastructure = pod(
        spec={"nodeName": "control-plane", "securityContext": {"sysctls": [{"name": "x"}]}},
        namespace="prefect",
        volumeDevices=[{"name": "disk", "devicePath": "/dev/xvda"}],
    )
    assert infrastructure.unrecognized == [
        "spec.template.spec.containers[0].volumeDevices",
        "spec.template.spec.nodeName",
        "spec.template.spec.securityContext.sysctls",
    ]


def test_the_namespace_is_where_the_worker_creates_the_job():
    configuration = prepared("kubernetes", {"image": "python:3.11", "namespace": "prefect"})
    manifest = copy.deepcopy(configuration.job_manifest)
    manifest["metadata"]["namespace"] = "kube-system"
    manifest["spec"]["template"]["spec"]["serviceAccountName"] = "etl-runner"
    infrastructure = kubernetes_infrastructure(manifest, "prefect", {})
    assert (infrastructure.namespace, infrastructure.service_account) == ("prefect", "etl-runner")
    assert infrastructure.unrecognized == ["metadata.namespace=kube-system"]
    assert kubernetes_infrastructure(manifest, None, {}).namespace == "kube-system"


# --- the policy on them -----------------------------------------------------------------

BASE = json.loads((POLICIES / "examples" / "allowed" / "input.json").read_text())


@pytest.fixture(scope="module")
def engine() -> EmbeddedEngine:
    return EmbeddedEngine(POLICIES)


def decided(engine: EmbeddedEngine, infrastructure: Infrastructure | None, **limits: Any):
    document = copy.deepcopy(BASE)
    document["envelope"]["infrastructure"] = (
        infrastructure.model_dump(mode="json") if infrastructure else None
    )
    if limits:
        document["agent"]["constraints"]["infrastructure"] = limits
    policy_input = PolicyInput.model_validate(document).model_dump(mode="json")
    result = engine.evaluate_sync("prefect/governance/decision", policy_input).result
    return result["allow"], sorted(result["deny"])


def test_the_policy_refuses_the_attack_shapes(engine):
    attacks = {
        "privileged": docker_job(container_create_kwargs={"privileged": True}),
        "docker socket": docker_job(
            container_create_kwargs={"mounts": [{"Type": "bind", "Source": "/var/run/docker.sock"}]}
        ),
        "hostPath in init": pod(
            spec={
                "volumes": [{"name": "h", "hostPath": {"path": "/etc"}}],
                "initContainers": [{"name": "setup", "image": "busybox"}],
            }
        ),
        "hostPID": pod(spec={"hostPID": True}),
        "unknown kwarg": docker_job(container_create_kwargs={"runtime": "x"}),
    }
    for name, infrastructure in attacks.items():
        allow, deny = decided(engine, infrastructure)
        assert not allow, name
        assert all("etl-agent" in message for message in deny), (name, deny)


def test_the_policy_allows_stock_runs_and_what_the_agent_allows(engine):
    assert decided(engine, None) == (True, []), "a worker that says nothing is not judged"
    # (an explicit bridge: with the API on loopback, prefect-docker picks the host's network)
    assert decided(engine, docker_job(network_mode="bridge")) == (True, [])
    assert decided(engine, pod()) == (True, [])
    assert decided(engine, process_infrastructure("python -m x", "/srv", {})) == (True, [])
    mounted = docker_job(network_mode="host", volumes=["/srv/etl/out:/out"])
    assert not decided(engine, mounted)[0]
    assert decided(
        engine, mounted, host_paths=["/srv/etl"], host_network=True, registries=["docker.io"]
    ) == (True, [])
    allow, deny = decided(engine, pod(), registries=["ghcr.io"], require_digest=True)
    assert not allow and len(deny) == 2, deny


def test_a_job_of_a_type_not_known_is_read_by_its_shape():
    """What ``decide`` uses for a pool type whose worker it only has a configuration of."""
    docker = prepared("docker", {"image": "python:3.11"}).model_dump()
    assert job_infrastructure(docker) == docker_infrastructure(docker)
    kubernetes = prepared("kubernetes", {"image": "python:3.11", "namespace": "etl"})
    read = job_infrastructure(kubernetes.model_dump())
    assert read == kubernetes_infrastructure(kubernetes.job_manifest, "etl", kubernetes.env)
    process = job_infrastructure(
        {"command": "python -m x", "working_dir": "/srv", "env": {"A": "1"}}
    )
    assert process == process_infrastructure("python -m x", "/srv", {"A": "1"})


def test_older_and_windows_ways_to_unconfine_a_pod_are_seen():
    configuration = prepared("kubernetes", {"image": "python:3.11", "namespace": "prefect"})
    manifest = copy.deepcopy(configuration.job_manifest)
    manifest["spec"]["template"]["metadata"]["annotations"] = {
        "container.apparmor.security.beta.kubernetes.io/prefect-job": "unconfined",
        "seccomp.security.alpha.kubernetes.io/pod": "unconfined",
        "team": "data",
    }
    pod_spec = manifest["spec"]["template"]["spec"]
    pod_spec["hostUsers"] = True  # the default, said out loud
    pod_spec["securityContext"] = {"windowsOptions": {"hostProcess": True}}
    infrastructure = kubernetes_infrastructure(manifest, "prefect", {})
    (container,) = infrastructure.containers
    assert container.unconfined == ["apparmor", "seccomp"]
    assert container.privileged
    assert infrastructure.unrecognized == []


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
DOCKER_KEYS = st.sampled_from(
    ["image", "privileged", "volumes", "network_mode", "mem_limit", "env", "name", "command"]
)
CREATE_KEYS = st.sampled_from(
    [
        "privileged",
        "mounts",
        "volumes",
        "devices",
        "cap_add",
        "security_opt",
        "user",
        "tmpfs",
        "pid_mode",
        "ipc_mode",
        "userns_mode",
        "environment",
        "entrypoint",
        "image",
        "runtime",
    ]
)
POD_KEYS = st.sampled_from(
    [
        "containers",
        "initContainers",
        "ephemeralContainers",
        "volumes",
        "securityContext",
        "hostNetwork",
        "hostPID",
        "hostUsers",
        "serviceAccountName",
        "serviceAccount",
        "nodeName",
    ]
)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(
    st.dictionaries(DOCKER_KEYS, json_values),
    st.one_of(json_values, st.dictionaries(CREATE_KEYS, json_values)),
)
def test_any_docker_job_is_read_without_an_error(job, create_kwargs):
    """Whatever a deployment's job variables hold, the worker gets an answer, never an
    exception (a run it cannot describe is still judged)."""
    assert docker_infrastructure({**job, "container_create_kwargs": create_kwargs}).kind == "docker"


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(
    st.dictionaries(
        POD_KEYS,
        json_values
        | st.lists(
            st.dictionaries(
                st.sampled_from(
                    [
                        "name",
                        "image",
                        "securityContext",
                        "env",
                        "args",
                        "resources",
                        "hostPath",
                        "emptyDir",
                        "volumeDevices",
                    ]
                ),
                json_values,
            ),
            max_size=2,
        ),
    ),
    json_values,
)
def test_any_kubernetes_manifest_is_read_without_an_error(pod_spec, metadata):
    manifest = {"metadata": metadata, "spec": {"template": {"spec": pod_spec}}}
    assert kubernetes_infrastructure(manifest, None, {}).kind == "kubernetes"
