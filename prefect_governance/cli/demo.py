"""``prefect-governance demo``: the whole product on this machine, in about a minute.

A local Prefect server (SQLite, temporary home), a pool-owner key, the blocks in
``blocks/`` (agents signed with that key), two governed work pools (``governed``,
enforcing, and ``governed-shadow``, whose owner set audit mode), the example flow
deployed four ways, a governed worker per pool pinning the key, and four runs:
allowed, refused, allowed with a warning, denied under audit. Then an agent that learns
over four runs, one run whose every task is governed, and one run of six governed tasks
whose trust and memory move with each task (the fifth is refused for falling trust).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import Flow, get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

from prefect_governance.cli.apply import apply_documents, load_documents
from prefect_governance.cli.automations import apply_guards
from prefect_governance.cli.history import agent_text
from prefect_governance.cli.local import PrefectServer, start_worker, stop
from prefect_governance.core.attestation import DEFAULT_KEY_ID, KEYS_ENV
from prefect_governance.core.signing import SigningKey
from prefect_governance.lineage.store import LineageStore
from prefect_governance.worker.blocks import GovernanceAgent
from prefect_governance.worker.process import GovernedProcessWorker
from prefect_governance.worker.report import (
    format_table,
    lineage_table,
    memory_cell,
    trust_cell,
    verify_report,
)

ROOT = Path(__file__).resolve().parents[2]  # the checkout: examples/, blocks/
POOL = "governed"
SHADOW_POOL = "governed-shadow"  # audit mode, set by the pool owner in its template


@dataclass
class Scenario:
    """One deployment of the example flow and the run the demo starts for it."""

    name: str
    agent: str
    capabilities: list[str]
    parameters: dict[str, Any]
    expect: str
    pool: str = POOL
    flow_run_id: UUID | None = None
    marker: Path | None = None
    result: dict[str, Any] = field(default_factory=dict)

    def started(self) -> tuple[UUID, Path]:
        """The run the demo started for this deployment, and its marker file."""
        assert self.flow_run_id is not None and self.marker is not None, "not started yet"
        return self.flow_run_id, self.marker


SCENARIOS = [
    Scenario(
        "nightly-load", "etl-agent", ["read:warehouse", "write:warehouse"], {"rows": 500}, "allowed"
    ),
    Scenario("purge-warehouse", "etl-agent", ["delete:warehouse"], {"rows": 5000}, "refused"),
    Scenario(
        "probation-report", "probation-agent", ["read:warehouse"], {"rows": 20}, "allowed, warned"
    ),
    Scenario(
        "shadow-backfill",
        "shadow-agent",
        ["write:warehouse"],
        {"rows": 100},
        "audited",
        pool=SHADOW_POOL,
    ),
]


def pool_template(**defaults: Any) -> dict[str, Any]:
    """The governed worker's base job template with some variables defaulted (pool-level)."""
    template = GovernedProcessWorker.get_default_base_job_template()
    for key, value in defaults.items():
        template["variables"]["properties"][key]["default"] = value
    return template


async def deploy_example(
    name: str,
    pool: str,
    job_variables: dict[str, Any],
    flow_name: str = "load_warehouse",
    *,
    directory: Path = ROOT / "examples",
) -> UUID:
    """Deploy a flow of flows.py in ``directory`` (examples/) to a pool, from the local source."""
    source = await Flow.afrom_source(source=str(directory), entrypoint=f"flows.py:{flow_name}")
    with contextlib.redirect_stdout(io.StringIO()):  # deploy() prints a table per call
        return await source.adeploy(
            name=name,
            work_pool_name=pool,
            job_variables=job_variables,
            build=False,
            push=False,
            print_next_steps=False,
        )


async def wait_final(flow_run_ids: list[UUID], timeout: float) -> dict[UUID, Any]:
    """Poll until every run is in a final state (or the timeout)."""
    deadline = time.monotonic() + timeout
    async with get_client() as client:
        while True:
            runs = {i: await client.read_flow_run(i) for i in flow_run_ids}
            if all(r.state and r.state.is_final() for r in runs.values()):
                return runs
            if time.monotonic() > deadline:
                return runs
            await asyncio.sleep(1)


async def wait_outcomes(store: LineageStore, flow_run_ids: list[UUID], timeout: float) -> None:
    """Wait until the lineage holds an outcome for each run (the worker writes it last)."""
    deadline = time.monotonic() + timeout
    wanted = {str(i) for i in flow_run_ids}
    while time.monotonic() < deadline:
        seen = {e.flow_run_id for e in store.recent(1000) if e.kind == "outcome"}
        if wanted <= seen:
            return
        await asyncio.sleep(0.5)


