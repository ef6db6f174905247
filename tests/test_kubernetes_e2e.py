"""The governed-kubernetes worker end to end: a real Prefect server, a real Kubernetes
control plane and node (tests/kube_support.py), real Jobs in real pods.

The flow-run image is the project's (Python, Prefect and this package), imported into
the node's containerd. Runs write a marker file through a host path this test owns, so
a refused run is proven not to have executed; the API server is asked which Jobs exist,
so a refused run is proven to have created none.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate

from prefect_governance.core.handoff import GATE_COMMAND, GATE_MODULE
from prefect_governance.core.settings import WORKER_SECRETS
from prefect_governance.core.trust import TrustWeights
from prefect_governance.testing import Harness, deploy_example, wait_final
from prefect_governance.worker.blocks import GovernanceAgent
from tests.agents import harness
from tests.kube_support import KubeCluster

pytestmark = pytest.mark.e2e

prefect_kubernetes = pytest.importorskip("prefect_kubernetes")
from prefect_kubernetes.worker import KubernetesWorker  # noqa: E402

from prefect_governance.worker.kubernetes import GovernedKubernetesWorker  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
AGENT = "kube-etl"
FLOW_RUN_LABEL = "prefect.io/flow-run-id"


@dataclass
class Observed:
    flow_run: Any
    marker: Path
    jobs: list[dict[str, Any]]
    events: list[Any]
    seconds: float

    @property
    def executed(self) -> bool:
        return self.marker.exists()

    def count(self, kind: str) -> int:
        return sum(1 for e in self.events if e.kind == kind)


def kube_template(
    worker: type[KubernetesWorker], image: str, cluster: KubeCluster, mounts: Mapping[str, Path]
) -> dict[str, Any]:
    """A pool's template for this node: host networking, the local image (never pulled),
    the API server on loopback for in-cluster clients, and the host paths the pool owner
    mounts (``volumes`` / ``volume_mounts`` / ``security_context`` are job variables, so a
    deployment can ask for more; the policy decides)."""
    template = worker.get_default_base_job_template()
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    pod["hostNetwork"] = True
    pod["volumes"] = "{{ volumes }}"
    container = pod["containers"][0]
    container["volumeMounts"] = "{{ volume_mounts }}"
    container["securityContext"] = "{{ security_context }}"
    props = template["variables"]["properties"]
    props["volumes"] = {
        "type": "array",
        "default": [
            {"name": name, "hostPath": {"path": str(path), "type": "Directory"}}
            for name, path in mounts.items()
        ],
    }
    props["volume_mounts"] = {
        "type": "array",
        "default": [
            {"name": name, "mountPath": str(path), "readOnly": name == "code"}
            for name, path in mounts.items()
        ],
    }
    props["security_context"] = {"type": "object", "default": {}}
    props["image"]["default"] = image
    props["image_pull_policy"]["default"] = "Never"
    props["env"]["default"] = cluster.in_cluster_env()
    return template


async def _create_pool(name: str, worker_type: str, template: dict[str, Any]) -> None:
    async with get_client() as client:
        await client.create_work_pool(
            WorkPoolCreate(name=name, type=worker_type, base_job_template=template),
            overwrite=True,
        )


def _jobs(cluster: KubeCluster, flow_run_id: UUID) -> list[dict[str, Any]]:
    """The Jobs the API server holds for this flow run (any namespace)."""
    found = cluster.get("jobs", "--all-namespaces", "-l", f"{FLOW_RUN_LABEL}={flow_run_id}")
    return found["items"]


@pytest.fixture(scope="module")
def kube(kube_cluster: KubeCluster, flow_image: str) -> KubeCluster:
    kube_cluster.import_image(flow_image)
    return kube_cluster


@pytest.fixture(scope="module")
def governed_pool(prefect_server, kube, flow_image, tmp_path_factory):
    """A governed-kubernetes pool and its worker (reconciling often), on the real node."""
    tmp = tmp_path_factory.mktemp("kube")
    # Outside pytest's directory (root's only): the image runs as its own user.
    markers = Path(tempfile.mkdtemp(prefix="kube-markers-"))
    markers.chmod(0o777)
    try:
        with harness(prefect_server, tmp, lineage_block="kube-lineage") as gov:
            asyncio.run(_setup(gov, kube, flow_image, markers))
            worker = _start(gov, "gov-kube", kube)
            yield gov, markers, worker
    finally:
        shutil.rmtree(markers, ignore_errors=True)


WORKER_ENV = {
    # Often and at once, so a double settlement would show within the test.
    "PREFECT_GOVERNANCE_RECONCILE_INTERVAL": "1",
    "PREFECT_GOVERNANCE_RECONCILE_GRACE": "1",
}


def _start(gov: Harness, pool: str, kube: KubeCluster, **env: str):
    return gov.start_worker(
        pool,
        extra_env={"KUBECONFIG": str(kube.kubeconfig), **WORKER_ENV, **env},
        log=gov.workdir / f"worker-{pool}-{time.monotonic_ns()}.log",
    )


async def _setup(gov: Harness, kube: KubeCluster, image: str, markers: Path) -> None:
    await gov.save_lineage()
    await gov.save_agent(
        GovernanceAgent(
            id=AGENT,
            owner="data@example.com",
            trust_scope=["gov-kube", "gov-kube-restart"],
            capabilities=["read:warehouse"],
            # Many runs, some refused on purpose: keep trust still (no trust-rule refusals).
            trust_weights=TrustWeights(
                completed=0, failed=0, crashed=0, refused=0, warned=0, memory_rejected=0
            ),
            # What its runs may start (rules/infrastructure): this node's way of running
            # pods (host networking), and the pool's two host paths; nothing privileged.
            constraints={
                "infrastructure": {
                    "host_network": True,
                    "host_paths": [str(EXAMPLES), str(markers)],
                }
            },
        )
    )
    mounts = {"code": EXAMPLES, "markers": markers}
    template = kube_template(GovernedKubernetesWorker, image, kube, mounts)
    props = template["variables"]["properties"]
    props["lineage_store"]["default"] = gov.lineage_block
    for pool in ("gov-kube", "gov-kube-restart"):
        await _create_pool(pool, GovernedKubernetesWorker.type, template)
    await _create_pool("stock-kube", KubernetesWorker.type, stock_template(image, kube, mounts))


def stock_template(image: str, kube: KubeCluster, mounts: Mapping[str, Path]) -> dict[str, Any]:
    """The stock worker's template on the same node (Prefect's command in the container)."""
    template = kube_template(KubernetesWorker, image, kube, mounts)
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"][
        "containers"
    ][0]
    container["command"] = ["prefect", "flow-run", "execute"]  # not the image's entrypoint
    container["args"] = []
    return template


async def _run(
    kube: KubeCluster,
    pool: str,
    name: str,
    markers: Path,
    job_variables: Mapping[str, Any],
    parameters: Mapping[str, Any] | None = None,
) -> tuple[UUID, Path, float]:
    """Deploy the example flow to the pool and start a run writing marker ``name``."""
    deployment = await deploy_example(name, pool, dict(job_variables))
    marker = markers / name
    started = time.monotonic()
    async with get_client() as client:
        run = await client.create_flow_run_from_deployment(
            deployment, parameters={"rows": 10, **(parameters or {}), "marker": str(marker)}
        )
    return run.id, marker, started


async def _observe(
    kube: KubeCluster, gov: Harness, runs: dict[str, tuple[UUID, Path, float]], timeout: float
) -> dict[str, Observed]:
    final = await wait_final([run_id for run_id, _, _ in runs.values()], timeout=timeout)
    ended = time.monotonic()
    observed = {}
    for name, (run_id, marker, started) in runs.items():
        observed[name] = Observed(
            flow_run=final[run_id],
            marker=marker,
            jobs=_jobs(kube, run_id),
            events=list(gov.store.recent(100, flow_run_id=str(run_id))),
            seconds=ended - started,
        )
    return observed


def _wait_outcomes(gov: Harness, flow_run_id: UUID, timeout: float = 60) -> list[Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = list(gov.store.recent(100, flow_run_id=str(flow_run_id)))
        if any(e.kind == "outcome" for e in events):
            return events
        time.sleep(0.5)
    raise AssertionError(f"no outcome recorded for {flow_run_id} in {timeout} s")


READ = {"agent": AGENT, "capabilities": ["read:warehouse"]}
SCENARIOS: dict[str, dict[str, Any]] = {
    "allowed": READ,
    "refused": {"agent": AGENT, "capabilities": ["delete:warehouse"]},
    "fails": READ,
}
PARAMETERS: dict[str, dict[str, Any]] = {"fails": {"fail": True}}


@pytest.fixture(scope="module")
def scenarios(governed_pool, kube) -> dict[str, Observed]:
    gov, markers, _ = governed_pool

    async def go() -> dict[str, Observed]:
        runs = {
            name: await _run(
                kube, "gov-kube", f"kube-{name}", markers, variables, PARAMETERS.get(name)
            )
            for name, variables in SCENARIOS.items()
        }
        return await _observe(kube, gov, runs, timeout=300)

    observed = asyncio.run(go())
    for seen in observed.values():
        if seen.flow_run.state and seen.flow_run.state.name != "Refused":
            seen.events = _wait_outcomes(gov, seen.flow_run.id)
    time.sleep(3)  # reconcile passes (every second here) that could settle a run again
    for seen in observed.values():
        seen.events = list(gov.store.recent(100, flow_run_id=str(seen.flow_run.id)))
    return observed


def test_an_allowed_run_completes_in_a_jobs_pod_through_the_gate(scenarios, kube):
    run = scenarios["allowed"]
    assert run.flow_run.state.is_completed(), run.flow_run.state
    assert run.marker.read_text() == "loaded 10 rows into orders\n"
    (job,) = run.jobs
    # Prefect's final state may come before the Job's own status: wait for it.
    job = kube.wait(
        lambda: next(
            (j for j in _jobs(kube, run.flow_run.id) if j["status"].get("succeeded")), None
        ),
        60,
        "the Job to succeed",
    )
    (container,) = job["spec"]["template"]["spec"]["containers"]
    python, isolated, dash_m, module, *trusted = container["command"]
    assert (python, isolated, dash_m, module) == ("python", "-I", "-m", GATE_MODULE)
    assert trusted[0] == "--trusted-key" and container.get("args", []) == []
    names = {entry["name"] for entry in container["env"]}
    assert {"PREFECT_GOVERNANCE_ENVELOPE", "PREFECT_GOVERNANCE_DECISION_ID"} <= names
    assert names.isdisjoint(WORKER_SECRETS), "the worker's secrets reach no Job"
    labels = run.flow_run.labels
    assert labels["governance.decision"] == "allowed"
    assert labels["prefect.worker.type"] == "governed-kubernetes"


def test_an_allowed_runs_outcome_is_settled_once_from_its_final_state(scenarios):
    for name, state in (("allowed", "COMPLETED"), ("fails", "FAILED")):
        run = scenarios[name]
        assert run.count("decision") == 1 and run.count("outcome") == 1, (name, run.events)
        (outcome,) = [e for e in run.events if e.kind == "outcome"]
        assert outcome.state == state
    assert scenarios["fails"].executed


def test_a_refused_run_creates_no_job(scenarios):
    run = scenarios["refused"]
    assert run.flow_run.state.name == "Refused", run.flow_run.state
    assert not run.executed
    assert run.jobs == [], "the API server lists no Job for a refused run"
    assert run.count("decision") == 1 and run.count("outcome") == 0


@pytest.mark.parametrize(
    "variables",
    [
        pytest.param({"security_context": {"privileged": True}}, id="privileged"),
        pytest.param(
            {
                "volumes": [{"name": "etc", "hostPath": {"path": "/etc"}}],
                "volume_mounts": [{"name": "etc", "mountPath": "/host-etc"}],
            },
            id="host-path-outside-the-allow-list",
        ),
    ],
)
def test_a_run_asking_for_more_of_the_node_is_refused(governed_pool, kube, variables):
    gov, markers, _ = governed_pool
    name = f"kube-{next(iter(variables))}-{time.monotonic_ns()}"

    async def go() -> Observed:
        run = await _run(kube, "gov-kube", name, markers, {**READ, **variables})
        return (await _observe(kube, gov, {name: run}, timeout=120))[name]

    run = asyncio.run(go())
    assert run.flow_run.state.name == "Refused", run.flow_run.state
    assert not run.executed and run.jobs == []


def test_a_run_is_settled_once_after_its_worker_stopped(governed_pool, kube):
    """The worker returns once the Job exists; stopped then, the run goes on in its pod,
    and the pool's next worker settles it from Prefect's final state, exactly once."""
    gov, markers, _ = governed_pool
    # A short heartbeat: once stopped, it soon counts as offline, and its runs as orphans.
    first = _start(gov, "gov-kube-restart", kube, PREFECT_WORKER_HEARTBEAT_SECONDS="2")

    async def go() -> tuple[UUID, Path, float]:
        return await _run(
            kube,
            "gov-kube-restart",
            "kube-restart",
            markers,
            READ,
            {"seconds": 8},
        )

    run_id, marker, _ = asyncio.run(go())
    kube.wait(lambda: _jobs(kube, run_id), 120, "the Job to exist")
    gov.stop_worker(first)  # the run is in its pod; nobody watches it
    final = asyncio.run(wait_final([run_id], timeout=180))[run_id]
    assert final.state.is_completed(), final.state
    assert marker.exists()
    assert [e.kind for e in gov.store.recent(100, flow_run_id=str(run_id))] == ["decision"]
    second = _start(gov, "gov-kube-restart", kube)
    try:
        events = _wait_outcomes(gov, run_id, timeout=150)
        time.sleep(3)  # more reconcile passes
        events = list(gov.store.recent(100, flow_run_id=str(run_id)))
    finally:
        gov.stop_worker(second)
    outcomes = [e for e in events if e.kind == "outcome"]
    assert len(outcomes) == 1 and outcomes[0].state == "COMPLETED", events


def test_a_stock_worker_on_a_governed_pool_starts_nothing(governed_pool, kube):
    gov, markers, _ = governed_pool
    name = "kube-stock-on-governed"

    async def setup() -> None:  # the governed pool's very template, another pool
        async with get_client() as client:
            pool = await client.read_work_pool("gov-kube")
        await _create_pool("gov-kube-stolen", pool.type, pool.base_job_template)

    asyncio.run(setup())
    stock = gov.start_worker(
        "gov-kube-stolen",
        worker_type=KubernetesWorker.type,
        extra_env={"KUBECONFIG": str(kube.kubeconfig)},
    )
    try:

        async def go() -> Observed:
            run = await _run(kube, "gov-kube-stolen", name, markers, READ)
            return (await _observe(kube, gov, {name: run}, timeout=180))[name]

        run = asyncio.run(go())
    finally:
        gov.stop_worker(stock)
    assert not run.executed
    assert not run.flow_run.state.is_completed(), run.flow_run.state
    (job,) = run.jobs  # the stock worker made one: its container cannot start
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert shlex.join(command) == GATE_COMMAND


def test_stock_and_governed_side_by_side(governed_pool, kube, record_property):
    """One run each, the same flow on the same node, one after the other: from the run's
    creation to its final state under the stock worker and under the governed one."""
    gov, markers, _ = governed_pool
    stock = gov.start_worker(
        "stock-kube",
        worker_type=KubernetesWorker.type,
        extra_env={"KUBECONFIG": str(kube.kubeconfig)},
    )

    async def timed(pool: str) -> Observed:
        variables = READ if pool.startswith("gov") else {}
        run = await _run(kube, pool, f"{pool}-timed", markers, variables)
        return (await _observe(kube, gov, {pool: run}, timeout=240))[pool]

    try:
        observed = {pool: asyncio.run(timed(pool)) for pool in ("stock-kube", "gov-kube")}
    finally:
        gov.stop_worker(stock)
    for pool, run in observed.items():
        assert run.flow_run.state.is_completed(), (pool, run.flow_run.state)
        assert run.executed
    figures = {pool: round(run.seconds, 2) for pool, run in observed.items()}
    figures["ratio"] = round(figures["gov-kube"] / figures["stock-kube"], 2)
    record_property("kubernetes_run_seconds", json.dumps(figures))
    print(f"\nKubernetes run, created to final (s): {figures}", file=sys.stderr)
