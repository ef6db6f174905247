"""Concurrency on PostgreSQL: governed workers sharing one pool and one lineage database.

Several agents' runs go to one pool that several governed workers poll; every run
must be decided once, executed once, settled once, and leave intact chains and a
memory that lost no update. A cheaper test hammers the lineage store itself from
many processes at once, starting with the schema migration on a fresh database.

Select with ``pytest -m concurrency``. By default 4 agents x 50 runs, the 200-run
check (process runs start at roughly 15 a minute on two shared cores; fewer with
``GOVERNANCE_CONCURRENCY_RUNS_PER_AGENT`` for a quicker local look).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import multiprocessing
import os
import re
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect import flow as prefect_flow
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from sqlmodel import Session, select

from prefect_governance.cli.local import PrefectServer
from prefect_governance.core.trust import TrustWeights
from prefect_governance.lineage.events import LineageEvent
from prefect_governance.lineage.memory import MemoryStore
from prefect_governance.lineage.migrations import VERSION_TABLE, heads
from prefect_governance.lineage.migrations import config as migrations_config
from prefect_governance.lineage.store import LineageStore
from prefect_governance.testing import Harness, create_pool
from prefect_governance.worker.blocks import GovernanceAgent
from tests.agents import harness
from tests.concurrency_support import MEMORY_SCHEMA
from tests.pg_support import scratch_database

# The Prefect-server tests are marked e2e too (conftest: they get `pg_prefect`).
pytestmark = pytest.mark.concurrency

TESTS = Path(__file__).resolve().parent
AGENTS = 4
RUNS_PER_AGENT = int(os.environ.get("GOVERNANCE_CONCURRENCY_RUNS_PER_AGENT", "50"))
WORKERS = 2
WORKER_LIMIT = 4  # flow-run processes per worker at once
POOL = "concurrency-pg"
TIMEOUT = 1200.0
STILL = TrustWeights(completed=0, failed=0, crashed=0, refused=0, warned=0, memory_rejected=0)


@dataclass
class Crowd:
    """What the runs left behind, read once."""

    runs: dict[str, tuple[str, Path]]  # flow run id -> (agent, marker)
    final: dict[str, Any]
    events: list[LineageEvent]
    problems: list[Any]
    chains: dict[str, list[int]]
    memory: dict[str, list[Any]]
    taken: dict[str, set[str]]  # worker -> the runs it took
    races_lost: int  # submissions a worker aborted because another had the run
    seconds: float
    figures: dict[str, Any] = field(default_factory=dict)


def _agent(i: int) -> str:
    return f"crowd-{i}"


async def _deploy(name: str, agent: str) -> UUID:
    source = await prefect_flow.from_source(
        source=str(TESTS), entrypoint="concurrency_support.py:counted_run"
    )
    with contextlib.redirect_stdout(io.StringIO()):
        return await source.deploy(
            name=name,
            work_pool_name=POOL,
            job_variables={"agent": agent, "capabilities": ["read:warehouse"]},
            build=False,
            push=False,
            print_next_steps=False,
        )


async def _setup(gov: Harness, markers: Path) -> dict[str, tuple[str, Path]]:
    """Blocks, the pool, one deployment per agent and all the runs, queued up front."""
    lineage = await gov.save_lineage()
    engine = await gov.save_engine("crowd-embedded", kind="embedded")
    deployments = {}
    for i in range(AGENTS):
        await gov.save_agent(
            GovernanceAgent(
                id=_agent(i),
                owner="ops@example.com",
                trust_scope=[POOL],
                capabilities=["read:warehouse"],
                memory_schema=MEMORY_SCHEMA,
                trust_weights=STILL,  # many runs of one agent: keep trust (and the policy) still
            )
        )
    await create_pool(POOL, engine=engine, lineage_store=lineage)
    async with get_client() as client:
        for i in range(AGENTS):
            deployments[_agent(i)] = await _deploy(f"crowd-{i}", _agent(i))
        runs = {}
        for n in range(RUNS_PER_AGENT):
            for agent, deployment_id in deployments.items():
                marker = markers / f"{agent}-{n}"
                run = await client.create_flow_run_from_deployment(
                    deployment_id, parameters={"marker": str(marker)}
                )
                runs[str(run.id)] = (agent, marker)
    return runs


async def _wait_final(ids: list[str], timeout: float) -> dict[str, Any]:
    """Poll in pages (one request per page, not per run) until every run is final."""
    deadline = time.monotonic() + timeout
    async with get_client() as client:
        while True:
            found: dict[str, Any] = {}
            for start in range(0, len(ids), 100):
                page = [UUID(i) for i in ids[start : start + 100]]
                for run in await client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=page)), limit=100
                ):
                    found[str(run.id)] = run
            done = [r for r in found.values() if r.state and r.state.is_final()]
            if len(done) == len(ids) or time.monotonic() > deadline:
                return found
            await asyncio.sleep(3)


def _wait_outcomes(store: LineageStore, count: int, timeout: float) -> None:
    """The worker writes a run's outcome after the run is final: wait for all of them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with Session(store.engine) as session:
            outcomes = session.exec(select(LineageEvent.id).where(LineageEvent.kind == "outcome"))
            if len(outcomes.all()) >= count:
                return
        time.sleep(1)


