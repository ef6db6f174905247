"""Detection: `prefect-governance audit` finds runs of governed pools that executed
without their decision or against it.

The judgement is a pure function, tested with a table of cases; the command is
tested against a real Prefect server with real workers: a governed pool audits
clean, a stock worker on a governed pool and a refused run forced to Running are
found.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect import get_client
from prefect.states import Running, Scheduled
from prefect.workers.process import ProcessWorker

from prefect_governance.cli import audit as audit_module
from prefect_governance.cli.audit import (
    DecisionFact,
    RunFacts,
    audit,
    decision_facts,
    judge,
    parse_when,
)
from prefect_governance.cli.local import free_port, prefect_env
from prefect_governance.core.trust import TrustWeights
from prefect_governance.lineage.events import LineageEvent
from prefect_governance.lineage.store import LineageStore
from prefect_governance.testing import (
    Harness,
    create_pool,
    deploy_example,
    pool_template,
    wait_final,
    wait_outcomes,
)
from prefect_governance.worker.blocks import GovernanceAgent
from tests.agents import harness

CLI = [sys.executable, "-m", "prefect_governance.cli"]
T0 = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)

# --- the judgement, pure --------------------------------------------------------------


_AUTO: Any = object()


def _run(
    state_type: str | None,
    state_name: str | None = None,
    *,
    started: datetime | None = None,
    label: str | None = None,
    runs: int | None = _AUTO,
    ended: datetime | None = None,
) -> RunFacts:
    """A run's facts; by default it entered RUNNING once if it has a start time."""
    labels = {"governance.decision_id": label} if label is not None else {}
    return RunFacts(
        id="run-1",
        name="brave-otter",
        pool="gov",
        state_type=state_type,
        state_name=state_name or (state_type or "").title(),
        start_time=started,
        labels=labels,
        run_count=(1 if started else 0) if runs is _AUTO else runs,
        end_time=ended,
    )


def _decision(decision_id: str, verdict: str, minute: int = 0, order: int = 1) -> DecisionFact:
    return DecisionFact(decision_id, verdict, T0 + timedelta(minutes=minute), order)


ALLOWED = _decision("d-allow", "allowed", 0, 1)
REFUSED = _decision("d-refuse", "refused", 0, 1)
LATER = T0 + timedelta(minutes=1)

