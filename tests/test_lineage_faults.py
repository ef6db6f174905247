"""The lineage database goes away and comes back: no run executes without its decision.

A real PostgreSQL cluster is stopped under a running governed worker and started
again on the same port; a real SQLite lineage is locked by another connection.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate

from prefect_governance.cli.demo import deploy_example, pool_template, wait_final
from prefect_governance.cli.local import start_worker, stop
from prefect_governance.lineage.store import LineageStore
from prefect_governance.worker.blocks import GovernanceAgent, GovernanceLineageStore
from tests.agents import asave_agent
from tests.conftest import own_postgres

pytestmark = pytest.mark.e2e


async def _pool(name: str, lineage_url: str) -> object:
    await GovernanceLineageStore(url=lineage_url).asave(f"{name}-lineage", overwrite=True)
    await asave_agent(
        GovernanceAgent(
            id=f"{name}-agent",
            owner="data@example.com",
            trust_scope=[name],
            capabilities=["read:warehouse"],
        ),
        f"{name}-agent",
    )
    async with get_client() as client:
        await client.create_work_pool(
            WorkPoolCreate(
                name=name,
                type="governed-process",
                base_job_template=pool_template(lineage_store=f"{name}-lineage"),
            )
        )
    return await deploy_example(name, name, {"agent": f"{name}-agent"})


def _run_once(deployment: object, marker: Path):
    async def go():
        async with get_client() as client:
            run = await client.create_flow_run_from_deployment(
                deployment, parameters={"rows": 10, "marker": str(marker)}
            )
        return (await wait_final([run.id], timeout=120))[run.id]

    return asyncio.run(go())


def _decisions(store: LineageStore, run) -> list:
    return [e for e in store.recent(50, flow_run_id=str(run.id)) if e.kind == "decision"]


@pytest.fixture
def pg_down_and_back(prefect_server, tmp_path):
    with own_postgres("governance-pg-fault-") as server:
        deployment = asyncio.run(_pool("gov-pg-fault", server.url))
        worker = start_worker(
            "gov-pg-fault", prefect_server.home, prefect_server.api_url, tmp_path / "worker.log"
        )
        runs = {}
        try:
            runs["before"] = (_run_once(deployment, tmp_path / "before"), tmp_path / "before")
            server.stop()
            runs["down"] = (_run_once(deployment, tmp_path / "down"), tmp_path / "down")
            server.start()
            runs["back"] = (_run_once(deployment, tmp_path / "back"), tmp_path / "back")
            store = LineageStore(server.url)
            yield runs, store
            store.dispose()
        finally:
            stop(worker)


def test_postgresql_stopped_refuses_and_recovers(pg_down_and_back):
    runs, store = pg_down_and_back
    before, down, back = (runs[k][0] for k in ("before", "down", "back"))
    assert before.state.is_completed() and runs["before"][1].exists()

    assert down.state.name == "Refused", down.state
    assert not runs["down"][1].exists(), "no run executes without its decision recorded"
    assert "lineage" in down.state.message

    assert back.state.is_completed(), "the worker recovers when the database returns"
    assert runs["back"][1].exists()
    assert len(_decisions(store, before)) == 1 and len(_decisions(store, back)) == 1
    assert _decisions(store, down) == [], "the database was down: nothing could be written"
    assert store.verify() == []


@pytest.fixture
def sqlite_locked(prefect_server, tmp_path):
    path = tmp_path / "lineage.db"
    url = f"sqlite:///{path}"
    LineageStore(url).dispose()  # created, as a worker would
    deployment = asyncio.run(_pool("gov-sqlite-lock", url))
    worker = start_worker(
        "gov-sqlite-lock",
        prefect_server.home,
        prefect_server.api_url,
        tmp_path / "worker.log",
        extra_env={"PREFECT_GOVERNANCE_LINEAGE_APPEND_TIMEOUT": "3"},
    )
    runs = {}
    try:
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
        try:
            runs["locked"] = (_run_once(deployment, tmp_path / "locked"), tmp_path / "locked")
        finally:
            holder.execute("COMMIT")
            holder.close()
        runs["free"] = (_run_once(deployment, tmp_path / "free"), tmp_path / "free")
        store = LineageStore(url)
        yield runs, store
        store.dispose()
    finally:
        stop(worker)


def test_sqlite_locked_refuses_and_recovers(sqlite_locked):
    runs, store = sqlite_locked
    locked, free = runs["locked"][0], runs["free"][0]
    assert locked.state.name == "Refused", locked.state
    assert not runs["locked"][1].exists()
    assert "locked" in locked.state.message
    assert free.state.is_completed() and runs["free"][1].exists()
    assert len(_decisions(store, free)) == 1
    assert store.verify() == []


def test_a_read_only_sqlite_lineage_refuses(prefect_server, tmp_path):
    """A lineage that cannot be written (opened read-only): no run starts."""
    path = tmp_path / "lineage.db"
    LineageStore(f"sqlite:///{path}").dispose()  # it exists, migrated
    read_only = f"sqlite:///file:{path}?mode=ro&uri=true"
    deployment = asyncio.run(_pool("gov-sqlite-ro", read_only))
    worker = start_worker(
        "gov-sqlite-ro", prefect_server.home, prefect_server.api_url, tmp_path / "worker.log"
    )
    try:
        run = _run_once(deployment, tmp_path / "marker")
    finally:
        stop(worker)
    assert run.state.name == "Refused", run.state
    assert not (tmp_path / "marker").exists()
    assert "lineage" in run.state.message and "readonly" in run.state.message.replace(" ", "")