_SUBMITTING = re.compile(r"submitting flow run '([0-9a-f-]{36})'")
_ABORTED = re.compile(r"Aborted submission of flow run '([0-9a-f-]{36})'")


def _taken(log: Path) -> tuple[set[str], set[str]]:
    """The runs a worker's log shows it taking, and those it lost to another worker."""
    text = log.read_text(errors="replace")
    aborted = set(_ABORTED.findall(text))
    return set(_SUBMITTING.findall(text)) - aborted, aborted


def _read(store: LineageStore, runs: dict[str, tuple[str, Path]]) -> tuple:
    memory = MemoryStore(store.engine)
    with Session(store.engine) as session:
        events = list(session.exec(select(LineageEvent).order_by(LineageEvent.id)).all())
    chains = {name: [e.seq for e in store.chain(name)] for name in store.chains()}
    agents = sorted({agent for agent, _ in runs.values()})
    return events, store.verify(), chains, {a: memory.history(a) for a in agents}


@pytest.fixture(scope="module")
def pg_prefect(postgres, tmp_path_factory):
    """A Prefect server of its own on PostgreSQL, as in production: on SQLite the server
    itself answers 503 under this load, and its worker crashes runs before they start."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with scratch_database(postgres.url, "prefect") as url:
        database = url.replace("postgresql+psycopg://", "postgresql+asyncpg://")
        server = PrefectServer(tmp_path_factory.mktemp("pg-prefect"), database).start()
        try:
            with temporary_settings({PREFECT_API_URL: server.api_url}):
                yield server
        finally:
            server.stop()


@pytest.fixture(scope="module")
def crowd(pg_prefect, postgres, tmp_path_factory):
    prefect_server = pg_prefect
    tmp = tmp_path_factory.mktemp("crowd")
    markers = tmp / "markers"
    markers.mkdir()
    with scratch_database(postgres.url, "crowd") as url:
        with harness(prefect_server, tmp, lineage_url=url, lineage_block="crowd-lineage") as gov:
            runs = asyncio.run(_setup(gov, markers))
            logs = [tmp / f"worker-{w}.log" for w in range(WORKERS)]
            started = time.monotonic()
            for log in logs:
                gov.start_worker(POOL, log=log, limit=WORKER_LIMIT)
            try:
                final = asyncio.run(_wait_final(list(runs), TIMEOUT))
                store = gov.store
                _wait_outcomes(store, len(runs), 120)
                seconds = time.monotonic() - started
            finally:
                gov.stop_workers()
            events, problems, chains, memory = _read(store, runs)
        taken = {log.stem: _taken(log) for log in logs}
        crowd = Crowd(
            runs,
            final,
            events,
            problems,
            chains,
            memory,
            {worker: took for worker, (took, _) in taken.items()},
            sum(len(lost) for _, lost in taken.values()),
            seconds,
        )
        crowd.figures = {
            "runs": len(runs),
            "agents": AGENTS,
            "workers": WORKERS,
            "limit per worker": WORKER_LIMIT,
            "completed": sum(1 for r in final.values() if r.state and r.state.is_completed()),
            "events": len(events),
            "chains verified": len(chains) - len(problems),
            "runs taken per worker": {w: len(took) for w, took in crowd.taken.items()},
            "races lost to another worker": crowd.races_lost,
            "never governed (crashed by Prefect before the worker ran it)": sum(
                1 for run in runs if not any(e.flow_run_id == run for e in events)
            ),
            "seconds": round(seconds, 1),
            "runs per minute": round(len(runs) / seconds * 60, 1),
        }
        yield crowd


def test_figures(crowd, capsys):
    with capsys.disabled():
        print(f"\nconcurrency on PostgreSQL: {crowd.figures}")


def _state(crowd: Crowd, run: str) -> str | None:
    state = crowd.final[run].state if run in crowd.final else None
    return state.type.value if state else None


def _completed(crowd: Crowd) -> set[str]:
    return {run for run in crowd.runs if _state(crowd, run) == "COMPLETED"}


def test_every_run_reached_a_final_state_and_ran_at_most_once(crowd):
    """Completed runs executed exactly once. A run the server's faults stopped before it
    started (the worker crashes it) did not execute at all."""
    assert {run: _state(crowd, run) in {"COMPLETED", "CRASHED"} for run in crowd.runs} == {
        run: True for run in crowd.runs
    }
    lines = {
        run: marker.read_text().count("ran\n") if marker.exists() else 0
        for run, (_, marker) in crowd.runs.items()
    }
    completed = _completed(crowd)
    assert completed, "no run completed"
    assert {run: lines[run] for run in completed} == {run: 1 for run in completed}
    assert {run: n for run, n in lines.items() if run not in completed} == {
        run: 0 for run in crowd.runs if run not in completed
    }


def test_every_run_decided_once_and_settled_once(crowd):
    """One decision, one outcome, one trust update per run, and one memory commit per
    completed run; nothing else, nothing twice."""
    per_run = Counter((e.flow_run_id, e.kind) for e in crowd.events)
    completed = _completed(crowd)
    expected = Counter(
        {(run, k): 1 for run in crowd.runs for k in ("decision", "outcome", "trust")}
    )
    expected.update({(run, "memory_commit"): 1 for run in completed})
    # A run Prefect's own worker machinery crashed before handing it to governance (a
    # server fault) has no record; it must not have executed (checked above).
    never_seen = {run for run in crowd.runs if (run, "decision") not in per_run}
    assert {run: _state(crowd, run) for run in never_seen} == dict.fromkeys(never_seen, "CRASHED")
    assert len(never_seen) <= len(crowd.runs) // 100, f"too many runs never governed: {never_seen}"
    for run in never_seen:
        for kind in ("decision", "outcome", "trust"):
            del expected[(run, kind)]
    assert per_run == expected
    decisions = [e for e in crowd.events if e.kind == "decision"]
    assert {e.verdict for e in decisions} == {"allowed"}
    assert len({e.decision_id for e in decisions}) == len(crowd.runs) - len(never_seen)
    outcomes = {e.flow_run_id: e.state for e in crowd.events if e.kind == "outcome"}
    assert outcomes == {run: _state(crowd, run) for run in crowd.runs if run not in never_seen}
    assert len({e.event_id for e in crowd.events}) == len(crowd.events)


def test_every_agent_chain_is_intact_and_contiguous(crowd):
    assert crowd.problems == []
    lengths = Counter(e.agent_id for e in crowd.events)
    assert crowd.chains == {
        _agent(i): list(range(1, lengths[_agent(i)] + 1)) for i in range(AGENTS)
    }
    for event in crowd.events:
        assert event.chain == event.agent_id, "an event landed in another agent's chain"


def test_memory_versions_rise_one_by_one_and_no_update_is_lost(crowd):
    completed = _completed(crowd)
    commits = [e for e in crowd.events if e.kind == "memory_commit"]
    for agent, history in crowd.memory.items():
        own = {run for run, (owner, _) in crowd.runs.items() if owner == agent} & completed
        assert [m.version for m in history] == list(range(1, len(own) + 1))
        assert set(history[-1].content["runs"]) == own, f"{agent}: an update was lost"
        assert {m.flow_run_id for m in history} == own
        versions = sorted(e.payload["version"] for e in commits if e.agent_id == agent)
        assert versions == list(range(1, len(own) + 1))


def test_each_run_was_taken_by_one_worker_and_every_worker_took_some(crowd):
    took = list(crowd.taken.values())
    assert all(took), {w: len(t) for w, t in crowd.taken.items()}
    assert sum(len(t) for t in took) == len(set().union(*took)), "two workers took one run"
    assert set().union(*took) == set(crowd.runs)


# --- the lineage store itself, from many processes at once -----------------------

WRITERS = 8
APPENDS = 100
CHAINS = 3


def _writer(url: str, writer: int, start_at: float) -> int:
    """Open the store at ``start_at`` (all writers at once: the migration races too),
    then append: mostly one event, every tenth call one event in each of two chains."""
    from prefect_governance.lineage.events import LineageEvent
    from prefect_governance.lineage.store import LineageStore

    time.sleep(max(0.0, start_at - time.time()))
    store = LineageStore(url)
    written = 0
    try:
        for n in range(APPENDS):
            chains = [f"hammer-{n % CHAINS}"]
            if n % 10 == 0:
                chains.append(f"hammer-{(n + 1) % CHAINS}")
            store.append(
                *(
                    LineageEvent(kind="decision", agent_id=c, flow_run_id=f"w{writer}-{n}-{c}")
                    for c in chains
                )
            )
            written += len(chains)
    finally:
        store.dispose()
    return written


def test_many_processes_append_to_shared_chains_without_loss(postgres):
    with scratch_database(postgres.url, "hammer") as url:
        start_at = time.time() + 5  # after every process has started
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(WRITERS, mp_context=context) as pool:
            futures = [pool.submit(_writer, url, w, start_at) for w in range(WRITERS)]
            written = sum(f.result(timeout=600) for f in futures)
        store = LineageStore(url)
        try:
            events = list(store.recent(10 * written))
            chains = {name: [e.seq for e in store.chain(name)] for name in store.chains()}
            problems = store.verify()
            with store.engine.connect() as connection:
                versions = connection.exec_driver_sql(f"SELECT * FROM {VERSION_TABLE}").all()
        finally:
            store.dispose()
    expected = WRITERS * APPENDS * 11 // 10  # every tenth call appends two events
    assert written == expected and len(events) == expected
    names = Counter(e.flow_run_id for e in events)
    assert len(names) == expected and set(names.values()) == {1}, "lost or duplicated"
    assert {name: seqs == list(range(1, len(seqs) + 1)) for name, seqs in chains.items()} == {
        f"hammer-{c}": True for c in range(CHAINS)
    }
    assert sum(len(seqs) for seqs in chains.values()) == expected
    assert problems == []
    assert [tuple(row) for row in versions] == [heads(migrations_config())]
    print(
        f"\nlineage store on PostgreSQL: {WRITERS} processes, {expected} events, "
        f"{len(chains)} chains verified"
    )