CASES: list[tuple[str, RunFacts, list[DecisionFact], list[str]]] = [
    # runs that have not started are never findings, whatever the lineage holds
    ("scheduled, no decision", _run("SCHEDULED"), [], []),
    ("pending, no decision", _run("PENDING"), [], []),
    ("late, no decision", _run("SCHEDULED", "Late"), [], []),
    ("cancelled before it started, no decision", _run("CANCELLED"), [], []),
    ("crashed before it started (reconciler)", _run("CRASHED"), [ALLOWED], []),
    ("refused and never started", _run("CANCELLED", "Refused", label="d-refuse"), [REFUSED], []),
    ("pending after an allowed decision, unlabelled yet", _run("PENDING"), [ALLOWED], []),
    # Prefect stamps a start time (= the end time) on a run that ends without running
    (
        "refused: CANCELLED with start time = end time",
        _run("CANCELLED", "Refused", started=LATER, ended=LATER, runs=0, label="d-refuse"),
        [REFUSED],
        [],
    ),
    (
        "cancelled while scheduled, no decision",
        _run("CANCELLED", started=LATER, ended=LATER, runs=0),
        [],
        [],
    ),
    (
        "marked completed by hand, never ran",
        _run("COMPLETED", started=LATER, ended=LATER, runs=0),
        [],
        [],
    ),
    (
        "no run count: start = end means it never ran",
        _run("CANCELLED", started=LATER, ended=LATER, runs=None),
        [],
        [],
    ),
    (
        "no run count: it ran from start to end",
        _run("COMPLETED", started=T0, ended=LATER, runs=None),
        [],
        ["executed_without_decision"],
    ),
    (
        "no run count: started and not ended",
        _run("SCHEDULED", "AwaitingRetry", started=T0, runs=None),
        [],
        ["executed_without_decision"],
    ),
    # (a) executed without a decision
    (
        "ran, then set back to scheduled",
        _run("SCHEDULED", started=T0, runs=1),
        [],
        ["executed_without_decision"],
    ),
    (
        "ran twice, no decision",
        _run("COMPLETED", started=T0, ended=LATER, runs=2),
        [],
        ["executed_without_decision"],
    ),
    ("running, no decision", _run("RUNNING", started=LATER), [], ["executed_without_decision"]),
    (
        "running, no start time nor run count",
        _run("RUNNING", runs=0),
        [],
        ["executed_without_decision"],
    ),
    ("completed, no decision", _run("COMPLETED", started=LATER), [], ["executed_without_decision"]),
    ("failed, no decision", _run("FAILED", started=LATER), [], ["executed_without_decision"]),
    ("crashed after it started", _run("CRASHED", started=LATER), [], ["executed_without_decision"]),
    (
        "labelled with a decision the lineage lacks entirely",
        _run("COMPLETED", started=LATER, label="d-allow"),
        [],
        ["executed_without_decision"],
    ),
    # executed under its own decision: clean
    (
        "completed under its decision",
        _run("COMPLETED", started=LATER, label="d-allow"),
        [ALLOWED],
        [],
    ),
    ("running under its decision", _run("RUNNING", started=LATER, label="d-allow"), [ALLOWED], []),
    (
        "audit mode ran a denied run",
        _run("COMPLETED", started=LATER, label="d-audit"),
        [_decision("d-audit", "audited")],
        [],
    ),
    (
        "fail-open ran ungoverned",
        _run("COMPLETED", started=LATER, label="d-open"),
        [_decision("d-open", "ungoverned")],
        [],
    ),
    (
        "refused once, allowed on the next submission",
        _run("COMPLETED", started=T0 + timedelta(minutes=5), label="d-allow"),
        [_decision("d-refuse", "refused", 0, 1), _decision("d-allow", "allowed", 3, 2)],
        [],
    ),
    (
        "ran, crashed, re-submitted and refused: the refusal stands",
        _run("CANCELLED", "Refused", started=T0, label="d-refuse"),
        [_decision("d-allow", "allowed", -5, 1), _decision("d-refuse", "refused", 3, 2)],
        [],
    ),
    # (b) executed though refused
    (
        "refused, then forced to running",
        _run("RUNNING", started=LATER, label="d-refuse"),
        [REFUSED],
        ["executed_though_refused"],
    ),
    (
        "refused, running without a start time",
        _run("RUNNING", label="d-refuse", runs=0),
        [REFUSED],
        ["executed_though_refused"],
    ),
    (
        "refused, yet completed",
        _run("COMPLETED", started=LATER, label="d-refuse"),
        [REFUSED],
        ["executed_though_refused"],
    ),
    (
        "refused, started after the refusal, then cancelled by hand",
        _run("CANCELLED", "Cancelled", started=LATER, label="d-refuse"),
        [REFUSED],
        ["executed_though_refused"],
    ),
    (
        "reads Refused but ran after the refusal",
        _run("CANCELLED", "Refused", started=LATER, ended=LATER, runs=1, label="d-refuse"),
        [REFUSED],
        ["executed_though_refused"],
    ),
    (
        "allowed first, the latest decision refused, yet it runs",
        _run("RUNNING", started=T0 + timedelta(minutes=5), label="d-refuse"),
        [_decision("d-allow", "allowed", 0, 1), _decision("d-refuse", "refused", 3, 2)],
        ["executed_though_refused"],
    ),
    (
        "latest by lineage order, not by clock",
        _run("RUNNING", started=T0 + timedelta(minutes=5), label="d-refuse"),
        [_decision("d-allow", "allowed", 9, 1), _decision("d-refuse", "refused", 3, 2)],
        ["executed_though_refused"],
    ),
    # (b') executed while awaiting an approval
    (
        "awaiting approval, then forced to running",
        _run("RUNNING", started=LATER, label="d-wait"),
        [_decision("d-wait", "awaiting_approval")],
        ["executed_while_awaiting_approval"],
    ),
    (
        "waited, then allowed and ran",
        _run("COMPLETED", started=LATER, label="d-allow"),
        [_decision("d-wait", "awaiting_approval", 0, 1), _decision("d-allow", "allowed", 3, 2)],
        [],
    ),
    # (c) runs under another decision
    (
        "executed without the decision label",
        _run("COMPLETED", started=LATER),
        [ALLOWED],
        ["runs_under_another_decision"],
    ),
    (
        "labelled with an empty decision id",
        _run("COMPLETED", started=LATER, label=""),
        [ALLOWED],
        ["runs_under_another_decision"],
    ),
    (
        "labelled with a decision the lineage does not hold for it",
        _run("COMPLETED", started=LATER, label="d-forged"),
        [ALLOWED],
        ["runs_under_another_decision"],
    ),
    (
        "refused, forced to run under a forged label",
        _run("RUNNING", started=LATER, label="d-forged"),
        [REFUSED],
        ["executed_though_refused", "runs_under_another_decision"],
    ),
    (
        "labelled with an earlier decision of its own",
        _run("COMPLETED", started=T0 + timedelta(minutes=5), label="d-allow"),
        [_decision("d-allow", "allowed", 0, 1), _decision("d-allow-2", "allowed", 3, 2)],
        [],
    ),
]


