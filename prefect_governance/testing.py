"""A test harness: governed work pools with their blocks, their lineage and their workers.

For this package's end-to-end tests and for users' own. It needs a running Prefect
server (``prefect_governance.cli.local.PrefectServer``, or your own) whose API the
current settings point at, and a pool-owner key the workers it starts pin::

    owner = SigningKey.generate("pool-owner")
    with Harness(server, tmp_path, owner=owner) as harness:
        deployment = asyncio.run(harness.governed_pool("gov", GovernanceAgent(...)))
        harness.start_worker("gov")
        run = asyncio.run(harness.run(deployment, {"rows": 10}))
        assert run.state.is_completed()
        assert harness.store.verify() == []

Leaving the ``with`` stops every worker it started and closes its lineage store. Nothing
in the package imports this module (a checked import contract).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol
from uuid import UUID

from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import FlowRun
from pydantic import SecretStr

from prefect_governance.cli.demo import (
    deploy_example,
    pool_template,
    run_in_order,
    wait_final,
    wait_outcomes,
)
from prefect_governance.cli.local import start_worker, stop
from prefect_governance.core.attestation import KEYS_ENV, signed
from prefect_governance.core.signing import SigningKey
from prefect_governance.lineage.store import LineageStore
from prefect_governance.worker.blocks import (
    GovernanceAgent,
    GovernanceLineageStore,
    GovernancePolicyEngine,
)
from prefect_governance.worker.process import GovernedProcessWorker

__all__ = [
    "Harness",
    "Server",
    "create_pool",
    "deploy_example",
    "pool_template",
    "run_in_order",
    "signed_agent",
    "wait_final",
    "wait_outcomes",
]


class Server(Protocol):
    """What the harness needs of a Prefect server (``PrefectServer`` has it)."""

    home: Path
    api_url: str


def signed_agent(agent: GovernanceAgent, name: str, owner: SigningKey) -> GovernanceAgent:
    """The agent as its pool owner applies it under this block name.

    An agent that names no deployments is bound to every one (``["*"]``): a convenience
    for tests; the product's default binds nothing.
    """
    if not agent.deployments:
        agent = agent.model_copy(update={"deployments": ["*"]})
    return signed(name, agent, owner)


async def create_pool(
    name: str, template: dict[str, Any] | None = None, *, overwrite: bool = False, **defaults: Any
) -> str:
    """Create a governed-process pool from ``template``, or from the governed worker's
    template with these variables defaulted (``lineage_store``, ``engine``, ``mode`` ...);
    ``overwrite`` replaces a pool of that name."""
    async with get_client() as client:
        await client.create_work_pool(
            WorkPoolCreate(
                name=name,
                type=GovernedProcessWorker.type,
                base_job_template=template or pool_template(**defaults),
            ),
            overwrite=overwrite,
        )
    return name


class Harness:
    """Governed pools on one Prefect server, sharing one lineage store.

    ``workdir`` holds the lineage database (SQLite unless ``lineage_url`` says otherwise)
    and the workers' logs (``worker-<pool>.log``). Block-making methods are async, like
    Prefect's client; starting and stopping workers is not.
    """

    def __init__(
        self,
        server: Server,
        workdir: Path,
        *,
        owner: SigningKey,
        lineage_url: str | None = None,
        lineage_block: str = "lineage",
    ) -> None:
        self.server = server
        self.workdir = workdir
        self.owner = owner
        self.lineage_url = lineage_url or f"sqlite:///{workdir / 'lineage.db'}"
        self.lineage_block = lineage_block
        self.workers: list[subprocess.Popen[bytes]] = []
        self._store: LineageStore | None = None

    @property
    def store(self) -> LineageStore:
        """The lineage store the pools write (opened on first use, closed on exit)."""
        if self._store is None:
            self._store = LineageStore(self.lineage_url)
        return self._store

    async def save_lineage(self, name: str | None = None, url: str | None = None) -> str:
        """Save a lineage store block (by default this harness's) and return its name."""
        name = name or self.lineage_block
        store = GovernanceLineageStore(url=SecretStr(url or self.lineage_url))
        await store.asave(name, overwrite=True)
        return name

    async def save_engine(self, name: str, **fields: Any) -> str:
        """Save a policy engine block (``kind="embedded"`` unless told) and return its name."""
        await GovernancePolicyEngine(**{"kind": "embedded", **fields}).asave(name, overwrite=True)
        return name

    async def save_agent(self, agent: GovernanceAgent, name: str | None = None) -> GovernanceAgent:
        """Sign the agent with the owner's key and save it (named after its id unless told)."""
        agent = signed_agent(agent, name or agent.id, self.owner)
        await agent.asave(name or agent.id, overwrite=True)
        return agent

    async def governed_pool(
        self,
        name: str,
        agent: GovernanceAgent,
        *,
        job_variables: Mapping[str, Any] | None = None,
        flow_name: str = "load_warehouse",
        deployment: str | None = None,
        directory: Path | None = None,
        **defaults: Any,
    ) -> UUID:
        """One pool and its blocks: the lineage block, the agent (signed), the pool on
        that lineage, and a deployment (named after the pool unless told) of a flow of
        ``directory``/flows.py (examples/ unless told) that runs as the agent. A
        ``lineage_store`` default names the pool's store instead (``None``: the worker's
        own in PREFECT_HOME) and saves no block. Returns the deployment's id."""
        if "lineage_store" not in defaults:
            defaults["lineage_store"] = await self.save_lineage()
        await self.save_agent(agent)
        await create_pool(name, **defaults)
        variables = {"agent": agent.id, **(job_variables or {})}
        where = {"directory": directory} if directory is not None else {}
        return await deploy_example(
            deployment or name, name, variables, flow_name=flow_name, **where
        )

    async def run(
        self, deployment_id: UUID, parameters: Mapping[str, Any], timeout: float = 120
    ) -> FlowRun:
        """Start a run of the deployment and return it in its final state (or at the
        timeout)."""
        async with get_client() as client:
            run = await client.create_flow_run_from_deployment(
                deployment_id, parameters=dict(parameters)
            )
        return (await wait_final([run.id], timeout=timeout))[run.id]

    def start_worker(
        self,
        pool: str,
        *,
        log: Path | None = None,
        worker_type: str | None = None,
        extra_env: Mapping[str, str] | None = None,
        limit: int | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``prefect worker start --pool POOL`` (the governed type unless told),
        pinning the owner's key; it is stopped with the harness."""
        pinned = json.dumps({self.owner.key_id: self.owner.public_b64})
        env = {KEYS_ENV: pinned, **(extra_env or {})}
        worker = start_worker(
            pool,
            self.server.home,
            self.server.api_url,
            log or self.workdir / f"worker-{pool}.log",
            worker_type=worker_type,
            extra_env=env,
            limit=limit,
        )
        self.workers.append(worker)
        return worker

    def stop_worker(self, worker: subprocess.Popen[bytes]) -> None:
        """Stop one worker this harness started."""
        self.workers.remove(worker)
        stop(worker)

    def stop_workers(self) -> None:
        """Stop every worker started so far."""
        while self.workers:
            stop(self.workers.pop())

    def close(self) -> None:
        """Stop the workers and close the lineage store."""
        self.stop_workers()
        if self._store is not None:
            self._store.dispose()
            self._store = None

    def __enter__(self) -> Harness:
        self.workdir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
