"""``prefect-governance demo``: the whole product on this machine, in about a minute.

A local Prefect server (SQLite, temporary home), the blocks in ``blocks/``, a
governed work pool, the example flow deployed four ways, a governed worker,
and four runs: allowed, refused, allowed with a warning, denied under audit.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow as prefect_flow
from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

from prefect_governance.apply import apply_documents, load_documents
from prefect_governance.lineage import LineageStore
from prefect_governance.local import PrefectServer, start_worker, stop
from prefect_governance.report import format_table, lineage_table
from prefect_governance.worker import GovernedProcessWorker

ROOT = Path(__file__).resolve().parent.parent
POOL = "governed"


@dataclass
class Scenario:
    """One deployment of the example flow and the run the demo starts for it."""

    name: str
    agent: str
    capabilities: list[str]
    parameters: dict[str, Any]
    expect: str
    flow_run_id: UUID | None = None
    marker: Path | None = None
    result: dict[str, Any] = field(default_factory=dict)


SCENARIOS = [
    Scenario(
        "nightly-load", "etl-agent", ["read:warehouse", "write:warehouse"], {"rows": 500}, "allowed"
    ),
    Scenario("purge-warehouse", "etl-agent", ["delete:warehouse"], {"rows": 5000}, "refused"),
    Scenario(
        "probation-report", "probation-agent", ["read:warehouse"], {"rows": 20}, "allowed, warned"
    ),
    Scenario("shadow-backfill", "shadow-agent", ["write:warehouse"], {"rows": 100}, "audited"),
]


def pool_template(**defaults: Any) -> dict[str, Any]:
    """The governed worker's base job template with some variables defaulted (pool-level)."""
    template = GovernedProcessWorker.get_default_base_job_template()
    for key, value in defaults.items():
        template["variables"]["properties"][key]["default"] = value
    return template


async def deploy_example(name: str, pool: str, job_variables: dict[str, Any]) -> UUID:
    """Deploy examples/flows.py:load_warehouse to a pool, from the local source."""
    source = await prefect_flow.from_source(
        source=str(ROOT / "examples"), entrypoint="flows.py:load_warehouse"
    )
    with contextlib.redirect_stdout(io.StringIO()):  # deploy() prints a table per call
        return await source.deploy(
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


async def _run(home: Path, api_url: str, opa_url: str | None) -> int:
    os.environ["PREFECT_GOVERNANCE_LINEAGE_URL"] = f"sqlite:///{home / 'lineage.db'}"
    if opa_url:
        os.environ["PREFECT_GOVERNANCE_OPA_URL"] = opa_url
    print("applying blocks/ ...")
    for change in await apply_documents(load_documents(ROOT / "blocks")):
        print(f"  {change.action:9}  {change.kind:13}  {change.name}")

    engine = "opa-sidecar" if opa_url else "embedded"
    async with get_client() as client:
        await client.create_work_pool(
            WorkPoolCreate(
                name=POOL,
                type=GovernedProcessWorker.type,
                base_job_template=pool_template(engine=engine, lineage_store="default"),
            )
        )
    print(f"created work pool {POOL!r} (type {GovernedProcessWorker.type}, engine {engine})")

    markers = home / "markers"
    markers.mkdir()
    async with get_client() as client:
        for scenario in SCENARIOS:
            deployment_id = await deploy_example(
                scenario.name,
                POOL,
                {"agent": scenario.agent, "capabilities": scenario.capabilities},
            )
            scenario.marker = markers / scenario.name
            run = await client.create_flow_run_from_deployment(
                deployment_id, parameters={**scenario.parameters, "marker": str(scenario.marker)}
            )
            scenario.flow_run_id = run.id
    print(f"deployed {len(SCENARIOS)} deployments and started one run of each; starting the worker")

    store = LineageStore(os.environ["PREFECT_GOVERNANCE_LINEAGE_URL"])
    worker = start_worker(POOL, home, api_url, home / "worker.log", limit=4)
    try:
        runs = await wait_final([s.flow_run_id for s in SCENARIOS], timeout=150)
        executed = [i for i, r in runs.items() if r.state and r.state.name != "Refused"]
        await wait_outcomes(store, executed, timeout=30)
    finally:
        stop(worker)

    rows = [
        (
            "deployment",
            "agent",
            "expected",
            "decision",
            "final state",
            "executed",
            "reasons / warnings",
        )
    ]
    ok = True
    for scenario in SCENARIOS:
        run = runs[scenario.flow_run_id]
        labels = run.labels or {}
        state = f"{run.state.type.value}/{run.state.name}" if run.state else "-"
        executed = scenario.marker.exists()
        decision = next(
            (e for e in store.recent(100, flow_run_id=str(run.id)) if e.kind == "decision"), None
        )
        notes = "; ".join(
            [*(decision.reasons if decision else []), *(decision.warnings if decision else [])]
        )
        verdict = labels.get("governance.decision", "-")
        rows.append(
            (
                scenario.name,
                scenario.agent,
                scenario.expect,
                verdict,
                state,
                "yes" if executed else "no",
                notes,
            )
        )
        ok &= verdict == scenario.expect.split(",")[0] and executed == (verdict != "refused")
    print()
    print(format_table(rows))
    print()
    print("lineage:")
    print(lineage_table(store.recent(50)))
    store.dispose()
    if not ok:
        print(f"\nthe demo did not go as expected; worker log: {home / 'worker.log'}")
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