@pytest.mark.parametrize(
    ("run", "decisions", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_judge(run, decisions, expected):
    findings = judge(run, decisions)
    assert [f.kind for f in findings] == expected
    for finding in findings:
        assert (finding.flow_run_id, finding.pool, finding.flow_run_name) == (
            "run-1",
            "gov",
            "brave-otter",
        )


def test_findings_read_as_worded():
    [none] = judge(_run("RUNNING", started=LATER), [])
    assert none.title == "executed without a decision"
    assert "the lineage holds no decision for this run" in none.detail
    refused, forged = judge(_run("RUNNING", started=LATER, label="d-forged"), [REFUSED])
    assert refused.title == "executed though refused"
    assert refused.detail.startswith("decision d-refuse (2025-06-01T12:00:00+00:00) refused it")
    assert "but it is RUNNING, started 2025-06-01T12:01:00+00:00" in refused.detail
    assert refused.decision_id == "d-refuse"
    assert forged.title == "runs under another decision"
    assert "label names d-forged, which the lineage does not hold" in forged.detail
    assert forged.as_json()["finding"] == "runs under another decision"
    assert forged.as_json()["kind"] == "runs_under_another_decision"


def test_only_run_decisions_count():
    """Task decisions, outcomes and capability uses carry the run's id, not its decision."""
    events = [
        LineageEvent(id=1, kind="decision", flow_run_id="r", decision_id="d", verdict="allowed"),
        LineageEvent(
            id=2, kind="task_decision", flow_run_id="r", decision_id="d", verdict="refused"
        ),
        LineageEvent(id=3, kind="outcome", flow_run_id="r", decision_id="d", state="COMPLETED"),
    ]
    facts = decision_facts(events)
    assert [(f.decision_id, f.verdict, f.order) for f in facts] == [("d", "allowed", 1)]
    run = _run("COMPLETED", started=LATER, label="d")
    assert judge(run, facts) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24h", T0 - timedelta(hours=24)),
        ("90m", T0 - timedelta(minutes=90)),
        ("1h30m", T0 - timedelta(minutes=90)),
        ("7d", T0 - timedelta(days=7)),
        ("2w", T0 - timedelta(weeks=2)),
        ("45s", T0 - timedelta(seconds=45)),
        ("2025-05-31T08:00:00Z", datetime(2025, 5, 31, 8, tzinfo=timezone.utc)),
        ("2025-05-31T10:00:00+02:00", datetime(2025, 5, 31, 8, tzinfo=timezone.utc)),
        ("2025-05-31T08:00:00", datetime(2025, 5, 31, 8, tzinfo=timezone.utc)),
        ("2025-05-31", datetime(2025, 5, 31, tzinfo=timezone.utc)),
    ],
)
def test_parse_when(text, expected):
    assert parse_when(text, T0) == expected


@pytest.mark.parametrize("text", ["yesterday", "", "24", "h", "24x", "2025-13-01"])
def test_parse_when_rejects(text):
    with pytest.raises(ValueError, match="neither an ISO 8601 time nor a duration"):
        parse_when(text, T0)


# --- against a real Prefect server ----------------------------------------------------

CLEAN, FORCED, BYPASS, MANY = "audit-clean", "audit-forced", "audit-bypass", "audit-many"


@dataclass
class World:
    tmp: Path
    lineage_url: str
    runs: dict[str, UUID]
    markers: dict[str, Path]
    final: dict[str, Any]  # the runs as the workers left them
    forced: Any  # the refused run after it was forced to Running
    began: datetime


