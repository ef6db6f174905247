"""Governance inside a run, end to end: governed tasks and mediated capabilities.

A real Prefect server and a governed worker per engine (embedded, OPA). Each
engine's agent runs three flow runs:

- ``pipeline``: every task governed by ``govern``; ``drop_tables`` is denied
  by name and never runs (nor retries), ``summarize`` uses the capability it
  declared and is blocked from one it did not, and the flow completes;
- ``granted``: a task declaring ``write:warehouse`` and the flow body using it,
  both allowed because the run was granted it;
- ``narrowed``: the same flow for an agent whose trust is below the capability's
  minimum: the decision withholds ``write:warehouse``, so the task is refused
  and the flow body's use is blocked, and the run still completes.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from prefect_governance.cli.local import prefect_env
from prefect_governance.core.trust import TrustWeights
from prefect_governance.lineage.events import LineageEvent
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
CAPABILITIES = ["read:warehouse", "write:warehouse"]


@dataclass
class Observed:
    flow_run: Any
    task_runs: dict[str, Any]  # by task name
    markers: Path
    events: list[LineageEvent]  # the run's lineage records, in chain order

    def ran(self, step: str) -> bool:
        return (self.markers / step).exists()

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    def inside(self) -> list[LineageEvent]:
        return [e for e in self.events if e.kind in ("task_decision", "capability_use", "task_end")]


async def _setup(gov: Harness, opa_url: str) -> dict[str, dict[str, Any]]:
    lineage = await gov.save_lineage()
    await gov.save_engine("tasks-embedded", kind="embedded")
    await gov.save_engine("tasks-opa", kind="opa", opa_url=opa_url)
    deployments: dict[str, dict[str, Any]] = {}
    for engine in ENGINES:
        pool = f"tasks-{engine}"
        common = {
            # A blocked use its task recovers from costs nothing, so that the task after
            # the refused one is not refused for falling trust (tests/test_task_posture_e2e).
            "trust_weights": TrustWeights(capability_blocked=0.0),
            "owner": "data@example.com",
            "trust_scope": [pool],
            "capabilities": CAPABILITIES,
            "constraints": {"tasks": {"deny": ["drop_tables"]}},
        }
        await gov.save_agent(GovernanceAgent(id=f"tasker-{engine}", **common))
        await gov.save_agent(
            GovernanceAgent(
                id=f"probation-{engine}",
                trust_baseline=0.6,
                **{
                    **common,
                    "constraints": {"capability_trust": {"write:warehouse": 0.9}},
                },
            )
        )
        await create_pool(pool, engine=f"tasks-{engine}", lineage_store=lineage)
        variables = {"agent": f"tasker-{engine}", "capabilities": CAPABILITIES}
        deployments[engine] = {
            "pipeline": await deploy_example(
                f"pipeline-{engine}", pool, variables, flow_name="governed_pipeline"
            ),
            "granted": await deploy_example(
                f"granted-{engine}", pool, variables, flow_name="narrowed_write"
            ),
            "narrowed": await deploy_example(
                f"narrowed-{engine}",
                pool,
                {**variables, "agent": f"probation-{engine}"},
                flow_name="narrowed_write",
            ),
        }
    return deployments


async def _run_all(deployments, tmp: Path, store: LineageStore) -> dict[tuple[str, str], Observed]:
    started: dict[tuple[str, str], tuple[Any, Path]] = {}
    async with get_client() as client:
        for engine, by_name in deployments.items():
            for name, deployment_id in by_name.items():
                markers = tmp / f"{engine}-{name}"
                markers.mkdir()
                run = await client.create_flow_run_from_deployment(
                    deployment_id,
                    parameters={"marker_dir": str(markers)}
                    | ({"api_token": "s3cr3t-token"} if name == "pipeline" else {}),
                )
                started[(engine, name)] = (run, markers)
    ids = [run.id for run, _ in started.values()]
    finals = await wait_final(ids, timeout=240)
    await wait_outcomes(store, ids, timeout=60)
    observed = {}
    async with get_client() as client:
        for key, (run, markers) in started.items():
            tasks = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
            )
            chain = store.chain(f"{'tasker' if key[1] != 'narrowed' else 'probation'}-{key[0]}")
            observed[key] = Observed(
                flow_run=finals[run.id],
                task_runs={t.name.rsplit("-", 1)[0]: t for t in tasks},
                markers=markers,
                events=[e for e in chain if e.flow_run_id == str(run.id)],
            )
    return observed


@pytest.fixture(scope="module")
def inside(prefect_server, opa_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tasks")
    with harness(prefect_server, tmp, lineage_block="tasks-lineage") as gov:
        deployments = asyncio.run(_setup(gov, opa_server.url))
        store = gov.store
        for engine in ENGINES:
            gov.start_worker(f"tasks-{engine}", log=tmp / f"worker-{engine}.log")
        try:
            observed = asyncio.run(_run_all(deployments, tmp, store))
        finally:
            gov.stop_workers()
        yield observed, store


@pytest.mark.parametrize("engine", ENGINES)
def test_a_refused_task_never_runs_and_the_flow_completes(inside, engine):
    observed, _ = inside
    run = observed[(engine, "pipeline")]
    assert run.flow_run.state.is_completed(), run.flow_run.state
    assert run.ran("extract") and run.ran("report"), "the allowed tasks ran"
    assert not run.ran("drop_tables"), "the refused task's body ran"
    dropped = run.task_runs["drop_tables"]
    assert dropped.state.is_failed()
    assert "governance refused task 'drop_tables'" in dropped.state.message
    assert "its name is in constraints.tasks.deny" in dropped.state.message
    assert "[prefect.governance.task_rules.names.deny]" in dropped.state.message
    assert dropped.run_count == 1, "a refused task was retried though the policy did not change"


@pytest.mark.parametrize("engine", ENGINES)
def test_an_undeclared_capability_is_blocked_before_use(inside, engine):
    observed, _ = inside
    run = observed[(engine, "pipeline")]
    assert run.ran("read"), "the declared capability was usable"
    assert not run.ran("write"), "the undeclared capability was used"
    blocked = (run.markers / "blocked").read_text()
    assert "capability 'write:warehouse' denied" in blocked
    assert "did not declare it" in blocked


@pytest.mark.parametrize("engine", ENGINES)
def test_task_decisions_and_uses_join_the_chain_in_order(inside, engine):
    observed, store = inside
    run = observed[(engine, "pipeline")]
    kinds = run.kinds()
    assert kinds[0] == "decision" and kinds[-2:] == ["outcome", "trust"], kinds
    inside_events = run.inside()
    assert kinds[1 : 1 + len(inside_events)] == [e.kind for e in inside_events], (
        "what happened inside sits between the decision and the outcome"
    )
    seqs = [e.payload["seq"] for e in inside_events]
    assert seqs == list(range(1, len(seqs) + 1)), "in the run's order, none missing"
    tasks = {e.payload["task"]["name"]: e for e in inside_events if e.kind == "task_decision"}
    assert set(tasks) == {"extract", "drop_tables", "summarize", "report"}
    assert tasks["drop_tables"].verdict == "refused"
    assert any("drop_tables" in r for r in tasks["drop_tables"].reasons)
    assert all(tasks[t].verdict == "allowed" for t in ("extract", "summarize", "report"))
    for event in tasks.values():
        assert event.payload["check"] == {"verified": True}, event.payload["check"]
        assert event.engine == engine
    summarize = tasks["summarize"].payload["envelope"]
    assert summarize["capabilities"] == ["read:warehouse"]
    assert summarize["parameters"]["api_token"] == "***REDACTED***"
    assert summarize["parent"]["decision_id"] == run.events[0].decision_id
    uses = [e for e in inside_events if e.kind == "capability_use"]
    assert [(u.payload["capability"], u.verdict) for u in uses] == [
        ("read:warehouse", "used"),
        ("write:warehouse", "blocked"),
    ]
    assert uses[0].payload["task"]["name"] == "summarize"
    ends = {e.payload["task"]["name"]: e for e in inside_events if e.kind == "task_end"}
    assert {n: e.verdict for n, e in ends.items()} == {
        "extract": "completed",
        "drop_tables": "refused",
        "summarize": "completed",
        "report": "completed",
    }
    assert ends["summarize"].payload["events"] == ["completed", "capability_blocked"]
    assert all(e.payload["check"] == {"verified": True} for e in ends.values())
    assert store.verify() == []


@pytest.mark.parametrize("engine", ENGINES)
def test_the_decision_narrows_grants_and_the_runtime_honours_them(inside, engine):
    observed, _ = inside
    granted, narrowed = observed[(engine, "granted")], observed[(engine, "narrowed")]
    assert granted.flow_run.state.is_completed(), granted.flow_run.state
    assert granted.ran("task-write") and granted.ran("flow-write")
    # No refusal hurried these to Prefect: sent by the run's log on its own (batch or exit).
    assert [(e.kind, e.verdict) for e in granted.inside()] == [
        ("task_decision", "allowed"),
        ("capability_use", "used"),
        ("task_end", "completed"),
        ("capability_use", "used"),
    ]
    assert narrowed.flow_run.state.is_completed(), narrowed.flow_run.state
    assert not narrowed.ran("task-write"), "a task declaring a withheld capability ran"
    assert not narrowed.ran("flow-write"), "a withheld capability was used"
    assert "not granted to this flow run" in (narrowed.markers / "flow-blocked").read_text()
    decision = narrowed.events[0]
    assert any("write:warehouse" in w for w in decision.warnings), decision.warnings
    task = next(e for e in narrowed.events if e.kind == "task_decision")
    assert task.verdict == "refused"
    assert any("write:warehouse" in r for r in task.reasons), task.reasons
    assert narrowed.task_runs["write_summary"].state.is_failed()


def test_a_refused_task_is_visible_in_lineage_show_and_export(inside, prefect_server, tmp_path):
    _, store = inside
    env = prefect_env(prefect_server.home, prefect_server.api_url)

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "prefect_governance.cli", *args, "--url", store.url],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )

    shown = cli("lineage", "show", "--agent", "tasker-embedded")
    assert shown.returncode == 0, shown.stderr
    assert "task_decision" in shown.stdout and "drop_tables" in shown.stdout
    assert "capability_use" in shown.stdout
    verified = cli("lineage", "verify")
    assert verified.returncode == 0 and "chains intact" in verified.stdout, verified.stdout