async def _setup(home: Path, opa_url: str | None, owner: SigningKey) -> LineageStore:
    """Blocks (agents signed by the pool owner), the governed pools, the lineage store the
    demo reads."""
    os.environ["PREFECT_GOVERNANCE_LINEAGE_URL"] = f"sqlite:///{home / 'lineage.db'}"
    if opa_url:
        os.environ["PREFECT_GOVERNANCE_OPA_URL"] = opa_url
    print(f"generated the pool owner's key; the workers pin {owner.trusted_key}")
    lineage_key = SigningKey.generate("demo-lineage")  # the workers' only; pinned to verify
    os.environ["PREFECT_GOVERNANCE_LINEAGE_KEY"] = lineage_key.seed_b64
    os.environ["PREFECT_GOVERNANCE_LINEAGE_KEY_ID"] = lineage_key.key_id
    os.environ["PREFECT_GOVERNANCE_LINEAGE_KEYS"] = json.dumps(
        {lineage_key.key_id: lineage_key.public_b64}
    )
    print(f"generated the workers' lineage key; verifiers pin {lineage_key.trusted_key}")
    print("applying blocks/ (agents signed with the pool owner's key) ...")
    for change in await apply_documents(load_documents(ROOT / "blocks"), agent_key=owner):
        print(f"  {change.action:9}  {change.kind:13}  {change.name}")
    async with get_client() as client:
        for name, action in await apply_guards(client):
            print(f"  {action:9}  {'automation':13}  {name}")
    engine = "opa-sidecar" if opa_url else "embedded"
    async with get_client() as client:
        for name, mode in ((POOL, "enforce"), (SHADOW_POOL, "audit")):
            await client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type=GovernedProcessWorker.type,
                    base_job_template=pool_template(
                        engine=engine, lineage_store="default", mode=mode
                    ),
                )
            )
            print(
                f"created work pool {name!r} (type {GovernedProcessWorker.type}, "
                f"engine {engine}, mode {mode})"
            )
    return LineageStore(os.environ["PREFECT_GOVERNANCE_LINEAGE_URL"])


async def _four_runs(markers: Path, store: LineageStore) -> bool:
    """Part 1: four deployments, one run each, side by side."""
    async with get_client() as client:
        for scenario in SCENARIOS:
            deployment_id = await deploy_example(
                scenario.name,
                scenario.pool,
                {"agent": scenario.agent, "capabilities": scenario.capabilities},
            )
            scenario.marker = markers / scenario.name
            run = await client.create_flow_run_from_deployment(
                deployment_id, parameters={**scenario.parameters, "marker": str(scenario.marker)}
            )
            scenario.flow_run_id = run.id
    print(f"\npart 1: {len(SCENARIOS)} deployments, one run each")
    runs = await wait_final([s.started()[0] for s in SCENARIOS], timeout=150)
    executed = [i for i, r in runs.items() if r.state and r.state.name != "Refused"]
    await wait_outcomes(store, executed, timeout=30)

    header = ("deployment", "pool", "agent", "expected", "decision", "final state", "executed")
    rows = [(*header, "reasons")]
    ok = True
    for scenario in SCENARIOS:
        run_id, marker = scenario.started()
        run = runs[run_id]
        verdict = (run.labels or {}).get("governance.decision", "-")
        ran = marker.exists()
        decision = _event(store, run.id, "decision")
        notes = "; ".join([*decision.reasons, *decision.warnings]) if decision else ""
        rows.append(
            (
                scenario.name,
                scenario.pool,
                scenario.agent,
                scenario.expect,
                verdict,
                _state(run),
                "yes" if ran else "no",
                notes,
            )
        )
        ok &= verdict == scenario.expect.split(",")[0] and ran == (verdict != "refused")
    print(format_table(rows))
    for scenario in SCENARIOS:
        run = runs[scenario.started()[0]]
        if run.state and run.state.name == "Refused":
            print(f"{scenario.name}: {run.state.message}")
    return ok


# Part 2: one agent with memory, run after run.
LEARNING = [
    ({"rows": 100}, "completes; memory v1 committed"),
    ({"rows": 5, "report_rows": -1}, "completes; its proposal breaks the schema"),
    ({"rows": 1, "fail": True}, "fails"),
    ({"rows": 1}, "refused: trust fell three runs running"),
]