def _bypass_template() -> dict[str, Any]:
    """A governed-process pool whose template lets a stock worker run Prefect's engine."""
    template = pool_template(lineage_store="audit-lineage")
    template["job_configuration"]["command"] = "{{ command }}"
    # The variable that placeholder needs, as Prefect's process worker declares it (the
    # governed template starts runs through the gate and so declares none).
    stock = ProcessWorker.get_default_base_job_template()["variables"]["properties"]
    template["variables"]["properties"]["command"] = stock["command"]
    return template


async def _setup(gov: Harness) -> tuple[dict[str, UUID], dict[str, Path]]:
    tmp = gov.workdir
    lineage = await gov.save_lineage()
    still = TrustWeights(completed=0, failed=0, crashed=0, refused=0, warned=0, memory_rejected=0)
    await gov.save_agent(
        GovernanceAgent(
            id="audit-etl",
            trust_weights=still,
            owner="data@example.com",
            trust_scope=[CLEAN, FORCED, BYPASS, MANY],
            capabilities=["read:warehouse"],
        )
    )
    await create_pool(CLEAN, lineage_store=lineage)
    await create_pool(FORCED, lineage_store=lineage)
    await create_pool(BYPASS, _bypass_template())
    await create_pool(MANY, lineage_store=lineage)
    allowed = {"agent": "audit-etl", "capabilities": ["read:warehouse"]}
    refused = {"agent": "audit-etl", "capabilities": ["delete:warehouse"]}
    plan = {
        "clean-allowed": (CLEAN, allowed),
        "clean-refused": (CLEAN, refused),
        "forced-refused": (FORCED, refused),
        "forced-relabelled": (FORCED, allowed),
        "bypass": (BYPASS, allowed),
    }
    runs, markers = {}, {}
    async with get_client() as client:
        for key, (pool, variables) in plan.items():
            deployment_id = await deploy_example(f"audit-{key}", pool, variables)
            markers[key] = tmp / "markers" / key
            run = await client.create_flow_run_from_deployment(
                deployment_id, parameters={"rows": 10, "marker": str(markers[key])}
            )
            runs[key] = run.id
        # A pool nobody works: its runs stay Scheduled, two of them three days back.
        many = await deploy_example("audit-many", MANY, allowed)
        for i in range(7):
            run = await client.create_flow_run_from_deployment(many, parameters={"rows": i})
            runs[f"many-{i}"] = run.id
        back = datetime.now(timezone.utc) - timedelta(days=3)
        for i in range(2):
            run = await client.create_flow_run_from_deployment(
                many, parameters={"rows": i}, state=Scheduled(scheduled_time=back)
            )
            runs[f"many-old-{i}"] = run.id
    return runs, markers


async def _after_workers(world_runs: dict[str, UUID]) -> Any:
    """Force the refused run to Running; forge the allowed run's decision label."""
    async with get_client() as client:
        await client.set_flow_run_state(world_runs["forced-refused"], Running(), force=True)
        await client.update_flow_run_labels(
            world_runs["forced-relabelled"], {"governance.decision_id": "forged-decision"}
        )
        return await client.read_flow_run(world_runs["forced-refused"])


@pytest.fixture(scope="module")
def world(prefect_server, tmp_path_factory) -> World:
    tmp = tmp_path_factory.mktemp("audit")
    (tmp / "markers").mkdir()
    began = datetime.now(timezone.utc)
    with harness(prefect_server, tmp, lineage_block="audit-lineage") as gov:
        runs, markers = asyncio.run(_setup(gov))
        gov.start_worker(CLEAN, log=tmp / "worker-clean.log")
        gov.start_worker(FORCED, log=tmp / "worker-forced.log")
        # Prefect's stock process worker on a governed pool: no gate at all.
        gov.start_worker(BYPASS, log=tmp / "worker-bypass.log", worker_type="process")
        worked = ["clean-allowed", "clean-refused", "forced-refused", "forced-relabelled", "bypass"]
        by_id = asyncio.run(wait_final([runs[k] for k in worked], timeout=240))
        asyncio.run(
            wait_outcomes(gov.store, [runs["clean-allowed"], runs["forced-relabelled"]], timeout=60)
        )
    final = {k: by_id[runs[k]] for k in worked}
    for key, run in final.items():
        logs = "\n".join(log.read_text()[-2000:] for log in tmp.glob("worker-*.log"))
        assert run.state and run.state.is_final(), f"{key}: {run.state}\n{logs}"
    forced = asyncio.run(_after_workers(runs))
    return World(tmp, gov.lineage_url, runs, markers, final, forced, began)


