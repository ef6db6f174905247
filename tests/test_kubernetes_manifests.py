"""deploy/kubernetes/ applied to a real cluster, as deploy/README.md tells a user.

A real single-node Kubernetes (tests/kube_support.py) runs the Deployment: the project's
image as the governed-process worker and OPA as its sidecar, both with the probes the
manifests define. The Secret and the policy ConfigMap are made with the README's own
``kubectl create`` commands (the ConfigMap's verbatim; the Secret's keys, with this test's
values), then ``kubectl apply -k`` applies an overlay of deploy/kubernetes/ that changes only
what this node and this test need (``ADAPTATIONS``). The worker decides a real Prefect
server's runs through the sidecar: an allowed run completes (its marker appears), a refused
one is ``Refused`` (its marker stays absent), OPA's decision log names both, and the lineage
in the test PostgreSQL holds both decisions, made by engine ``opa``, signed with the key
the Secret gave the worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shlex
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from prefect_governance.cli.local import free_port
from prefect_governance.lineage.store import LineageStore
from prefect_governance.testing import wait_final, wait_outcomes
from prefect_governance.worker.blocks import GovernanceAgent
from tests.agents import TEST_AGENT_KEYS, asave_agent
from tests.conftest import ROOT, missing
from tests.kube_support import KubeCluster
from tests.lineage_keys import LINEAGE_ENV
from tests.pg_support import scratch_database
from tests.stack_support import (
    flow_run_summary,
    polled_pool,
    shared_directory,
    start_allowed_and_refused,
)

pytestmark = pytest.mark.e2e

K8S = ROOT / "deploy" / "kubernetes"
DEPLOYMENT = yaml.safe_load((K8S / "deployment.yaml").read_text())
POD = DEPLOYMENT["spec"]["template"]["spec"]
NAME = DEPLOYMENT["metadata"]["name"]
SELECTOR = ",".join(f"{k}={v}" for k, v in DEPLOYMENT["spec"]["selector"]["matchLabels"].items())
AGENT = "k8s-manifest-etl"

# What the overlay changes, and why (each is a JSON patch on the Deployment, below).
ADAPTATIONS = {
    "images": "the worker's image is the locally built one (kustomize `images:`), and both "
    "images are imported into the node with imagePullPolicy Never: no registry is reachable",
    "hostNetwork": "this node has no pod network: the pod shares the machine's loopback, "
    "where the Prefect server, PostgreSQL and the API server listen",
    "ports": "with host networking the pod's ports are the machine's, which other tests and "
    "sessions share: OPA's 8181/8282 and the worker's 8080 become free ports (the named "
    "ports the probes use follow)",
    "PREFECT_API_URL": "the test's Prefect server on 127.0.0.1, not `prefect-server:4200`",
    "PREFECT_WORK_POOL": "a pool of this test's own",
    "flows": "a governed-process worker runs the flow code in its own container: the "
    "directory holding examples/flows.py (and the runs' markers) is a hostPath at the same "
    "path",
}


def readme_commands() -> list[list[str]]:
    """The kubectl commands of deploy/README.md's Kubernetes section, as arguments."""
    text = (ROOT / "deploy" / "README.md").read_text()
    section = text.split("\n## Kubernetes\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = [line for line in joined.splitlines() if line.strip() and not line.startswith("#")]
    return [shlex.split(line, comments=True) for line in lines]


def readme_command(*prefix: str) -> list[str]:
    found = [c for c in readme_commands() if c[: len(prefix)] == list(prefix)]
    assert len(found) == 1, f"deploy/README.md has one `{' '.join(prefix)}` command"
    return found[0]


def index(items: list[dict[str, Any]], name: str) -> int:
    return next(i for i, item in enumerate(items) if item["name"] == name)


def arg_index(args: list[str], flag: str) -> int:
    return next(i for i, arg in enumerate(args) if arg.startswith(f"{flag}="))


def overlay_patches(api_url: str, pool: str, flows: Path) -> tuple[list[dict[str, Any]], int]:
    """The JSON patches of ``ADAPTATIONS`` against deploy/kubernetes/deployment.yaml (by
    name, so a reordered manifest still patches what it means); and OPA's port."""
    containers = POD["containers"]
    w, o = index(containers, "worker"), index(containers, "opa")
    worker, opa = containers[w], containers[o]
    spec = "/spec/template/spec"
    wpath, opath = f"{spec}/containers/{w}", f"{spec}/containers/{o}"
    opa_port, diagnostic, health = free_port(), free_port(), free_port()
    env = {"PREFECT_API_URL": api_url, "PREFECT_WORK_POOL": pool}
    env["PREFECT_GOVERNANCE_OPA_URL"] = f"http://127.0.0.1:{opa_port}"
    patches: list[dict[str, Any]] = [
        {"op": "add", "path": f"{spec}/hostNetwork", "value": True},
        {"op": "replace", "path": f"{wpath}/imagePullPolicy", "value": "Never"},
        {"op": "replace", "path": f"{opath}/imagePullPolicy", "value": "Never"},
        *(
            {"op": "replace", "path": f"{wpath}/env/{index(worker['env'], k)}/value", "value": v}
            for k, v in env.items()
        ),
        {
            "op": "add",
            "path": f"{wpath}/env/-",
            "value": {"name": "PREFECT_WORKER_WEBSERVER_PORT", "value": str(health)},
        },
        {
            "op": "replace",
            "path": f"{wpath}/ports/{index(worker['ports'], 'health')}/containerPort",
            "value": health,
        },
        {
            "op": "replace",
            "path": f"{opath}/args/{arg_index(opa['args'], '--addr')}",
            "value": f"--addr=127.0.0.1:{opa_port}",
        },
        {
            "op": "replace",
            "path": f"{opath}/args/{arg_index(opa['args'], '--diagnostic-addr')}",
            "value": f"--diagnostic-addr=0.0.0.0:{diagnostic}",
        },
        {
            "op": "replace",
            "path": f"{opath}/ports/{index(opa['ports'], 'opa-diagnostic')}/containerPort",
            "value": diagnostic,
        },
        {
            "op": "add",
            "path": f"{spec}/volumes/-",
            "value": {"name": "flows", "hostPath": {"path": str(flows), "type": "Directory"}},
        },
        {
            "op": "add",
            "path": f"{wpath}/volumeMounts/-",
            "value": {"name": "flows", "mountPath": str(flows)},
        },
    ]
    return patches, opa_port


def write_overlay(directory: Path, image: str, patches: list[dict[str, Any]]) -> Path:
    """A kustomization over deploy/kubernetes/: the local image and the patches."""
    name, _, tag = image.rpartition(":")
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(K8S, directory)],  # kustomize takes no absolute root
        "images": [{"name": "prefect-governance", "newName": name, "newTag": tag}],
        "patches": [
            {
                "target": {"group": "apps", "version": "v1", "kind": "Deployment", "name": NAME},
                "patch": yaml.safe_dump(patches),
            }
        ],
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return directory


