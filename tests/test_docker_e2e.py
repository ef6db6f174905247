"""The governed-docker worker end to end: a real Prefect server, the real Docker engine.

The image is the project's, built locally (``bash scripts/docker.sh image``); containers use
host networking and reach the server on 127.0.0.1. The flow code reaches the container by a
mounted directory, and the flow writes its marker through another, so a run that did not
execute is proven not to have: its marker stays absent and the engine lists no container
labelled with its flow run id (prefect-docker labels every container it creates).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate

from prefect_governance.core.trust import TrustWeights
from prefect_governance.testing import Harness, deploy_example
from prefect_governance.worker.blocks import GovernanceAgent
from tests.agents import harness
from tests.conftest import ROOT, missing

docker = pytest.importorskip("docker", reason="prefect-governance[docker] is not installed")
from prefect_governance.worker.docker import GovernedDockerWorker  # noqa: E402

pytestmark = pytest.mark.e2e

IMAGE = "prefect-governance:test"
RUN_LABEL = "io.prefect.flow-run-id"
GOVERNED = "gov-docker"
STOCK_ON_GOVERNED = "gov-docker-stock"
PLAIN = "plain-docker"


def engine() -> Any:
    """The Docker engine (``bash scripts/docker.sh``) with the project's image on it."""
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except Exception as exc:
        missing(f"a Docker engine ({exc}; bash scripts/docker.sh)")
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        missing(f"the image {IMAGE} (bash scripts/docker.sh image)")
    return client


# An entrypoint that would run instead of the gate: it touches the file named after it.
BYPASS = ["/bin/sh", "-c", 'touch "$0"']


def containers_of(client: Any, flow_run_id: UUID) -> list[Any]:
    """Every container of the run the engine knows, stopped ones too."""
    return client.containers.list(all=True, filters={"label": f"{RUN_LABEL}={flow_run_id}"})


def docker_pool_template(**defaults: Any) -> dict[str, Any]:
    template = GovernedDockerWorker.get_default_base_job_template()
    for key, value in defaults.items():
        template["variables"]["properties"][key]["default"] = value
    return template


async def create_docker_pool(name: str, pool_type: str, template: dict[str, Any]) -> None:
    async with get_client() as client:
        await client.create_work_pool(
            WorkPoolCreate(name=name, type=pool_type, base_job_template=template),
            overwrite=True,
        )


class Runs:
    """The pools' runs, in their final states, and what the engine and the disk saw."""

    def __init__(self, client: Any, markers: Path) -> None:
        self.client = client
        self.markers = markers
        self.final: dict[str, Any] = {}
        self.seconds: dict[str, float] = {}

    @property
    def bypassed(self) -> Path:
        """What a container started other than through the gate would write."""
        return self.markers / "bypassed"

    def marker(self, name: str) -> Path:
        return self.markers / name

    def executed(self, name: str) -> bool:
        return self.marker(name).exists()

    def containers(self, name: str) -> list[Any]:
        return containers_of(self.client, self.final[name].id)


async def _run(gov: Harness, deployment: UUID, name: str, runs: Runs, timeout: float = 180) -> None:
    started = time.monotonic()
    runs.final[name] = await gov.run(
        deployment, {"rows": 10, "marker": str(runs.marker(name))}, timeout=timeout
    )
    runs.seconds[name] = time.monotonic() - started


