"""Each task a governed mutation, end to end (issue 19): a real Prefect server and a
governed worker per engine (embedded, OPA).

- ``posture_pipeline``: six governed tasks. Task 1 commits memory that task 2 reads in
  the same run; task 3 fails; task 4's proposal breaks the memory schema and is rejected
  at its end; task 5 is refused because trust fell across the last three tasks (and task
  6, whose inherited trust is still falling). The refused bodies never run; the memory
  committed after the run is exactly the accepted proposal; the chain holds each task's
  decision, end, memory change and trust between the run's decision and its outcome.
- ``posture_liar``: the flow's own code reports a failed task as completed; the
  worker's recomputation catches it and keeps its own account.
- ``posture_concurrent``: runs of one agent at once each commit memory and move trust;
  none of it is lost.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from examples.flows import POSTURE_MEMORY_SCHEMA
from prefect_governance.core.trust import TrustWeights, next_score
from prefect_governance.lineage.events import LineageEvent
from prefect_governance.lineage.memory import MemoryStore
from prefect_governance.lineage.store import LineageStore
from prefect_governance.testing import (
    Harness,
    create_pool,
    deploy_example,
    wait_final,
    wait_outcomes,
)
from prefect_governance.worker.blocks import GovernanceAgent
from tests.agents import harness

pytestmark = pytest.mark.e2e

ENGINES = ("embedded", "opa")
PIPELINE = ["load_batch", "check_batch", "transform", "annotate", "publish", "notify"]
CONCURRENT = 3


@dataclass
class Observed:
    flow_run: Any
    task_runs: dict[str, Any]  # by task name
    markers: Path
    events: list[LineageEvent]  # the run's records, in chain order

    def ran(self, step: str) -> bool:
        return (self.markers / step).exists()

    def of(self, kind: str) -> list[LineageEvent]:
        return [e for e in self.events if e.kind == kind]


def _agent(agent_id: str, pool: str, baseline: float) -> GovernanceAgent:
    return GovernanceAgent(
        id=agent_id,
        owner="ml@example.com",
        trust_scope=[pool],
        memory_schema=POSTURE_MEMORY_SCHEMA,
        trust_baseline=baseline,
    )


async def _setup(gov: Harness, opa_url: str) -> dict[tuple[str, str], str]:
    lineage = await gov.save_lineage()
    deployments: dict[tuple[str, str], str] = {}
    for engine in ENGINES:
        pool = f"posture-{engine}"
        if engine == "embedded":
            await gov.save_engine("posture-embedded", kind="embedded")
        else:
            await gov.save_engine("posture-opa", kind="opa", opa_url=opa_url)
        await create_pool(pool, engine=f"posture-{engine}", lineage_store=lineage)
        for name, flow, baseline in (
            ("pipeline", "posture_pipeline", 0.8),
            ("liar", "posture_liar", 0.8),
            ("concurrent", "posture_concurrent", 0.5),
        ):
            agent_id = f"{name}-{engine}"
            await gov.save_agent(_agent(agent_id, pool, baseline))
            deployments[(engine, name)] = await deploy_example(
                f"posture-{name}-{engine}", pool, {"agent": agent_id}, flow_name=flow
            )
    return deployments


async def _observe(store: LineageStore, agent_id: str, run: Any, markers: Path) -> Observed:
    async with get_client() as client:
        final = await client.read_flow_run(run.id)
        tasks = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
        )
    chain = [e for e in store.chain(agent_id) if e.flow_run_id == str(run.id)]
    return Observed(final, {t.name.rsplit("-", 1)[0]: t for t in tasks}, markers, chain)


async def _run_all(deployments, tmp: Path, store: LineageStore) -> dict[Any, Observed]:
    started: dict[Any, tuple[str, Any, Path]] = {}
    async with get_client() as client:
        for (engine, name), deployment_id in deployments.items():
            copies = CONCURRENT if name == "concurrent" else 1
            for i in range(copies):
                markers = tmp / f"{engine}-{name}-{i}"
                markers.mkdir()
                parameters: dict[str, Any] = {"marker_dir": str(markers)}
                if name == "concurrent":
                    parameters["key"] = f"run{i}"
                run = await client.create_flow_run_from_deployment(
                    deployment_id, parameters=parameters
                )
                started[(engine, name, i)] = (f"{name}-{engine}", run, markers)
    ids = [run.id for _, run, _ in started.values()]
    await wait_final(ids, timeout=300)
    await wait_outcomes(store, ids, timeout=90)
    return {
        key: await _observe(store, agent_id, run, markers)
        for key, (agent_id, run, markers) in started.items()
    }


@pytest.fixture(scope="module")
def posture(prefect_server, opa_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("posture")
    with harness(prefect_server, tmp, lineage_block="posture-lineage") as gov:
        deployments = asyncio.run(_setup(gov, opa_server.url))
        for engine in ENGINES:
            gov.start_worker(f"posture-{engine}", log=tmp / f"worker-{engine}.log")
        try:
            observed = asyncio.run(_run_all(deployments, tmp, gov.store))
        finally:
            gov.stop_workers()
        yield observed, gov.store


def _ends(run: Observed) -> dict[str, LineageEvent]:
    return {e.payload["task"]["name"]: e for e in run.of("task_end")}


@pytest.mark.parametrize("engine", ENGINES)
def test_six_tasks_move_the_posture_and_the_fifth_is_refused(posture, engine):
    observed, _ = posture
    run = observed[(engine, "pipeline", 0)]
    assert run.flow_run.state.is_completed(), run.flow_run.state
    states = {name: run.task_runs[name].state for name in PIPELINE}
    assert states["load_batch"].is_completed() and states["check_batch"].is_completed()
    assert states["transform"].is_failed()
    assert states["annotate"].is_failed()
    assert "rejected the memory proposal of task 'annotate'" in states["annotate"].message
    assert "processed" in states["annotate"].message and "minimum" in states["annotate"].message
    for refused in ("publish", "notify"):
        assert states[refused].is_failed()
        assert f"governance refused task {refused!r}" in states[refused].message
        assert "fell across its last three tasks" in states[refused].message
        assert not run.ran(refused), f"the refused task {refused}'s body ran"
    for ran in ("load_batch", "check_batch", "transform", "annotate"):
        assert run.ran(ran)
    # Task 2 read what task 1's accepted proposal made, in the same run.
    assert json.loads((run.markers / "check_batch").read_text()) == {"processed": 100}


@pytest.mark.parametrize("engine", ENGINES)
def test_the_chain_holds_each_task_between_the_decision_and_the_outcome(posture, engine):
    observed, store = posture
    run = observed[(engine, "pipeline", 0)]
    kinds = [e.kind for e in run.events]
    assert kinds[0] == "decision" and kinds[-2:] == ["outcome", "trust"], kinds
    inside = kinds[1:-2]
    assert set(inside) == {"task_decision", "task_end"}, inside
    names = [
        (e.kind, e.payload["task"]["name"], e.payload.get("purpose")) for e in run.events[1:-2]
    ]
    expected: list[tuple[str, str, str | None]] = []
    for name in PIPELINE:
        expected.append(("task_decision", name, "admit"))
        if name in ("load_batch", "annotate"):
            expected.append(("task_decision", name, "commit"))
        expected.append(("task_end", name, None))
    assert names == expected
    ends = _ends(run)
    assert [ends[n].verdict for n in PIPELINE] == [
        "completed",
        "completed",
        "failed",
        "memory_rejected",
        "refused",
        "refused",
    ]
    weights = TrustWeights()
    score = 0.8
    for name in PIPELINE:
        end = ends[name]
        assert end.payload["check"] == {"verified": True}, (name, end.payload["check"])
        assert end.payload["previous"] == score
        score = next_score(score, end.payload["events"], weights)
        assert end.payload["score"] == score
    assert ends["load_batch"].payload["memory"]["status"] == "committed"
    assert ends["load_batch"].payload["memory"]["version"] == 1
    rejected = ends["annotate"].payload["memory"]
    assert rejected["status"] == "rejected" and rejected["fields"] == ["processed"]
    assert ends["check_batch"].payload["memory"] is None
    # The run's trust continues from the last task's.
    trust = run.events[-1]
    assert trust.payload["previous"] == score
    assert trust.payload["score"] == next_score(score, trust.payload["events"], weights)
    for decision in run.of("task_decision"):
        assert decision.payload["check"] == {"verified": True}, decision.payload["check"]
    window = next(
        e for e in run.of("task_decision") if e.payload["task"]["name"] == "publish"
    ).payload["posture"]["window"]
    assert window == [ends[n].payload["score"] for n in ("check_batch", "transform", "annotate")]
    assert store.verify() == []


@pytest.mark.parametrize("engine", ENGINES)
def test_the_memory_committed_is_exactly_the_accepted_proposals(posture, engine):
    observed, store = posture
    history = MemoryStore(store.engine).history(f"pipeline-{engine}")
    assert [(m.version, m.content) for m in history] == [(1, {"processed": 100})]
    run = observed[(engine, "pipeline", 0)]
    assert history[0].flow_run_id == str(run.flow_run.id)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_run_that_lies_about_a_task_outcome_is_caught(posture, engine):
    observed, _ = posture
    run = observed[(engine, "liar", 0)]
    assert run.ran("flaky") and run.task_runs["flaky"].state.is_failed()
    ends = _ends(run)
    flaky = ends["flaky"]
    assert flaky.payload["reported"]["outcome"] == "completed", "the run did lie"
    assert flaky.verdict == "failed", "the lineage keeps the worker's account"
    assert flaky.payload["check"]["verified"] is False
    assert "Prefect holds the task run FAILED" in flaky.payload["check"]["why"]
    assert flaky.payload["score"] == next_score(0.8, ["failed"], TrustWeights())
    # The next task was decided with the posture the lie made: caught too.
    after = next(e for e in run.of("task_decision") if e.payload["task"]["name"] == "check_batch")
    assert after.payload["check"]["verified"] is False
    assert "posture" in after.payload["check"]["why"]
    assert ends["check_batch"].payload["previous"] == flaky.payload["score"]


@pytest.mark.parametrize("engine", ENGINES)
def test_concurrent_runs_of_one_agent_lose_no_trust_or_memory(posture, engine):
    observed, store = posture
    runs = [observed[(engine, "concurrent", i)] for i in range(CONCURRENT)]
    for run in runs:
        assert run.flow_run.state.is_completed(), run.flow_run.state
    agent = f"concurrent-{engine}"
    memory = MemoryStore(store.engine).latest(agent)
    assert memory.version == CONCURRENT
    assert memory.content == {"seen": {f"run{i}": True for i in range(CONCURRENT)}}
    # Every trust movement continues from the one before it in the agent's chain.
    moves = [e for e in store.chain(agent) if e.kind in ("task_end", "trust")]
    assert len(moves) == CONCURRENT * 3
    score = 0.5
    for move in moves:
        assert move.payload["previous"] == score, (move.kind, move.payload)
        score = move.payload["score"]
    expected = 0.5
    for _ in range(CONCURRENT):
        expected = next_score(expected, ["completed"], TrustWeights())  # task 1
        expected = next_score(expected, ["completed"], TrustWeights())  # task 2
        expected = next_score(expected, ["completed"], TrustWeights())  # the run
    assert score == expected