def kubectl(cluster: KubeCluster, *args: str, timeout: float = 120) -> str:
    """kubectl from the cluster's bin, run where the README's relative paths resolve."""
    done = subprocess.run(
        [str(cluster.bin / "kubectl"), "--kubeconfig", str(cluster.kubeconfig), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr[-3000:]}"
    return done.stdout


def secret_keys_the_manifest_needs() -> set[str]:
    return {
        env["valueFrom"]["secretKeyRef"]["key"]
        for container in POD["containers"]
        for env in container.get("env", [])
        if "secretKeyRef" in env.get("valueFrom", {})
        and not env["valueFrom"]["secretKeyRef"].get("optional")
    }


@pytest.fixture(scope="module")
def kube(kube_cluster: KubeCluster, flow_image: str) -> KubeCluster:
    """The cluster with the worker's image and the manifest's OPA image on its node."""
    opa_image = POD["containers"][index(POD["containers"], "opa")]["image"]
    for image in (flow_image, opa_image):
        try:
            kube_cluster.import_image(image)
        except subprocess.CalledProcessError as exc:
            missing(
                f"the image {image} for the node ({exc.stderr!r}; scripts/docker.sh image, "
                "scripts/compose.sh images)"
            )
    return kube_cluster


@pytest.fixture
def lineage_db(postgres: Any) -> Iterator[str]:
    with scratch_database(postgres.url, "k8slineage") as url:
        yield url


def pod_of(kube: KubeCluster) -> dict[str, Any]:
    pods = kube.get("pods", "-l", SELECTOR)["items"]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    return pods[0]


def diagnose(kube: KubeCluster) -> str:
    """What the pod and its containers said, for assertion messages."""
    out = [kube.kubectl("describe", "pods", "-l", SELECTOR, check=False)[-3000:]]
    for container in ("worker", "opa"):
        out.append(
            kube.kubectl("logs", "-l", SELECTOR, "-c", container, "--tail", "60", check=False)
        )
    return "\n".join(out)


def test_the_manifests_run_the_worker_with_its_opa_sidecar(
    prefect_server: Any, kube: KubeCluster, flow_image: str, lineage_db: str, tmp_path: Path
) -> None:

    timings: dict[str, float] = {}
    started = time.monotonic()
    pool = f"k8s-manifests-{uuid.uuid4().hex[:8]}"
    with shared_directory("governance-k8s-") as flows:
        markers = {name: flows / f"marker-{name}" for name in ("allowed", "refused")}
        # The README's Secret: its keys, with this test's values; the manifest needs them all.
        values = {
            "lineage-url": lineage_db,
            "opa-token": secrets.token_hex(24),
            # The test server checks no auth: the key is there as the README makes it.
            "prefect-api-auth-string": "admin:unchecked-by-the-test-server",
            "agent-keys": TEST_AGENT_KEYS,
            "lineage-key": LINEAGE_ENV["PREFECT_GOVERNANCE_LINEAGE_KEY"],
            "lineage-key-id": LINEAGE_ENV["PREFECT_GOVERNANCE_LINEAGE_KEY_ID"],
        }
        secret = readme_command("kubectl", "create", "secret")
        literals = [a.split("=", 2)[1] for a in secret if a.startswith("--from-literal=")]
        assert set(literals) == set(values), "the test makes the Secret the README makes"
        assert secret_keys_the_manifest_needs() <= set(literals), "the README's Secret suffices"
        patches, opa_port = overlay_patches(prefect_server.api_url, pool, flows)
        overlay = write_overlay(tmp_path / "overlay", flow_image, patches)
        try:
            kubectl(
                kube,
                *(a for a in secret[1:] if not a.startswith("--from-literal=")),
                *(f"--from-literal={k}={values[k]}" for k in literals),
            )
            kubectl(kube, *readme_command("kubectl", "create", "configmap")[1:])
            apply = readme_command("kubectl", "apply")
            assert apply[1:] == ["apply", "-k", "deploy/kubernetes"]
            kubectl(kube, "apply", "-k", str(overlay))

            # Both containers Ready through the manifests' own probes, none restarted.
            kubectl(kube, "rollout", "status", f"deployment/{NAME}", "--timeout=150s", timeout=170)
            timings["ready"] = time.monotonic() - started
            pod = pod_of(kube)
            statuses = {s["name"]: s for s in pod["status"]["containerStatuses"]}
            assert set(statuses) == {"worker", "opa"}
            for name, status in statuses.items():
                ready = status["ready"] is True and status["restartCount"] == 0
                assert ready, f"{name}: {status}\n{diagnose(kube)}"
            spec = pod["spec"]
            probes = {c["name"]: c["readinessProbe"] for c in spec["containers"]}
            assert probes["worker"]["httpGet"]["path"] == "/health"
            assert probes["opa"]["httpGet"]["port"] == "opa-diagnostic"

            async def run() -> dict[str, Any]:
                await asave_agent(
                    GovernanceAgent(
                        id=AGENT,
                        owner="data@example.com",
                        trust_scope=[pool],
                        capabilities=["read:warehouse"],
                    ),
                    AGENT,
                )
                polled = await polled_pool(pool, 90)
                assert polled == "governed-process", "the pod's worker made and polled its pool"
                runs = await start_allowed_and_refused(pool, pool, AGENT, flows, markers)
                final = await wait_final(list(runs.values()), timeout=150)
                return {name: final[run_id] for name, run_id in runs.items()}

            final = asyncio.run(run())
            timings["runs"] = time.monotonic() - started - timings["ready"]
            allowed, refused = final["allowed"], final["refused"]
            context = f"\n{flow_run_summary(allowed)}\n{diagnose(kube)}"
            assert allowed.state.is_completed(), context
            assert markers["allowed"].read_text() == "loaded 10 rows into orders\n"
            assert refused.state.is_cancelled() and refused.state.name == "Refused", context
            assert 'capability "delete:warehouse" is not granted' in refused.state.message
            assert not markers["refused"].exists(), "a refused run never executes"

            # The sidecar decided both: its decision log names each run.
            opa_log = kube.kubectl("logs", pod["metadata"]["name"], "-c", "opa")
            for name, flow_run in final.items():
                assert str(flow_run.id) in opa_log, f"the sidecar decided the {name} run"

            # The lineage in the test PostgreSQL: both decisions, by OPA, verifiable.
            store = LineageStore(lineage_db)
            try:
                asyncio.run(wait_outcomes(store, [allowed.id], timeout=60))
                decisions = {
                    name: [
                        e for e in store.recent(50, flow_run_id=str(r.id)) if e.kind == "decision"
                    ]
                    for name, r in final.items()
                }
                assert [d.verdict for d in decisions["allowed"]] == ["allowed"]
                assert [d.verdict for d in decisions["refused"]] == ["refused"]
                assert {d.engine for ds in decisions.values() for d in ds} == {"opa"}
                assert store.verify() == [], "the lineage's chains are whole"
                unvouched = store.unvouched_chains()
                assert not unvouched, f"signed with the Secret's lineage key: {unvouched}"
            finally:
                store.dispose()
        finally:
            kube.kubectl("delete", "-k", str(overlay), "--wait=true", "--timeout=90s", check=False)
            kube.kubectl("delete", "secret", "governance-worker", check=False)
            kube.kubectl("delete", "configmap", "governance-policies", check=False)
            print(f"manifests timings (s): {json.dumps(timings)}; opa port {opa_port}")