def _cli(server, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "audit", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=prefect_env(server.home, server.api_url, **env),
    )


def _said(text: str) -> str:
    """Text with typer's boxes and line wrapping undone."""
    return " ".join(text.replace("│", " ").split())


def _findings(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


@pytest.mark.e2e
def test_the_setup_is_what_the_audit_is_about(world):
    """The workers did what the other tests take for granted."""
    assert world.final["clean-allowed"].state.is_completed()
    assert world.markers["clean-allowed"].exists()
    refused = world.final["clean-refused"]
    assert (refused.state.type.value, refused.state.name) == ("CANCELLED", "Refused")
    # Prefect stamps a start time on a run entering a final state it never ran to: the
    # refusal's own time, start = end. Only the run count says it never ran.
    assert refused.start_time is not None and refused.start_time == refused.end_time
    assert refused.run_count == 0
    assert not world.markers["clean-refused"].exists()
    assert world.final["bypass"].state.is_completed(), world.final["bypass"].state
    assert world.markers["bypass"].exists(), "the stock worker ran the flow's body"
    assert "governance.decision_id" not in (world.final["bypass"].labels or {})
    assert not world.markers["forced-refused"].exists()


@pytest.mark.e2e
def test_a_governed_pool_audits_clean(prefect_server, world):
    result = _cli(prefect_server, "--pool", CLEAN)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(result.stdout.strip().splitlines()) == 1, "a clean audit prints only its summary"
    assert result.stdout.startswith(f"no findings: 2 flow runs in 1 pool ({CLEAN}), ")
    # Every governed pool at once (one lineage for all): nothing on the clean pool.
    everything = _cli(prefect_server, "--url", world.lineage_url, "--json")
    assert everything.returncode == 1, everything.stdout + everything.stderr
    found = _findings(everything)
    assert not [f for f in found if f["pool"] == CLEAN], found
    assert {str(world.runs["bypass"]), str(world.runs["forced-refused"])} <= {
        f["flow_run_id"] for f in found
    }


@pytest.mark.e2e
def test_a_stock_worker_on_a_governed_pool_is_found(prefect_server, world):
    run_id = str(world.runs["bypass"])
    table = _cli(prefect_server, "--pool", BYPASS)
    assert table.returncode == 1, table.stdout + table.stderr
    [header, rule, row, summary] = table.stdout.strip().splitlines()
    assert header.split()[:4] == ["finding", "flow", "run", "name"] and set(rule) <= {"-", " "}
    assert row.startswith("executed without a decision") and run_id in row
    assert world.final["bypass"].name in row and BYPASS in row and "COMPLETED" in row
    assert summary.startswith(f"1 finding on 1 flow run: 1 flow run in 1 pool ({BYPASS}), ")

    as_json = _cli(prefect_server, "--pool", BYPASS, "--json")
    assert as_json.returncode == 1
    [finding] = _findings(as_json)
    assert finding["kind"] == "executed_without_decision"
    assert finding["finding"] == "executed without a decision"
    assert (finding["flow_run_id"], finding["pool"]) == (run_id, BYPASS)
    assert finding["start_time"] is not None
    assert as_json.stderr.startswith(f"1 finding on 1 flow run: 1 flow run in 1 pool ({BYPASS})")


@pytest.mark.e2e
def test_a_refused_run_forced_to_running_is_found(prefect_server, world):
    forced, refused = world.forced, world.final["forced-refused"]
    # What Prefect does with a forced Running: its global policy still counts the run
    # (run_count 1) and clears the end time; the start time stays the refusal's stamp.
    assert forced.state.type.value == "RUNNING"
    assert (forced.run_count, forced.end_time) == (1, None)
    assert forced.start_time == refused.start_time == refused.end_time
    assert forced.labels["governance.decision"] == "refused"
    result = _cli(prefect_server, "--pool", FORCED, "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    found = {(f["flow_run_id"], f["kind"]): f for f in _findings(result)}
    assert set(found) == {
        (str(world.runs["forced-refused"]), "executed_though_refused"),
        (str(world.runs["forced-relabelled"]), "runs_under_another_decision"),
    }
    refused = found[(str(world.runs["forced-refused"]), "executed_though_refused")]
    assert refused["decision_id"] == forced.labels["governance.decision_id"]
    assert refused["state"] == "RUNNING"
    assert "refused it, but it is RUNNING" in refused["detail"]
    forged = found[(str(world.runs["forced-relabelled"]), "runs_under_another_decision")]
    assert "label names forged-decision" in forged["detail"]


@pytest.mark.e2e
def test_the_time_range_bounds_the_audit(prefect_server, world):
    before = (world.began - timedelta(minutes=1)).isoformat()
    earlier = _cli(prefect_server, "--pool", BYPASS, "--since", "48h", "--until", before)
    assert earlier.returncode == 0, earlier.stdout + earlier.stderr
    assert earlier.stdout.startswith(f"no findings: 0 flow runs in 1 pool ({BYPASS})")


@pytest.mark.e2e
@pytest.mark.parametrize("page", [1, 3, 200])
def test_runs_are_read_page_by_page_by_expected_or_actual_start(world, monkeypatch, page):
    monkeypatch.setattr(audit_module, "PAGE_SIZE", page)
    now = datetime.now(timezone.utc)
    day = asyncio.run(audit(now - timedelta(hours=24), now, pools=[MANY]))
    assert (day.runs, day.findings, day.pools) == (7, [], [MANY])
    week = asyncio.run(audit(now - timedelta(days=4), now, pools=[MANY]))
    assert week.runs == 9
    old = asyncio.run(audit(now - timedelta(days=4), now - timedelta(days=2), pools=[MANY]))
    assert old.runs == 2
    # a run expected long ago is in range by its start time
    forced = asyncio.run(audit(now - timedelta(hours=1), now, pools=[FORCED]))
    assert forced.runs == 2


@pytest.mark.e2e
def test_usage_and_connection_errors_exit_2(prefect_server, world):
    garbled = _cli(prefect_server, "--since", "yesterday")
    assert garbled.returncode == 2
    assert "neither an ISO 8601 time nor a duration" in _said(garbled.stderr)
    backwards = _cli(prefect_server, "--since", "1h", "--until", "2h")
    assert backwards.returncode == 2
    assert "--since must be before --until" in _said(backwards.stderr)
    unknown = _cli(prefect_server, "--pool", "no-such-pool")
    assert unknown.returncode == 2 and "no work pool named 'no-such-pool'" in unknown.stderr
    bad_lineage = _cli(prefect_server, "--pool", BYPASS, "--url", "sqlite:////nonexistent/dir/l.db")
    assert bad_lineage.returncode == 2, bad_lineage.stdout + bad_lineage.stderr
    assert "cannot open its lineage database" in bad_lineage.stderr
    started = time.monotonic()
    offline = subprocess.run(
        [*CLI, "audit"],
        capture_output=True,
        text=True,
        timeout=120,
        env=prefect_env(prefect_server.home, f"http://127.0.0.1:{free_port()}/api"),
    )
    assert offline.returncode == 2, offline.stdout + offline.stderr
    assert "the audit could not be done" in offline.stderr
    assert time.monotonic() - started < 110


@pytest.mark.e2e
def test_a_planted_decision_does_not_hide_a_run_that_executed_without_one(prefect_server, world):
    """Attack (issue 15, 2): whoever can write the lineage database (the flow's own code,
    under the worker's OS user) plants an allowed decision for the bypassed run, with
    the labels to match. Not signed by the worker's lineage key, it counts as absent."""
    run_id = str(world.runs["bypass"])
    forger = LineageStore(world.lineage_url, signer=None)  # no lineage key: signs nothing
    try:
        planted = LineageEvent(
            kind="decision",
            agent_id="audit-etl",
            flow_run_id=run_id,
            decision_id="planted-decision",
            verdict="allowed",
            allow=True,
        )
        forger.append(planted)
        forger.append(
            LineageEvent(
                kind="outcome",
                agent_id="audit-etl",
                flow_run_id=run_id,
                decision_id="planted-decision",
                state="COMPLETED",
            )
        )
        assert forger.unvouched("audit-etl"), "the planted records are not vouched for"
    finally:
        forger.dispose()

    async def relabel():
        async with get_client() as client:
            await client.update_flow_run_labels(
                world.runs["bypass"],
                {"governance.decision": "allowed", "governance.decision_id": "planted-decision"},
            )

    asyncio.run(relabel())
    as_json = _cli(prefect_server, "--pool", BYPASS, "--json")
    assert as_json.returncode == 1, as_json.stdout + as_json.stderr
    [finding] = _findings(as_json)
    assert (finding["kind"], finding["flow_run_id"]) == ("executed_without_decision", run_id)
