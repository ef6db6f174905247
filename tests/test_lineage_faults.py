"""The lineage database goes away and comes back: no run executes without its decision.

A real PostgreSQL cluster is stopped under a running governed worker and started
again on the same port; a real SQLite lineage is locked by another connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prefect_governance.lineage.store import LineageStore
from prefect_governance.testing import Harness
from prefect_governance.worker.blocks import GovernanceAgent
from tests.agents import harness
from tests.conftest import own_postgres

pytestmark = pytest.mark.e2e


@pytest.fixture
def pool(prefect_server, tmp_path) -> Iterator[Any]:
    """``pool(name, lineage_url)``: a governed pool of its own agent on that lineage, its
    worker started; returns the harness and the deployment."""
    with contextlib.ExitStack() as stack:

        def make(name: str, lineage_url: str, **env: str) -> tuple[Harness, Any]:
            gov = stack.enter_context(
                harness(
                    prefect_server,
                    tmp_path,
                    lineage_url=lineage_url,
                    lineage_block=f"{name}-lineage",
                )
            )
            agent = GovernanceAgent(
                id=f"{name}-agent",
                owner="data@example.com",
                trust_scope=[name],
                capabilities=["read:warehouse"],
            )
            deployment = asyncio.run(gov.governed_pool(name, agent))
            gov.start_worker(name, log=tmp_path / "worker.log", extra_env=env)
            return gov, deployment

        yield make


def _run_once(gov: Harness, deployment: object, marker: Path):
    return asyncio.run(gov.run(deployment, {"rows": 10, "marker": str(marker)}))


def _decisions(store: LineageStore, run) -> list:
    return [e for e in store.recent(50, flow_run_id=str(run.id)) if e.kind == "decision"]


@pytest.fixture
def pg_down_and_back(pool, tmp_path):
    with own_postgres("governance-pg-fault-") as server:
        gov, deployment = pool("gov-pg-fault", server.url)
        runs = {}
        runs["before"] = (_run_once(gov, deployment, tmp_path / "before"), tmp_path / "before")
        server.stop()
        runs["down"] = (_run_once(gov, deployment, tmp_path / "down"), tmp_path / "down")
        server.start()
        runs["back"] = (_run_once(gov, deployment, tmp_path / "back"), tmp_path / "back")
        try:
            yield runs, gov.store
        finally:
            gov.close()


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
def sqlite_locked(pool, tmp_path):
    path = tmp_path / "lineage.db"
    url = f"sqlite:///{path}"
    LineageStore(url).dispose()  # created, as a worker would
    gov, deployment = pool("gov-sqlite-lock", url, PREFECT_GOVERNANCE_LINEAGE_APPEND_TIMEOUT="3")
    runs = {}
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
    try:
        runs["locked"] = (_run_once(gov, deployment, tmp_path / "locked"), tmp_path / "locked")
    finally:
        holder.execute("COMMIT")
        holder.close()
    runs["free"] = (_run_once(gov, deployment, tmp_path / "free"), tmp_path / "free")
    yield runs, gov.store


def test_sqlite_locked_refuses_and_recovers(sqlite_locked):
    runs, store = sqlite_locked
    locked, free = runs["locked"][0], runs["free"][0]
    assert locked.state.name == "Refused", locked.state
    assert not runs["locked"][1].exists()
    assert "locked" in locked.state.message
    assert free.state.is_completed() and runs["free"][1].exists()
    assert len(_decisions(store, free)) == 1
    assert store.verify() == []


def test_a_read_only_sqlite_lineage_refuses(pool, tmp_path):
    """A lineage that cannot be written (opened read-only): no run starts."""
    path = tmp_path / "lineage.db"
    LineageStore(f"sqlite:///{path}").dispose()  # it exists, migrated
    read_only = f"sqlite:///file:{path}?mode=ro&uri=true"
    gov, deployment = pool("gov-sqlite-ro", read_only)
    run = _run_once(gov, deployment, tmp_path / "marker")
    gov.stop_workers()
    assert run.state.name == "Refused", run.state
    assert not (tmp_path / "marker").exists()
    assert "lineage" in run.state.message and "readonly" in run.state.message.replace(" ", "")