async def run_in_order(
    deployment_id: UUID, plan: list[dict[str, Any]], markers: Path, store: LineageStore
) -> list[tuple[Any, Any, dict[str, Any]]]:
    """Start each run when the one before has ended and been recorded.

    Returns, per run: the flow run, what its marker holds (None if its body
    never ran), and its lineage events by kind.
    """
    results = []
    async with get_client() as client:
        for i, parameters in enumerate(plan):
            marker = markers / f"{deployment_id}-{i}.json"
            run = await client.create_flow_run_from_deployment(
                deployment_id, parameters={**parameters, "marker": str(marker)}
            )
            final = (await wait_final([run.id], timeout=120))[run.id]
            if final.state and final.state.name != "Refused":
                await wait_outcomes(store, [run.id], timeout=60)
            seen = json.loads(marker.read_text()) if marker.exists() else None
            events: dict[str, Any] = {e.kind: e for e in store.recent(50, flow_run_id=str(run.id))}
            results.append((final, seen, events))
    return results


async def _learning(markers: Path, store: LineageStore) -> bool:
    deployment_id = await deploy_example(
        "learner", POOL, {"agent": "learner-agent"}, flow_name="learn"
    )
    print("\npart 2: learner-agent runs four times in a row")
    results = await run_in_order(deployment_id, [p for p, _ in LEARNING], markers, store)
    rows = [("run", "parameters", "expected", "decision", "final state", "memory", "trust")]
    for i, ((params, expect), (run, _, events)) in enumerate(
        zip(LEARNING, results, strict=True), start=1
    ):
        memory = "-"
        if "memory_commit" in events:
            memory = f"committed v{events['memory_commit'].payload['version']}"
        elif "memory_rejected" in events:
            memory = "rejected: " + "; ".join(events["memory_rejected"].reasons)
        trust = events.get("trust")
        rows.append(
            (
                str(i),
                ", ".join(f"{k}={v}" for k, v in params.items()),
                expect,
                events["decision"].verdict if "decision" in events else "-",
                _state(run),
                memory,
                f"{trust.payload['score']:.2f}" if trust else "-",
            )
        )
    print(format_table(rows))
    refused = results[-1][0]
    print(f"run 4: {refused.state.message}" if refused.state else "")
    verdicts = [events["decision"].verdict for _, _, events in results]
    return verdicts == ["allowed", "allowed", "allowed", "refused"]


# Part 3: governance inside one allowed run.
PIPELINE_STEPS = ["extract", "drop_tables", "summarize", "report"]


async def _run_once(deployment_id: UUID, steps: Path, store: LineageStore) -> tuple[Any, list[Any]]:
    """One run of a deployment that leaves its markers in ``steps``: its final state and
    its lineage records, in the chain's order."""
    steps.mkdir()
    async with get_client() as client:
        run = await client.create_flow_run_from_deployment(
            deployment_id, parameters={"marker_dir": str(steps)}
        )
    final = (await wait_final([run.id], timeout=120))[run.id]
    await wait_outcomes(store, [run.id], timeout=60)
    return final, [e for e in store.recent(200, flow_run_id=str(run.id))][::-1]


async def _inside(markers: Path, store: LineageStore) -> bool:
    deployment_id = await deploy_example(
        "pipeline",
        POOL,
        {"agent": "pipeline-agent", "capabilities": ["read:warehouse", "write:warehouse"]},
        flow_name="governed_pipeline",
    )
    print("\npart 3: pipeline-agent, one allowed run with every task governed")
    steps = markers / "pipeline"
    final, events = await _run_once(deployment_id, steps, store)
    rows = [("#", "inside the run", "decision", "body ran / used", "reasons")]
    for e in events:
        payload = e.payload or {}
        if e.kind == "task_decision":
            name = payload["task"]["name"]
            what = f"task {name}" + (
                " (asked again to retry)" if payload.get("purpose") == "retry" else ""
            )
            done = "yes" if (steps / name).exists() else "no"
        elif e.kind == "capability_use":
            task = (payload.get("task") or {}).get("name", "flow")
            what, done = f"{payload['capability']} in {task}", "yes" if e.allow else "no"
        else:
            continue
        rows.append((str(payload.get("seq")), what, e.verdict or "-", done, "; ".join(e.reasons)))
    print(f"flow run: {_state(final)}")
    print(format_table(rows))
    ran = {step: (steps / step).exists() for step in PIPELINE_STEPS}
    blocked = [e for e in events if e.kind == "capability_use" and not e.allow]
    refused = [e for e in events if e.kind == "task_decision" and e.verdict == "refused"]
    return (
        bool(final.state and final.state.is_completed())
        and ran == {"extract": True, "drop_tables": False, "summarize": True, "report": True}
        and not (steps / "write").exists()
        and len(blocked) == 1
        and {e.payload["task"]["name"] for e in refused} == {"drop_tables"}
    )


# Part 4: each task a governed mutation: trust and memory move with every task.
POSTURE_TASKS = ["load_batch", "check_batch", "transform", "annotate", "publish", "notify"]
POSTURE_EXPECTED = ["completed", "completed", "failed", "memory_rejected", "refused", "refused"]


