"""A worker killed between a decision and a run's end: nothing runs twice or ungoverned.

The kill is a real SIGKILL of a real worker process. To die exactly between the
decision and the start, the worker is started through a wrapper that makes
Prefect's process launch kill its own process: the decision is recorded, the
flow process never starts.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from prefect import get_client

from prefect_governance.cli.local import prefect_env, spawn
from prefect_governance.core.models import Decision
from prefect_governance.lineage.events import decision_event, outcome_event
from prefect_governance.lineage.store import LineageStore
from prefect_governance.testing import Harness, create_pool, deploy_example, wait_final
from prefect_governance.worker.blocks import GovernanceAgent
from prefect_governance.worker.reconcile import NEVER_STARTED, is_orphan, settle_action
from tests.agents import asave_agent, harness

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=timezone.utc)
GRACE = timedelta(seconds=60)


def _action(**overrides):
    fields = {
        "state_type": "PENDING",
        "is_final": False,
        "has_process": False,
        "decided_at": NOW - timedelta(minutes=5),
        "ended_at": None,
        "now": NOW,
        "grace": GRACE,
    }
    return settle_action(**{**fields, **overrides})


def test_a_final_run_is_recorded_once_its_worker_had_time_to():
    assert _action(state_type="COMPLETED", is_final=True, ended_at=NOW - GRACE) == "record"
    assert _action(state_type="COMPLETED", is_final=True, ended_at=NOW) == "wait"


def test_a_run_pending_long_after_its_decision_without_a_process_is_crashed():
    assert _action() == "crash"
    assert _action(decided_at=NOW - timedelta(seconds=5)) == "wait", "still within the grace"
    assert _action(has_process=True) == "wait", "a process was started: it may still report"


def test_a_running_run_is_left_alone():
    assert _action(state_type="RUNNING") == "wait"


def _payload(pool="p", worker="w-old", run="r1") -> dict:
    return {"worker": worker, "envelope": {"work_pool": {"name": pool}, "flow_run": {"id": run}}}


def test_only_runs_of_this_pool_whose_worker_is_gone_are_orphans():
    mine = {"pool": "p", "worker": "w-new", "in_flight": {"r9"}, "online": {"w-other"}}
    assert is_orphan(_payload(), **mine), "decided by a worker that is gone"
    assert not is_orphan(_payload(pool="q"), **mine), "another pool's run"
    assert not is_orphan(_payload(worker="w-other"), **mine), "its worker is online"
    assert not is_orphan(_payload(worker="w-new", run="r9"), **mine), "this worker handles it"
    assert is_orphan(_payload(worker="w-new", run="r1"), **mine), "a previous life of this name"


def _decision(verdict: str = "allowed") -> Decision:
    return Decision(
        id=f"d-{verdict}-{time.monotonic_ns()}",
        verdict=verdict,
        allow=verdict != "refused",
        engine="embedded",
        policy_path="p",
    )


def test_unsettled_lists_decisions_that_ran_without_an_outcome(tmp_path):
    store = LineageStore(f"sqlite:///{tmp_path / 'l.db'}")
    allowed, refused, done = _decision(), _decision("refused"), _decision()
    for decision, run in ((allowed, "r1"), (refused, "r2"), (done, "r3")):
        store.append(decision_event(decision, agent_id="a", flow_run_id=run, envelope=None))
    end = outcome_event(agent_id="a", flow_run_id="r3", decision_id=done.id, state="COMPLETED")
    assert store.append(end, once_per_decision="outcome")
    assert [e.decision_id for e in store.unsettled()] == [allowed.id]
    again = outcome_event(agent_id="a", flow_run_id="r3", decision_id=done.id, state="FAILED")
    assert not store.append(again, once_per_decision="outcome"), "one outcome per decision"
    assert [e.state for e in store.recent(10, flow_run_id="r3") if e.kind == "outcome"] == [
        "COMPLETED"
    ]
    assert store.verify() == []
    store.dispose()


# --- end to end -------------------------------------------------------------------------

POOL = "gov-reconcile"
# Killed workers must be seen offline soon: the reconciler leaves online workers' runs alone.
FAST_HEARTBEAT = {"PREFECT_WORKER_HEARTBEAT_SECONDS": "2"}
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
DIE_BEFORE_START = """
import os, signal, sys
from prefect.workers.process import ProcessWorker

async def _die(*args, **kwargs):  # the decision is recorded; the flow process never starts
    os.kill(os.getpid(), signal.SIGKILL)