async def _scenarios(gov: Harness, runs: Runs, flows: Path) -> None:
    tmp = gov.workdir
    volumes = [f"{flows}:{flows}:ro", f"{runs.markers}:{runs.markers}"]
    common = {"image": IMAGE, "image_pull_policy": "Never", "network_mode": "host"}
    still = TrustWeights(completed=0, failed=0, crashed=0, refused=0, warned=0, memory_rejected=0)
    agent = GovernanceAgent(
        id="docker-etl",
        trust_weights=still,
        owner="data@example.com",
        trust_scope=[GOVERNED, STOCK_ON_GOVERNED],
        capabilities=["read:warehouse", "write:warehouse"],
        constraints={
            "parameters": {"rows": {"type": "integer", "maximum": 1000}},
            # The owner allows the host's network (the server is on loopback), the two
            # mounted directories and the local images (docker.io, as Docker names them).
            "infrastructure": {
                "registries": ["docker.io"],
                "host_paths": [str(flows), str(runs.markers)],
                "host_network": True,
            },
        },
    )
    lineage = await gov.save_lineage()
    await gov.save_agent(agent)
    template = docker_pool_template(lineage_store=lineage, volumes=volumes, **common)
    for pool in (GOVERNED, STOCK_ON_GOVERNED):
        await create_docker_pool(pool, GovernedDockerWorker.type, template)
    # The stock docker worker on a plain pool, the same flow in the same image: Prefect's
    # own command (the image's entrypoint is the worker's, so env starts the command).
    stock = {**common, "volumes": volumes, "container_create_kwargs": {"entrypoint": ["env"]}}
    async with get_client() as client:
        from prefect_docker.worker import DockerWorker

        stock_template = DockerWorker.get_default_base_job_template()
        for key, value in stock.items():
            stock_template["variables"]["properties"][key]["default"] = value
        await client.create_work_pool(
            WorkPoolCreate(name=PLAIN, type="docker", base_job_template=stock_template),
            overwrite=True,
        )

    allowed = {"agent": agent.id, "capabilities": ["read:warehouse"]}
    deployments = {
        "allowed": await deploy_example("docker-allowed", GOVERNED, allowed, directory=flows),
        "refused": await deploy_example(
            "docker-refused",
            GOVERNED,
            {"agent": agent.id, "capabilities": ["delete:warehouse"]},
            directory=flows,
        ),
        "privileged": await deploy_example(
            "docker-privileged", GOVERNED, {**allowed, "privileged": True}, directory=flows
        ),
        "foreign-image": await deploy_example(
            "docker-foreign-image",
            GOVERNED,
            {**allowed, "image": "registry.example.invalid/anything:latest"},
            directory=flows,
        ),
        "stock-on-governed": await deploy_example(
            "docker-stock-on-governed", STOCK_ON_GOVERNED, allowed, directory=flows
        ),
        "plain": await deploy_example("docker-plain", PLAIN, {}, directory=flows),
        # A deployment author's ways around the gate and the rules, through the raw kwargs.
        "entrypoint-override": await deploy_example(
            "docker-entrypoint-override",
            GOVERNED,
            {**allowed, "container_create_kwargs": {"entrypoint": [*BYPASS, str(runs.bypassed)]}},
            directory=flows,
        ),
        "privileged-kwargs": await deploy_example(
            "docker-privileged-kwargs",
            GOVERNED,
            {**allowed, "container_create_kwargs": {"privileged": True}},
            directory=flows,
        ),
    }
    # Polling every second: the side-by-side timings are the runs', not the poll's wait.
    fast = {"PREFECT_WORKER_QUERY_SECONDS": "1"}
    gov.start_worker(
        GOVERNED, worker_type=GovernedDockerWorker.type, log=tmp / "governed.log", extra_env=fast
    )
    gov.start_worker(
        STOCK_ON_GOVERNED, worker_type="docker", log=tmp / "stock-on-gov.log", extra_env=fast
    )
    gov.start_worker(PLAIN, worker_type="docker", log=tmp / "plain.log", extra_env=fast)
    # One at a time, so the side-by-side timings share the machine alike.
    for name in (
        "plain",
        "allowed",
        "refused",
        "privileged",
        "foreign-image",
        "entrypoint-override",
        "privileged-kwargs",
    ):
        await _run(gov, deployments[name], name, runs)
    # Once more each, the other way round (the first container start pays for cold caches).
    await _run(gov, deployments["allowed"], "allowed-again", runs)
    await _run(gov, deployments["plain"], "plain-again", runs)
    await _run(gov, deployments["stock-on-governed"], "stock-on-governed", runs, timeout=90)


@pytest.fixture(scope="module")
def docker_runs(prefect_server, tmp_path_factory) -> Runs:
    client = engine()
    tmp = tmp_path_factory.mktemp("docker-e2e")
    markers = tmp / "markers"
    markers.mkdir(mode=0o777)
    markers.chmod(0o777)  # the image runs as uid 10001
    flows = tmp / "flows"
    flows.mkdir()
    shutil.copy(ROOT / "examples" / "flows.py", flows / "flows.py")
    flows.chmod(0o755)
    runs = Runs(client, markers)
    try:
        with harness(prefect_server, tmp, lineage_block="docker-lineage") as gov:
            asyncio.run(_scenarios(gov, runs, flows))
        yield runs
    finally:
        for run in runs.final.values():
            for container in containers_of(client, run.id):
                container.remove(force=True)