async def _posture(markers: Path, store: LineageStore) -> bool:
    deployment_id = await deploy_example(
        "posture", POOL, {"agent": "posture-agent"}, flow_name="posture_pipeline"
    )
    print("\npart 4: posture-agent, one run of six governed tasks; each moves trust and memory")
    steps = markers / "posture"
    final, events = await _run_once(deployment_id, steps, store)
    admits = {
        e.payload["task"]["name"]: e
        for e in events
        if e.kind == "task_decision" and e.payload.get("purpose") == "admit"
    }
    ends = {e.payload["task"]["name"]: e for e in events if e.kind == "task_end"}
    rows = [("#", "task", "decision", "body ran", "outcome", "memory", "trust", "reasons")]
    for i, name in enumerate(POSTURE_TASKS, start=1):
        admit, end = admits.get(name), ends.get(name)
        payload = end.payload if end else {}
        reasons = admit.reasons if admit and admit.verdict == "refused" else []
        if end and end.verdict == "memory_rejected":
            reasons = (payload.get("memory") or {}).get("errors") or []
        rows.append(
            (
                str(i),
                name,
                admit.verdict or "-" if admit else "-",
                "yes" if (steps / name).exists() else "no",
                end.verdict or "-" if end else "-",
                memory_cell(payload),
                trust_cell(payload) if end else "-",
                "; ".join(reasons),
            )
        )
    print(f"flow run: {_state(final)}")
    print(format_table(rows))
    print("\n$ prefect-governance agent show posture-agent")
    agent: GovernanceAgent = await GovernanceAgent.aload("posture-agent")
    print(agent_text(store, agent, runs=1))
    memory = store.memory.latest(agent.id)
    outcomes = [ends[n].verdict if n in ends else None for n in POSTURE_TASKS]
    return (
        outcomes == POSTURE_EXPECTED
        and not (steps / "publish").exists()
        and not (steps / "notify").exists()
        and memory.content == {"processed": 100}
        and all(e.payload["check"].get("verified") is True for e in ends.values())
    )


def _event(store: LineageStore, flow_run_id: UUID, kind: str) -> Any:
    return next(
        (e for e in store.recent(100, flow_run_id=str(flow_run_id)) if e.kind == kind), None
    )


def _state(run: Any) -> str:
    return f"{run.state.type.value}/{run.state.name}" if run.state else "-"


async def _run(home: Path, api_url: str, opa_url: str | None) -> int:
    owner = SigningKey.generate(DEFAULT_KEY_ID)
    store = await _setup(home, opa_url, owner)
    markers = home / "markers"
    markers.mkdir()
    pinned = {KEYS_ENV: json.dumps({owner.key_id: owner.public_b64})}
    workers = [
        start_worker(POOL, home, api_url, home / "worker.log", limit=4, extra_env=pinned),
        start_worker(SHADOW_POOL, home, api_url, home / "worker-shadow.log", extra_env=pinned),
    ]
    try:
        ok = await _four_runs(markers, store)
        ok &= await _learning(markers, store)
        ok &= await _inside(markers, store)
        ok &= await _posture(markers, store)
    finally:
        for worker in workers:
            stop(worker)

    print("\n$ prefect-governance agent show learner-agent")
    agent: GovernanceAgent = await GovernanceAgent.aload("learner-agent")
    print(agent_text(store, agent))
    print("\n$ prefect-governance lineage list")
    print(lineage_table(store.recent(60)))
    print("\n$ prefect-governance lineage verify")
    problems = store.verify()
    unvouched = store.unvouched_chains()
    print(verify_report(store.lengths(), problems, unvouched, pinned=sorted(store.keys)))
    ok &= not problems and not unvouched
    store.dispose()
    if not ok:
        print(f"\nthe demo did not go as expected; worker logs: {home}/worker*.log")
    return 0 if ok else 1


def run_demo(opa_url: str | None = None, keep: bool = False) -> int:
    """Run the demo end to end; return the exit code."""
    home = Path(tempfile.mkdtemp(prefix="prefect-governance-demo-"))
    started = time.monotonic()
    print(f"starting a local Prefect server (SQLite) in {home} ...")
    server = PrefectServer(home).start()
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url, PREFECT_HOME: str(home)}):
            code = asyncio.run(_run(home, server.api_url, opa_url))
    finally:
        server.stop()
        if not keep:
            shutil.rmtree(home, ignore_errors=True)
    print(
        f"\ndemo finished in {time.monotonic() - started:.0f}s" + (f"; kept {home}" if keep else "")
    )
    return code
