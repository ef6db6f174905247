"""Write the infrastructure examples (policies/examples/{allowed,refused}-*) from the
`allowed` example, what the extractors read of each job, and the decision OPA gives.

Usage: python scripts/infrastructure_examples.py OPA_BINARY (then review the diff).
"""

import copy
import json
import subprocess
import sys
from pathlib import Path

from prefect_governance.core.infrastructure import docker_infrastructure, kubernetes_infrastructure
from prefect_governance.core.models import InfrastructureConstraint, PolicyInput

ROOT = Path("policies/examples")
BASE = json.loads((ROOT / "allowed" / "input.json").read_text())
DIGEST = "sha256:" + "0123456789abcdef" * 4


def docker(**job):
    base = {
        "image": "python:3.11",
        "name": "quiet-otter",
        "env": {"PREFECT_API_URL": "http://prefect-server:4200/api"},
        "network_mode": None,
        "privileged": False,
        "volumes": [],
        "container_create_kwargs": None,
    }
    return docker_infrastructure({**base, **job})


def pod(spec=None, container=None, namespace="prefect"):
    c = {
        "name": "prefect-job",
        "image": f"ghcr.io/acme/etl@{DIGEST}",
        "args": ["python", "-m", "prefect_governance.gate"],
        "env": [{"name": "PREFECT_API_URL", "value": "http://127.0.0.1:4200/api"}],
        "resources": {"limits": {"cpu": "1", "memory": "1Gi"}},
        **(container or {}),
    }
    manifest = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"namespace": namespace, "generateName": "quiet-otter-"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "serviceAccountName": "prefect-runs",
                    "containers": [c],
                    **(spec or {}),
                }
            },
        },
    }
    return kubernetes_infrastructure(manifest, namespace, {})


EXAMPLES = {
    "allowed-docker-infrastructure": (
        docker(network_mode="host", volumes=["/srv/etl/out:/out"]),
        {"registries": ["docker.io"], "host_paths": ["/srv/etl"], "host_network": True},
        "governed-docker",
    ),
    "allowed-kubernetes-infrastructure": (
        pod(
            spec={"volumes": [{"name": "out", "hostPath": {"path": "/srv/etl/out"}}]},
            container={
                "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False}
            },
        ),
        {
            "registries": ["ghcr.io"],
            "require_digest": True,
            "require_non_root": True,
            "host_paths": ["/srv/etl"],
            "namespaces": ["prefect"],
            "service_accounts": ["prefect-runs"],
        },
        "governed-kubernetes",
    ),
    "refused-privileged-container": (
        docker(container_create_kwargs={"privileged": True, "cap_add": ["SYS_ADMIN"]}),
        None,
        "governed-docker",
    ),
    "refused-privilege-escalation": (
        pod(
            spec={
                "initContainers": [
                    {
                        "name": "setup",
                        "image": f"ghcr.io/acme/etl@{DIGEST}",
                        "securityContext": {"allowPrivilegeEscalation": True},
                    }
                ]
            }
        ),
        None,
        "governed-kubernetes",
    ),
    "refused-image-registry": (
        docker(image="quay.io/evil/miner:latest"),
        {"registries": ["docker.io", "localhost:5000"]},
        "governed-docker",
    ),
    "refused-image-digest": (
        docker(image="localhost:5000/etl:1.2"),
        {"registries": ["localhost:5000"], "require_digest": True},
        "governed-docker",
    ),
    "refused-host-path": (
        docker(
            container_create_kwargs={
                "mounts": [
                    {"Type": "bind", "Source": "/var/run/docker.sock", "Target": "/run/docker.sock"}
                ]
            },
            volumes=["/srv/etl/../../etc:/host-etc:ro"],
        ),
        {"host_paths": ["/srv/etl"]},
        "governed-docker",
    ),
    "refused-host-namespace": (
        pod(spec={"hostPID": True, "hostNetwork": True}),
        {"host_network": True},
        "governed-kubernetes",
    ),
    "refused-kubernetes-scope": (
        pod(namespace="kube-system", spec={"serviceAccountName": "cluster-admin"}),
        {"namespaces": ["prefect"], "service_accounts": ["prefect-runs"]},
        "governed-kubernetes",
    ),
    "refused-run-as-root": (
        docker(container_create_kwargs={"user": "root"}),
        {"require_non_root": True},
        "governed-docker",
    ),
    "refused-unrecognized-setting": (
        docker(container_create_kwargs={"runtime": "runc-unsafe", "labels": {"a": "b"}}),
        None,
        "governed-docker",
    ),
}

opa = sys.argv[1]
for name, (infra, constraint, pool_type) in EXAMPLES.items():
    doc = copy.deepcopy(BASE)
    doc["envelope"]["infrastructure"] = infra.model_dump(mode="json")
    doc["envelope"]["work_pool"]["type"] = pool_type
    if constraint is not None:
        doc["agent"]["constraints"]["infrastructure"] = InfrastructureConstraint(
            **constraint
        ).model_dump(mode="json")
    doc = PolicyInput.model_validate(doc).model_dump(mode="json")
    out = ROOT / name
    out.mkdir(exist_ok=True)
    (out / "input.json").write_text(json.dumps(doc, indent=2) + "\n")
    run = subprocess.run(
        [
            opa,
            "eval",
            "-d",
            "policies/prefect",
            "-i",
            str(out / "input.json"),
            "-f",
            "json",
            "data.prefect.governance.decision",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(run.stdout)["result"][0]["expressions"][0]["value"]
    expected = {k: result[k] for k in ("allow", "deny", "warn", "annotations", "reasons", "grants")}
    (out / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
    print(name, expected["allow"], *expected["deny"], sep="\n  ")