ProcessWorker.run = _die
sys.argv = ["prefect", *sys.argv[1:]]
from prefect.cli import app
app()
"""


async def _setup(gov: Harness) -> dict[str, tuple]:
    lineage = await gov.save_lineage()
    await gov.save_agent(
        GovernanceAgent(
            id="reconcile-agent",
            owner="data@example.com",
            trust_scope=[POOL],
            capabilities=["read:warehouse"],
        )
    )
    await create_pool(POOL, lineage_store=lineage)
    deployment = await deploy_example("reconcile", POOL, {"agent": "reconcile-agent"})
    return {"deployment": deployment}


async def _run(deployment, marker: Path, seconds: float = 0.0):
    async with get_client() as client:
        run = await client.create_flow_run_from_deployment(
            deployment, parameters={"rows": 10, "marker": str(marker), "seconds": seconds}
        )
    return run.id


async def _wait_state(run_id, names: set[str], timeout: float):
    deadline = time.monotonic() + timeout
    async with get_client() as client:
        while True:
            run = await client.read_flow_run(run_id)
            if run.state and run.state.type.value in names:
                return run
            if time.monotonic() > deadline:
                raise AssertionError(f"run {run_id} is {run.state}, not in {names}")
            await asyncio.sleep(0.5)


def _wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.2)


def _wait_outcome(store: LineageStore, run_id, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = store.recent(50, flow_run_id=str(run_id))
        if any(e.kind == "outcome" for e in events):
            return events
        time.sleep(0.5)
    raise AssertionError(f"no outcome recorded for {run_id}")


@pytest.fixture(scope="module")
def killed(prefect_server, tmp_path_factory):
    """Two runs whose workers were SIGKILLed: before the start, and during the run."""
    tmp = tmp_path_factory.mktemp("reconcile")
    with harness(prefect_server, tmp, lineage_block="reconcile-lineage") as gov:
        setup = asyncio.run(_setup(gov))
        home, api = prefect_server.home, prefect_server.api_url
        store = gov.store
        # 1. The worker dies between the decision and the start.
        never = tmp / "never-started"
        never_id = asyncio.run(_run(setup["deployment"], never))
        dying = spawn(
            [sys.executable, "-c", DIE_BEFORE_START, "worker", "start", "--pool", POOL],
            prefect_env(home, api, **FAST_HEARTBEAT),
            tmp / "worker-dies-before-start.log",
        )
        gov.workers.append(dying)  # stopped with the harness, were it still alive
        dying.wait(timeout=120)
        assert dying.returncode == -signal.SIGKILL, "the worker was killed"

        # 2. The worker dies while the run's process runs (Prefect then ends the run itself).
        orphan = tmp / "orphan"
        orphan_id = asyncio.run(_run(setup["deployment"], orphan, seconds=6))
        first = gov.start_worker(POOL, log=tmp / "worker-first.log", extra_env=FAST_HEARTBEAT)
        _wait_for(orphan, timeout=120)  # the flow's body is running (RUNNING comes earlier)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        asyncio.run(_wait_state(orphan_id, FINAL, timeout=120))

        # A new worker (short grace and interval) reconciles both from Prefect's state.
        gov.start_worker(
            POOL,
            log=tmp / "worker-second.log",
            extra_env={
                "PREFECT_GOVERNANCE_RECONCILE_GRACE": "2",
                "PREFECT_GOVERNANCE_RECONCILE_INTERVAL": "1",
            },
        )
        events = {
            "never": _wait_outcome(store, never_id, timeout=150),
            "orphan": _wait_outcome(store, orphan_id, timeout=150),
        }
        runs = asyncio.run(wait_final([never_id, orphan_id], timeout=30))
        yield {
            "never": (runs[never_id], never, events["never"]),
            "orphan": (runs[orphan_id], orphan, events["orphan"]),
            "store": store,
        }


def _kinds(events) -> list[str]:
    return sorted(e.kind for e in events)


@pytest.mark.e2e
def test_a_run_whose_worker_died_before_the_start_never_runs_and_is_settled(killed):
    run, marker, events = killed["never"]
    assert not marker.exists(), "the run never executed"
    assert run.state.type.value == "CRASHED" and run.state.message == NEVER_STARTED
    decisions = [e for e in events if e.kind == "decision"]
    outcomes = [e for e in events if e.kind == "outcome"]
    assert len(decisions) == 1 and decisions[0].verdict == "allowed", "decided once, first"
    assert len(outcomes) == 1 and outcomes[0].state == "CRASHED"
    assert outcomes[0].decision_id == decisions[0].decision_id
    assert "trust" in _kinds(events), "the crash counts against the agent's trust"


@pytest.mark.e2e
def test_a_run_whose_worker_died_during_the_run_executes_once_and_is_reconciled(killed):
    run, marker, events = killed["orphan"]
    assert run.state.is_final()
    assert marker.read_text().count("loaded") == 1, "executed exactly once"
    decisions = [e for e in events if e.kind == "decision"]
    outcomes = [e for e in events if e.kind == "outcome"]
    assert len(decisions) == 1 and len(outcomes) == 1
    assert outcomes[0].state == run.state.type.value, "the outcome is Prefect's own final state"
    assert outcomes[0].payload["message"] == run.state.message


@pytest.mark.e2e
def test_reconciled_chains_stay_intact(killed):
    assert killed["store"].verify() == []
    assert killed["store"].unsettled() == []


def test_the_reconciler_verifies_the_agent_like_the_worker(prefect_server):
    """An agent block that no longer verifies is settled without an agent (no memory, no
    trust), as a deleted one is; a signed one is charged."""
    from prefect_governance.core.decision import worker_refusal
    from prefect_governance.worker.reconcile import _assessment_of
    from tests.agents import TEST_AGENT_KEY

    keys = {TEST_AGENT_KEY.key_id: TEST_AGENT_KEY.public_b64}
    decision = worker_refusal("x", policy_path="p", mode="enforce", fail_mode="closed")

    async def agents_found() -> dict[str, object]:
        await asave_agent(
            GovernanceAgent(id="rec-signed", owner="o", trust_scope=["p"]), "rec-signed"
        )
        unsigned = GovernanceAgent(id="rec-unsigned", owner="o", trust_scope=["p"])
        await unsigned.model_copy(update={"deployments": ["*"]}).asave(
            "rec-unsigned", overwrite=True
        )
        found = {}
        async with get_client() as client:
            for block in ("rec-signed", "rec-unsigned"):
                event = decision_event(
                    decision, agent_id=block, flow_run_id="r", envelope=None, agent_block=block
                )
                found[block] = (await _assessment_of(client, event, keys)).agent
        return found

    found = asyncio.run(agents_found())
    assert found["rec-signed"] is not None and found["rec-signed"].id == "rec-signed"
    assert found["rec-unsigned"] is None