def _state(runs: Runs, name: str) -> str:
    run = runs.final[name]
    return f"{run.state.type.value}/{run.state.name}" if run.state else "none"


def test_allowed_run_executes_in_its_own_container(docker_runs: Runs) -> None:
    assert _state(docker_runs, "allowed") == "COMPLETED/Completed"
    assert docker_runs.marker("allowed").read_text().count("\n") == 1
    (container,) = docker_runs.containers("allowed")
    entrypoint = container.attrs["Config"]["Entrypoint"]
    assert entrypoint[:4] == ["python", "-I", "-m", "prefect_governance.gate"], entrypoint
    assert container.attrs["HostConfig"]["NetworkMode"] == "host"
    env = dict(item.partition("=")[::2] for item in container.attrs["Config"]["Env"])
    assert "PREFECT_GOVERNANCE_DECISION_ID" in env
    assert not {"PREFECT_GOVERNANCE_LINEAGE_KEY", "PREFECT_GOVERNANCE_LINEAGE_URL"} & set(env)


def test_refused_run_creates_no_container(docker_runs: Runs) -> None:
    assert _state(docker_runs, "refused") == "CANCELLED/Refused"
    assert not docker_runs.executed("refused")
    assert docker_runs.containers("refused") == []


def test_privileged_run_is_refused_by_the_infrastructure_rules(docker_runs: Runs) -> None:
    assert _state(docker_runs, "privileged") == "CANCELLED/Refused"
    assert not docker_runs.executed("privileged")
    assert docker_runs.containers("privileged") == []


def test_run_in_a_disallowed_image_is_refused(docker_runs: Runs) -> None:
    assert _state(docker_runs, "foreign-image") == "CANCELLED/Refused"
    assert not docker_runs.executed("foreign-image")
    assert docker_runs.containers("foreign-image") == []


def test_stock_docker_worker_on_a_governed_pool_executes_nothing(docker_runs: Runs) -> None:
    assert not docker_runs.executed("stock-on-governed")
    state = docker_runs.final["stock-on-governed"].state
    assert state is not None and state.type.value != "COMPLETED", state


def test_stock_docker_worker_runs_the_same_flow(docker_runs: Runs) -> None:
    """The reference: the stock worker, its pool and the same flow in the same image."""
    assert _state(docker_runs, "plain") == "COMPLETED/Completed"
    assert docker_runs.executed("plain")
    assert _state(docker_runs, "plain-again") == "COMPLETED/Completed"
    assert _state(docker_runs, "allowed-again") == "COMPLETED/Completed"
    seconds = docker_runs.seconds
    # The ratio of the second runs: the first container start of the session (the stock
    # run's, which goes first) also pays for cold caches.
    governed, stock = seconds["allowed-again"], seconds["plain-again"]
    print(
        f"\nrun (created -> final): governed-docker {governed:.1f} s, stock docker "
        f"{stock:.1f} s, ratio {governed / stock:.2f} (first runs: {seconds['allowed']:.1f} s, "
        f"{seconds['plain']:.1f} s)"
    )


def test_pool_type_is_created_offline_from_the_worker_template() -> None:
    template = GovernedDockerWorker.get_default_base_job_template()
    assert template["job_configuration"]["command"].endswith("-m prefect_governance.gate")
    assert "command" not in template["variables"]["properties"]


def test_a_jobs_own_entrypoint_does_not_replace_the_gate(docker_runs: Runs) -> None:
    """container_create_kwargs naming an entrypoint: the container still starts the gate
    (or the run is refused); the job's entrypoint never runs."""
    assert not docker_runs.bypassed.exists()
    state = _state(docker_runs, "entrypoint-override")
    assert state in ("COMPLETED/Completed", "CANCELLED/Refused"), state
    for container in docker_runs.containers("entrypoint-override"):
        entrypoint = container.attrs["Config"]["Entrypoint"]
        assert entrypoint[:4] == ["python", "-I", "-m", "prefect_governance.gate"], entrypoint


def test_privileged_through_the_raw_kwargs_is_refused(docker_runs: Runs) -> None:
    assert _state(docker_runs, "privileged-kwargs") == "CANCELLED/Refused"
    assert not docker_runs.executed("privileged-kwargs")
    assert docker_runs.containers("privileged-kwargs") == []
