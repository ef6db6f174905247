"""The OpenLineage export: lineage rows in, spec-valid OpenLineage run events out.

Every event is validated offline against the OpenLineage JSON Schema kept in
tests/data/openlineage/ (see its README), and the custom governance facet against its own
schema, which extends the spec's RunFacet.
"""

from __future__ import annotations

import io
import json
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from prefect_governance.cli.openlineage import (
    DEFAULT_PRODUCER,
    governance_facet_schema,
    governance_facet_schema_url,
    job_name,
    run_id,
    task_run_id,
    to_openlineage,
    write_jsonl,
)
from prefect_governance.core.models import Decision, MutationEnvelope
from prefect_governance.lineage.events import (
    LineageEvent,
    capability_use_event,
    decision_event,
    outcome_event,
    report_problem_event,
    settle_task_end,
    task_decision_event,
    task_end_event,
)
from prefect_governance.lineage.store import LineageStore
from tests.task_end_support import FELL, LIED, REJECTED, governed_run, task_runs

DATA = Path(__file__).parent / "data" / "openlineage"
CORE = "https://openlineage.io/spec/2-0-2/OpenLineage.json"
# The spec version the stored facet schemas point at; its RunFacet/DatasetFacet are 2-0-2's.
CORE_1_0_2 = "https://openlineage.io/spec/1-0-2/OpenLineage.json"
ERROR_FACET = "https://openlineage.io/spec/facets/1-0-0/ErrorMessageRunFacet.json"
VERSION_FACET = "https://openlineage.io/spec/facets/1-0-0/DatasetVersionDatasetFacet.json"
# The client stamps ParentRunFacet 1-2-0; the schema below is spec/facets/ParentRunFacet.json of
# OpenLineage/OpenLineage at commit 790104341e68fe30d95d257acf7013e6577641f9 (facet 1-0-1),
# unchanged. Later versions add only optional fields (``root``; ``facets`` under run and job),
# so what it requires (run.runId as a UUID, job.namespace and job.name) is what 1-2-0 requires.
PARENT_FACET = "https://openlineage.io/spec/facets/1-2-0/ParentRunFacet.json"
CORE_1_0_1 = "https://openlineage.io/spec/1-0-1/OpenLineage.json"
PARENT_FACET_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://openlineage.io/spec/1-0-1/ParentRunFacet.json",
    "$defs": {
        "ParentRunFacet": {
            "description": "the id of the parent run and job, iff this run was spawn from an "
            "other run (for example, the Dag run scheduling its tasks)",
            "allOf": [
                {"$ref": "https://openlineage.io/spec/1-0-1/OpenLineage.json#/$defs/RunFacet"},
                {
                    "type": "object",
                    "properties": {
                        "run": {
                            "type": "object",
                            "properties": {
                                "runId": {
                                    "description": "The globally unique ID of the run "
                                    "associated with the job.",
                                    "type": "string",
                                    "format": "uuid",
                                }
                            },
                            "required": ["runId"],
                        },
                        "job": {
                            "type": "object",
                            "properties": {
                                "namespace": {
                                    "description": "The namespace containing that job",
                                    "type": "string",
                                    "example": "my-scheduler-namespace",
                                },
                                "name": {
                                    "description": "The unique name for that job within that "
                                    "namespace",
                                    "type": "string",
                                    "example": "myjob.mytask",
                                },
                            },
                            "required": ["namespace", "name"],
                        },
                    },
                    "required": ["run", "job"],
                },
            ],
            "type": "object",
        }
    },
    "type": "object",
    "properties": {"parent": {"$ref": "#/$defs/ParentRunFacet"}},
}
T0 = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)
AGENT = "agent-reports"
MEMORY = f"agents/{AGENT}/memory"

ALLOWED, FAILED, REFUSED, AUDITED = (str(uuid.uuid4()) for _ in range(4))


# --- rows ------------------------------------------------------------------


def _envelope(flow_run_id: str, *, deployment: str | None = "nightly") -> dict[str, Any]:
    envelope = MutationEnvelope.model_validate(
        {
            "id": f"env-{flow_run_id[:8]}",
            "issued_at": T0,
            "expires_at": T0 + timedelta(minutes=5),
            "nonce": "n",
            "flow_run": {"id": flow_run_id, "name": "quiet-fox"},
            "deployment": {"id": "dep-1", "name": deployment, "version": "1", "tags": []}
            if deployment
            else None,
            "flow": {"id": "flow-1", "name": "etl"},
            "work_pool": {"name": "governed", "type": "governed-process"},
            "parameters": {"day": "2025-06-01"},
            "capabilities": ["memory:write"],
            "memory": {"reads": ["notes"], "writes": ["notes"], "schema_hash": None},
        }
    )
    return envelope.model_dump(mode="json")


def _decision(
    flow_run_id: str,
    at: datetime,
    *,
    verdict: str = "allowed",
    deny: list[str] | None = None,
    mode: str = "enforce",
    agent_id: str | None = AGENT,
    envelope: dict[str, Any] | None = None,
) -> LineageEvent:
    decision = Decision(
        id=f"dec-{flow_run_id[:8]}",
        verdict=verdict,
        allow=verdict != "refused",
        deny=deny or [],
        warn=["no owner label"],
        annotations={"team": "data"},
        engine="embedded",
        policy_path="prefect/governance/decision",
        policy_revision="rev-7",
        latency_ms=1.5,
        mode=mode,
    )
    row = decision_event(
        decision,
        agent_id=agent_id,
        flow_run_id=flow_run_id,
        envelope=envelope if envelope is not None else _envelope(flow_run_id),
    )
    row.created_at = at
    return row


def _outcome(flow_run_id: str, at: datetime, state: str, message: str | None = None):
    row = outcome_event(
        agent_id=AGENT,
        flow_run_id=flow_run_id,
        decision_id=f"dec-{flow_run_id[:8]}",
        state=state,
        message=message,
        status_code=1 if state == "FAILED" else 0,
    )
    row.created_at = at
    return row


def _row(kind: str, flow_run_id: str | None, at: datetime, **payload: Any) -> LineageEvent:
    return LineageEvent(
        kind=kind, agent_id=AGENT, flow_run_id=flow_run_id, payload=payload, created_at=at
    )


def _rows() -> list[LineageEvent]:
    """Four governed runs, shuffled, with rows the export must skip."""
    s = timedelta(seconds=1)
    return [
        _outcome(ALLOWED, T0 + 9 * s, "COMPLETED", "All states completed."),
        _row("trust", ALLOWED, T0 + 10 * s, score=0.9),
        _decision(REFUSED, T0 + 2 * s, verdict="refused", deny=["capability shell is not allowed"]),
        _row("memory_commit", ALLOWED, T0 + 8 * s, version=3, content_hash="sha256:ab"),
        _decision(FAILED, T0 + 1 * s),
        _decision(ALLOWED, T0),
        _outcome(FAILED, T0 + 5 * s, "FAILED", "Flow run encountered an exception: ValueError"),
        _decision(AUDITED, T0 + 3 * s, verdict="audited", deny=["outside hours"], mode="audit"),
        _outcome(AUDITED, T0 + 4 * s, "COMPLETED"),
        _row("trust", None, T0 + 11 * s, score=0.5),
    ]


# --- validation against the spec --------------------------------------------


def _load(name: str) -> dict[str, Any]:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def registry() -> Registry:
    return openlineage_registry()


def openlineage_registry() -> Registry:
    """The OpenLineage spec and facet schemas, resolvable offline."""
    core = Resource.from_contents(_load("OpenLineage-2-0-2.json"))
    return Registry().with_resources(
        [
            (CORE, core),
            (CORE_1_0_2, core),
            (CORE_1_0_1, core),
            (PARENT_FACET, Resource.from_contents(PARENT_FACET_SCHEMA)),
            (ERROR_FACET, Resource.from_contents(_load("facets/ErrorMessageRunFacet-1-0-0.json"))),
            (
                VERSION_FACET,
                Resource.from_contents(_load("facets/DatasetVersionDatasetFacet-1-0-0.json")),
            ),
            (
                governance_facet_schema_url(DEFAULT_PRODUCER),
                Resource.from_contents(governance_facet_schema(DEFAULT_PRODUCER)),
            ),
        ]
    )


def _validate(registry: Registry, ref: str, instance: Any) -> None:
    Draft202012Validator(
        {"$ref": ref}, registry=registry, format_checker=Draft202012Validator.FORMAT_CHECKER
    ).validate(instance)


def _is_url(value: str) -> bool:
    parsed = urlparse(value)
    return parsed.scheme in {"http", "https"} and bool(parsed.netloc)


def _check_facet(registry: Registry, name: str, facet: dict[str, Any], base: str) -> None:
    _validate(registry, f"{CORE}#/$defs/{base}", facet)
    assert _is_url(facet["_producer"]) and _is_url(facet["_schemaURL"]), facet


def check_event(registry: Registry, event: dict[str, Any]) -> None:
    """The event is a valid OpenLineage 2-0-2 RunEvent, and so is each of its facets."""
    _validate(registry, CORE, event)
    _validate(registry, f"{CORE}#/$defs/RunEvent", event)
    assert event["schemaURL"] == f"{CORE}#/$defs/RunEvent"
    assert _is_url(event["producer"])
    assert datetime.fromisoformat(event["eventTime"]).tzinfo is not None
    for name, facet in event["run"].get("facets", {}).items():
        _check_facet(registry, name, facet, "RunFacet")
        if name == "governance":
            assert registry.resolver().lookup(facet["_schemaURL"]).contents
            _validate(registry, facet["_schemaURL"], facet)
        elif name == "errorMessage":
            assert facet["_schemaURL"].endswith(
                "ErrorMessageRunFacet.json#/$defs/ErrorMessageRunFacet"
            )
            _validate(registry, f"{ERROR_FACET}#/$defs/ErrorMessageRunFacet", facet)
        elif name == "parent":
            assert facet["_schemaURL"] == f"{PARENT_FACET}#/$defs/ParentRunFacet"
            _validate(registry, facet["_schemaURL"], facet)
        else:
            pytest.fail(f"unexpected run facet {name}")
    for dataset in [*event.get("inputs", []), *event.get("outputs", [])]:
        for name, facet in dataset.get("facets", {}).items():
            _check_facet(registry, name, facet, "DatasetFacet")
            assert name == "version"
            _validate(registry, f"{VERSION_FACET}#/$defs/DatasetVersionDatasetFacet", facet)


@pytest.fixture(scope="module")
def exported() -> list[dict[str, Any]]:
    return to_openlineage(_rows())


def _by_run(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        runs.setdefault(event["run"]["runId"], []).append(event)
    return runs


def _types(events: list[dict[str, Any]]) -> list[str]:
    return [event["eventType"] for event in events]


# --- tests -----------------------------------------------------------------


def test_every_event_is_a_valid_openlineage_run_event(registry, exported):
    assert len(exported) == 8
    for event in exported:
        check_event(registry, event)


def test_the_validation_rejects_broken_events(registry, exported):
    broken = json.loads(json.dumps(exported[0]))
    broken["eventType"] = "REFUSED"
    with pytest.raises(jsonschema.ValidationError):
        check_event(registry, broken)
    facetless = json.loads(json.dumps(exported[0]))
    del facetless["run"]["facets"]["governance"]["_producer"]
    with pytest.raises(jsonschema.ValidationError):
        check_event(registry, facetless)
    no_verdict = json.loads(json.dumps(exported[0]))
    del no_verdict["run"]["facets"]["governance"]["verdict"]
    with pytest.raises(jsonschema.ValidationError):
        check_event(registry, no_verdict)


def test_each_run_starts_then_ends_by_its_outcome(exported):
    runs = _by_run(exported)
    assert set(runs) == {ALLOWED, FAILED, REFUSED, AUDITED}
    assert _types(runs[ALLOWED]) == ["START", "COMPLETE"]
    assert _types(runs[FAILED]) == ["START", "FAIL"]
    assert _types(runs[REFUSED]) == ["START", "ABORT"]
    assert _types(runs[AUDITED]) == ["START", "COMPLETE"]


def test_events_are_in_time_order_with_the_run_and_job(exported):
    times = [datetime.fromisoformat(event["eventTime"]) for event in exported]
    assert times == sorted(times)
    assert times[0] == T0
    for event in exported:
        assert event["job"] == {
            "namespace": "prefect-governance",
            "name": "etl/nightly",
            "facets": {},
        }
        assert event["producer"] == DEFAULT_PRODUCER


def test_a_refused_run_is_aborted_at_its_decision(exported):
    start, end = _by_run(exported)[REFUSED]
    assert start["eventTime"] == end["eventTime"] == (T0 + timedelta(seconds=2)).isoformat()
    assert "errorMessage" not in end["run"]["facets"]
    assert end["outputs"] == []
    for event in (start, end):
        governance = event["run"]["facets"]["governance"]
        assert governance["verdict"] == "refused"
        assert governance["allow"] is False
        assert governance["deny"] == ["capability shell is not allowed"]


def test_the_governance_facet_carries_the_decision(exported):
    start, end = _by_run(exported)[AUDITED]
    governance = start["run"]["facets"]["governance"]
    assert governance["_producer"] == DEFAULT_PRODUCER
    assert governance["_schemaURL"] == (
        f"{DEFAULT_PRODUCER}/spec/facets/GovernanceRunFacet.json#/$defs/GovernanceRunFacet"
    )
    assert {key: governance[key] for key in ("verdict", "allow", "deny", "warn", "mode")} == {
        "verdict": "audited",
        "allow": True,
        "deny": ["outside hours"],
        "warn": ["no owner label"],
        "mode": "audit",
    }
    assert governance["decisionId"] == f"dec-{AUDITED[:8]}"
    assert governance["engine"] == "embedded"
    assert governance["policyPath"] == "prefect/governance/decision"
    assert governance["policyRevision"] == "rev-7"
    assert governance["agentId"] == AGENT
    assert governance["flowRunId"] == AUDITED
    assert "state" not in governance
    assert end["run"]["facets"]["governance"]["state"] == "COMPLETED"


def test_a_failed_run_carries_the_error_message(exported):
    _, end = _by_run(exported)[FAILED]
    error = end["run"]["facets"]["errorMessage"]
    assert error["message"] == "Flow run encountered an exception: ValueError"
    assert error["programmingLanguage"] == "python"
    assert end["eventTime"] == (T0 + timedelta(seconds=5)).isoformat()
    assert end["run"]["facets"]["governance"]["state"] == "FAILED"
    assert end["outputs"] == []


def test_memory_is_read_on_start_and_written_on_a_committed_complete(exported):
    runs = _by_run(exported)
    for events in runs.values():
        assert [(d["namespace"], d["name"]) for d in events[0]["inputs"]] == [
            ("prefect-governance", MEMORY)
        ]
    _, end = runs[ALLOWED]
    assert end["outputs"] == [
        {
            "namespace": "prefect-governance",
            "name": MEMORY,
            "facets": {
                "version": {
                    "_producer": DEFAULT_PRODUCER,
                    "_schemaURL": end["outputs"][0]["facets"]["version"]["_schemaURL"],
                    "datasetVersion": "3",
                }
            },
            "outputFacets": {},
        }
    ]
    assert runs[AUDITED][1]["outputs"] == []


def test_namespace_and_producer_are_the_callers(registry):
    producer = "https://example.com/governance/1.2.3"
    events = to_openlineage(
        [_decision(ALLOWED, T0), _outcome(ALLOWED, T0, "CANCELLED")],
        namespace="acme",
        producer=producer,
    )
    assert _types(events) == ["START", "ABORT"]
    for event in events:
        assert event["job"]["namespace"] == "acme"
        assert event["inputs"] == [] or event["inputs"][0]["name"] == MEMORY
        governance = event["run"]["facets"]["governance"]
        assert governance["_producer"] == producer
        assert governance["_schemaURL"].startswith(f"{producer}/spec/facets/")
        check_event(registry, json.loads(json.dumps(event).replace(producer, DEFAULT_PRODUCER)))


def test_crashed_is_a_failure_and_unknown_is_no_end(registry):
    crashed, unknown = str(uuid.uuid4()), str(uuid.uuid4())
    events = to_openlineage(
        [
            _decision(crashed, T0),
            _outcome(crashed, T0 + timedelta(seconds=1), "CRASHED"),
            _decision(unknown, T0),
            _outcome(unknown, T0 + timedelta(seconds=1), "UNKNOWN", "stopped watching"),
        ]
    )
    runs = _by_run(events)
    assert _types(runs[crashed]) == ["START", "FAIL"]
    assert "errorMessage" in runs[crashed][1]["run"]["facets"]
    assert _types(runs[unknown]) == ["START", "OTHER"]
    for event in events:
        check_event(registry, event)


def test_a_run_without_an_outcome_is_only_started():
    events = to_openlineage([_decision(ALLOWED, T0)])
    assert _types(events) == ["START"]


def test_rows_without_a_decision_give_no_events():
    assert to_openlineage([_outcome(ALLOWED, T0, "COMPLETED"), _row("trust", ALLOWED, T0)]) == []


def test_a_memory_rejection_is_reported_and_nothing_is_written(registry):
    rows = [
        _decision(ALLOWED, T0),
        _row("memory_rejected", ALLOWED, T0 + timedelta(seconds=1), errors=["notes: not a string"]),
        _outcome(ALLOWED, T0 + timedelta(seconds=2), "COMPLETED"),
    ]
    _, end = to_openlineage(rows)
    assert end["outputs"] == []
    assert end["run"]["facets"]["governance"]["memoryErrors"] == ["notes: not a string"]
    check_event(registry, end)


def test_job_names_and_run_ids():
    assert job_name(_envelope(ALLOWED)) == "etl/nightly"
    assert job_name(_envelope(ALLOWED, deployment=None)) == "etl"
    assert job_name(None) == "unknown"
    assert run_id(ALLOWED) == ALLOWED
    assert run_id("not-a-uuid") == run_id("not-a-uuid")
    assert uuid.UUID(run_id("not-a-uuid"))


def test_a_missing_envelope_and_agent_and_naive_times(registry):
    row = _decision(ALLOWED, T0, agent_id=None, envelope={})
    row.payload = {**row.payload, "envelope": None}
    row.created_at = datetime(2025, 6, 1, 12, 0)  # SQLite hands back naive UTC
    (event,) = to_openlineage([row])
    assert event["job"]["name"] == "unknown"
    assert event["inputs"] == []
    assert event["eventTime"] == "2025-06-01T12:00:00+00:00"
    check_event(registry, event)


def test_write_jsonl_writes_one_object_a_line(tmp_path, exported):
    stream = io.StringIO()
    write_jsonl(exported, stream)
    assert [json.loads(line) for line in stream.getvalue().splitlines()] == exported
    path = tmp_path / "events.jsonl"
    write_jsonl(exported, path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(exported)
    assert [json.loads(line) for line in lines] == exported


# --- governance inside a run: task decisions, capability uses, report problems ---------

INSIDE = str(uuid.uuid4())  # an allowed flow run with governed tasks inside
LOAD, SHELL, FLAKY, DENIED = (str(uuid.uuid4()) for _ in range(4))  # its task runs
PARENT_DECISION = f"dec-{INSIDE[:8]}"


def _reported_task(
    seq: int,
    at: datetime,
    name: str,
    task_run: str,
    *,
    verdict: str = "allowed",
    deny: list[str] | None = None,
    purpose: str = "admit",
    attempt: int = 1,
) -> dict[str, Any]:
    """A task decision as the run reports it (see prefect_governance.runtime.tasks._record)."""
    decision = Decision(
        id=f"tdec-{seq}",
        verdict=verdict,
        allow=verdict != "refused",
        deny=deny or [],
        annotations={"owner": "data"},
        engine="embedded",
        policy_path="prefect/governance/task",
        policy_revision="rev-7",
        latency_ms=0.25,
    )
    task = {"name": name, "run_id": task_run, "key": f"{name}-0", "attempt": attempt}
    return {
        "kind": "task_decision",
        "seq": seq,
        "time": at.isoformat(),
        "purpose": purpose,
        "task": task,
        "envelope": {
            "id": f"tenv-{seq}",
            "issued_at": at.isoformat(),
            "task": task,
            "parameters": {"day": "2025-06-01"},
            "redacted": [],
            "capabilities": ["warehouse:write"],
            "parent": {
                "decision_id": PARENT_DECISION,
                "verdict": "allowed",
                "grants": ["warehouse:write"],
                "kid": "k1",
                "signature": "sig",
            },
        },
        "context": {"time": at.isoformat(), "mode": "enforce"},
        "decision": decision.model_dump(mode="json"),
    }


def _task_row(reported: dict[str, Any], check: dict[str, Any] | None = None) -> LineageEvent:
    return task_decision_event(
        reported,
        agent_id=AGENT,
        flow_run_id=INSIDE,
        parent_decision_id=PARENT_DECISION,
        check=check if check is not None else {"verified": True},
    )


def _use_row(seq: int, at: datetime, capability: str, task: str | None, **more: Any):
    reported = {
        "kind": "capability_use",
        "seq": seq,
        "time": at.isoformat(),
        "capability": capability,
        "task": {"name": task, "run_id": LOAD, "key": f"{task}-0", "attempt": 1} if task else None,
        **more,
    }
    return capability_use_event(
        reported, agent_id=AGENT, flow_run_id=INSIDE, parent_decision_id=PARENT_DECISION
    )


def _inside_rows() -> list[LineageEvent]:
    """An allowed run, then (as the worker appends them after the run) what happened inside
    it: four task runs (allowed; refused; refused, re-asked, allowed and run again; refused
    and re-asked in vain), capability uses and a problem with the report; then the outcome."""
    s = timedelta(seconds=1)
    reported = [
        _task_row(_reported_task(1, T0 + s, "load", LOAD)),
        _use_row(2, T0 + 2 * s, "warehouse:write", "load", granted=True, use="insert 10 rows"),
        _task_row(
            _reported_task(3, T0 + 3 * s, "shell", SHELL, verdict="refused", deny=["no shell"]),
            {"verified": False, "why": "the worker's engine decides this input otherwise"},
        ),
        _use_row(4, T0 + 4 * s, "shell", None, granted=False, reason="not granted to the run"),
        _task_row(
            _reported_task(5, T0 + 5 * s, "flaky", FLAKY, verdict="refused", deny=["frozen"])
        ),
        _task_row(_reported_task(6, T0 + 6 * s, "flaky", FLAKY, purpose="retry")),
        _task_row(_reported_task(7, T0 + 7 * s, "flaky", FLAKY, attempt=2)),
        _task_row(
            _reported_task(8, T0 + 8 * s, "denied", DENIED, verdict="refused", deny=["frozen"])
        ),
        _task_row(
            _reported_task(
                9, T0 + 9 * s, "denied", DENIED, verdict="refused", deny=["still"], purpose="retry"
            ),
            {"verified": None, "why": "the policy changed since the run decided"},
        ),
    ]
    problem = report_problem_event(
        ["events missing from the run's report: seq 10"],
        agent_id=AGENT,
        flow_run_id=INSIDE,
        parent_decision_id=PARENT_DECISION,
    )
    for row in [*reported, problem]:
        row.created_at = T0 + 20 * s  # appended together, after the run
    return [
        _decision(INSIDE, T0),
        *reported,
        problem,
        _outcome(INSIDE, T0 + 21 * s, "COMPLETED"),
    ]


@pytest.fixture(scope="module")
def inside(tmp_path_factory) -> list[dict[str, Any]]:
    """The inside rows appended to a real SQLite store, read back and exported."""
    store = LineageStore(f"sqlite:///{tmp_path_factory.mktemp('lineage') / 'lineage.db'}")
    try:
        store.append(*_inside_rows())
        assert store.verify() == []
        return to_openlineage(store.chain(AGENT))
    finally:
        store.dispose()


def test_every_event_with_tasks_inside_is_valid(registry, inside):
    assert len(inside) == 2 + 1 + 2 + 3 + 2
    for event in inside:
        check_event(registry, event)
    times = [datetime.fromisoformat(event["eventTime"]) for event in inside]
    assert times == sorted(times)


def test_the_flow_run_is_still_governed_by_its_decision_and_outcome(inside):
    start, end = _by_run(inside)[INSIDE]
    assert (start["eventType"], end["eventType"]) == ("START", "COMPLETE")
    assert start["eventTime"] == T0.isoformat()
    assert end["eventTime"] == (T0 + timedelta(seconds=21)).isoformat()
    for event in (start, end):
        governance = event["run"]["facets"]["governance"]
        assert governance["decisionId"] == PARENT_DECISION
        assert governance["verdict"] == "allowed"
        assert "parent" not in event["run"]["facets"]
        assert "taskName" not in governance
    assert end["run"]["facets"]["governance"]["state"] == "COMPLETED"


def test_each_task_run_is_a_child_run_of_its_flow_run(inside):
    runs = _by_run(inside)
    assert set(runs) == {INSIDE, LOAD, SHELL, FLAKY, DENIED}
    names = {LOAD: "load", SHELL: "shell", FLAKY: "flaky", DENIED: "denied"}
    for task_run, name in names.items():
        assert task_run_id(task_run) == task_run
        for event in runs[task_run]:
            assert event["job"]["name"] == f"etl/nightly.{name}"
            assert event["job"]["namespace"] == "prefect-governance"
            parent = event["run"]["facets"]["parent"]
            assert parent["run"]["runId"] == INSIDE
            assert parent["job"] == {
                "namespace": "prefect-governance",
                "name": "etl/nightly",
                "facets": {},
            }
            governance = event["run"]["facets"]["governance"]
            assert governance["taskName"] == name
            assert governance["taskRunId"] == task_run
            assert governance["parentDecisionId"] == PARENT_DECISION
            assert governance["flowRunId"] == INSIDE
            assert governance["policyPath"] == "prefect/governance/task"
            assert event["inputs"] == event["outputs"] == []
    (load,) = runs[LOAD]  # allowed: started, and its end is not in the lineage
    assert load["eventType"] == "START"
    assert load["eventTime"] == (T0 + timedelta(seconds=1)).isoformat()
    governance = load["run"]["facets"]["governance"]
    assert (governance["decisionId"], governance["verdict"], governance["allow"]) == (
        "tdec-1",
        "allowed",
        True,
    )
    assert (governance["envelopeId"], governance["purpose"], governance["taskAttempt"]) == (
        "tenv-1",
        "admit",
        1,
    )
    assert governance["verified"] is True
    assert governance["annotations"] == {"owner": "data"}


def test_a_refused_task_is_started_and_aborted_at_its_decision(inside):
    start, end = _by_run(inside)[SHELL]
    assert (start["eventType"], end["eventType"]) == ("START", "ABORT")
    assert start["eventTime"] == end["eventTime"] == (T0 + timedelta(seconds=3)).isoformat()
    for event in (start, end):
        governance = event["run"]["facets"]["governance"]
        assert governance["verdict"] == "refused"
        assert governance["allow"] is False
        assert governance["deny"] == ["no shell"]
        assert governance["verified"] is False
        assert governance["verifyReason"] == "the worker's engine decides this input otherwise"
        assert "errorMessage" not in event["run"]["facets"]


def test_a_retry_re_ask_is_folded_into_its_task_run(inside):
    runs = _by_run(inside)
    flaky = runs[FLAKY]  # refused, re-asked and allowed, then run again and admitted
    assert _types(flaky) == ["START", "OTHER", "OTHER"]
    assert [e["run"]["facets"]["governance"]["decisionId"] for e in flaky] == [
        "tdec-5",
        "tdec-6",
        "tdec-7",
    ]
    assert [e["run"]["facets"]["governance"]["purpose"] for e in flaky] == [
        "admit",
        "retry",
        "admit",
    ]
    assert flaky[2]["run"]["facets"]["governance"]["taskAttempt"] == 2
    denied = runs[DENIED]  # refused, and the retry re-ask refused too: ends there
    assert _types(denied) == ["START", "ABORT"]
    assert denied[1]["eventTime"] == (T0 + timedelta(seconds=9)).isoformat()
    governance = denied[1]["run"]["facets"]["governance"]
    assert (governance["purpose"], governance["deny"]) == ("retry", ["still"])
    assert "verified" not in governance  # the worker could not tell
    assert governance["verifyReason"] == "the policy changed since the run decided"


def test_capability_uses_and_report_problems_are_on_the_flow_runs_end(inside):
    start, end = _by_run(inside)[INSIDE]
    assert "capabilityUses" not in start["run"]["facets"]["governance"]
    governance = end["run"]["facets"]["governance"]
    assert governance["capabilityUses"] == [
        {
            "capability": "warehouse:write",
            "verdict": "used",
            "task": "load",
            "taskRunId": LOAD,
            "use": "insert 10 rows",
            "time": (T0 + timedelta(seconds=2)).isoformat(),
        },
        {
            "capability": "shell",
            "verdict": "blocked",
            "reason": "not granted to the run",
            "time": (T0 + timedelta(seconds=4)).isoformat(),
        },
    ]
    assert governance["reportProblems"] == ["events missing from the run's report: seq 10"]


def test_the_facet_schema_rejects_a_bad_capability_use_and_parent(registry, inside):
    end = json.loads(json.dumps(_by_run(inside)[INSIDE][1]))
    end["run"]["facets"]["governance"]["capabilityUses"][0]["verdict"] = "maybe"
    with pytest.raises(jsonschema.ValidationError):
        check_event(registry, end)
    task = json.loads(json.dumps(_by_run(inside)[LOAD][0]))
    del task["run"]["facets"]["parent"]["run"]["runId"]
    with pytest.raises(jsonschema.ValidationError):
        check_event(registry, task)


def test_inside_rows_change_only_the_flow_runs_end_facet(exported):
    rows = _inside_rows()
    plain = to_openlineage([rows[0], rows[-1]])
    with_inside = [e for e in to_openlineage(rows) if e["run"]["runId"] == INSIDE]
    for key in ("capabilityUses", "reportProblems"):
        del with_inside[1]["run"]["facets"]["governance"][key]
    assert with_inside == plain
    # without their flow run's decision, inside rows give no events and disturb no run
    assert to_openlineage([*_rows(), *rows[1:-1]]) == exported


def test_a_refused_flow_run_with_tasks_still_aborts_at_its_decision(registry):
    rows = [
        _decision(INSIDE, T0, verdict="refused", deny=["no"]),
        _task_row(_reported_task(1, T0 - timedelta(seconds=5), "load", LOAD)),
        _outcome(INSIDE, T0 + timedelta(seconds=3), "CANCELLED"),
    ]
    events = to_openlineage(rows)
    runs = _by_run(events)
    assert _types(runs[INSIDE]) == ["START", "ABORT"]
    # a task decision is never placed before its flow run started
    assert runs[LOAD][0]["eventTime"] == T0.isoformat()
    for event in events:
        check_event(registry, event)


def test_a_garbled_report_still_exports_valid_events(registry):
    bad_verdict = _reported_task(1, T0, "odd", LOAD)
    bad_verdict["decision"]["verdict"] = "maybe"
    garbled = _reported_task(2, T0, "odd", SHELL)
    garbled["time"] = "yesterday"
    garbled["task"]["attempt"] = "two"
    garbled["purpose"] = "whatever"
    garbled["decision"].update(fail_mode="sideways", latency_ms="fast", deny=[{"x": 1}])
    garbled["decision"]["annotations"] = {"n": 1}
    outside = _reported_task(3, T0, "plain", "(not a task run)")
    again = _reported_task(4, T0, "plain", "(not a task run)")
    rows = [
        _decision(INSIDE, T0),
        *(_task_row(item, {"verified": "yes"}) for item in (bad_verdict, garbled, outside, again)),
        _use_row(5, T0, "x", None, granted="true", use={"rows": 3}),
        _outcome(INSIDE, T0 + timedelta(seconds=30), "COMPLETED"),
    ]
    events = to_openlineage(rows)
    for event in events:
        check_event(registry, event)
    runs = _by_run(events)
    assert LOAD not in runs  # no verdict to export: reported as a problem of the run
    end = runs[INSIDE][1]["run"]["facets"]["governance"]
    assert end["reportProblems"] == ["task decision tdec-1: verdict 'maybe'"]
    assert end["capabilityUses"][0]["verdict"] == "blocked"  # only granted=True is a use
    assert end["capabilityUses"][0]["use"] == '{"rows": 3}'
    (odd,) = runs[SHELL]
    governance = odd["run"]["facets"]["governance"]
    assert "taskAttempt" not in governance and "purpose" not in governance
    assert "failMode" not in governance and "latencyMs" not in governance
    assert governance["deny"] == ['{"x": 1}'] and governance["annotations"] == {"n": "1"}
    # two calls outside Prefect share no task run: each decision is its own run
    plain = [run for run, evs in runs.items() if evs[0]["job"]["name"].endswith(".plain")]
    assert len(plain) == 2


# --- the end of each governed task (task_end rows) -------------------------------------

# A run whose four governed tasks end (tests/task_end_support); its id ends in 00, so it is
# none of its task runs' ids (those end in 11 to 14).
TASKED = str(uuid.uuid4())[:-2] + "00"


@pytest.fixture(scope="module")
def ended(tmp_path_factory) -> list[dict[str, Any]]:
    """The run's records appended to a real SQLite store, read back and exported."""
    store = LineageStore(f"sqlite:///{tmp_path_factory.mktemp('ends') / 'lineage.db'}")
    try:
        store.append(*governed_run(AGENT, TASKED, T0))
        return to_openlineage(store.authentic(store.chain(AGENT)))
    finally:
        store.dispose()


def _ends(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e["run"]["facets"]["governance"].get("taskEnd") for e in events]


def test_each_task_run_ends_with_its_task_end(registry, ended):
    for event in ended:
        check_event(registry, event)
    runs = _by_run(ended)
    names = task_runs(TASKED)
    assert _types(runs[TASKED]) == ["START", "FAIL"]
    assert [_types(runs[names[name]]) for name in ("load", "transform", "write", "publish")] == [
        ["START", "COMPLETE"],
        ["START", "FAIL"],
        ["START", "FAIL"],
        ["START", "ABORT"],  # refused at its decision, ended at its end
    ]
    for name, seq in (("load", 2), ("transform", 4), ("write", 6), ("publish", 8)):
        start, end = runs[names[name]]
        assert "taskEnd" not in start["run"]["facets"]["governance"]
        assert end["eventTime"] == (T0 + timedelta(seconds=seq)).isoformat()
        governance = end["run"]["facets"]["governance"]
        assert governance["decisionId"] == start["run"]["facets"]["governance"]["decisionId"]
        assert end["run"]["facets"]["parent"]["run"]["runId"] == TASKED
    publish = runs[names["publish"]][1]["run"]["facets"]["governance"]
    assert (publish["verdict"], publish["deny"]) == ("refused", [FELL])


def test_the_task_end_carries_outcome_trust_window_memory_and_check(ended):
    runs = _by_run(ended)
    names = task_runs(TASKED)
    load, transform, write, publish = (
        _ends(runs[names[name]])[1] for name in ("load", "transform", "write", "publish")
    )
    assert load == {
        "outcome": "completed",
        "attempt": 1,
        "events": ["completed"],
        "trustPrevious": 0.80,
        "trustScore": 0.82,
        "window": [0.78, 0.80, 0.82],
        "slope": pytest.approx(0.04),
        "tasks": 1,
        "memoryVersion": 2,
        "memory": {
            "status": "committed",
            "version": 2,
            "contentHash": "sha256:m2",
            "fields": ["notes"],
            "errors": [],
            "rebased": False,
        },
        "verified": True,
    }
    assert (transform["outcome"], transform["verified"], transform["verifyReason"]) == (
        "failed",
        False,
        LIED,
    )
    assert "memory" not in transform
    assert write["outcome"] == "memory_rejected"
    assert write["memory"] == {
        "status": "rejected",
        "fields": ["notes"],
        "errors": [REJECTED],
        "rebased": False,
    }
    assert (write["trustPrevious"], write["trustScore"]) == (0.70, 0.62)
    assert (publish["outcome"], publish["window"]) == ("refused", [0.70, 0.62, 0.57])


def test_the_facet_schema_rejects_a_bad_task_end(registry, ended):
    end = json.loads(json.dumps(_by_run(ended)[task_runs(TASKED)["write"]][1]))
    end["run"]["facets"]["governance"]["taskEnd"]["memory"]["status"] = "maybe"
    with pytest.raises(jsonschema.ValidationError):
        check_event(registry, end)
    del end["run"]["facets"]["governance"]["taskEnd"]["memory"]
    del end["run"]["facets"]["governance"]["taskEnd"]["trustScore"]
    with pytest.raises(jsonschema.ValidationError):
        check_event(registry, end)


def _end_row(seq: int, name: str, task_run: str, outcome: str, attempt: int = 1):
    posture = {"score": 0.5, "slope": 0.0, "window": [0.5], "k": 3, "tasks": seq}
    row = task_end_event(
        {
            "seq": seq,
            "time": (T0 + timedelta(seconds=seq)).isoformat(),
            "task": {"name": name, "run_id": task_run, "key": name, "attempt": attempt},
            "outcome": outcome,
        },
        agent_id=AGENT,
        flow_run_id=INSIDE,
        parent_decision_id=PARENT_DECISION,
        outcome=outcome,
        events=[outcome],
        posture=posture,
        check={"verified": True},
    )
    settle_task_end(row, previous=0.5, score=0.5, memory=None)
    return row


def test_retries_outside_calls_and_ends_without_a_decision(registry):
    s = timedelta(seconds=1)
    outside = "(not a task run)"
    rows = [
        _decision(INSIDE, T0),
        _task_row(_reported_task(1, T0 + s, "flaky", FLAKY)),
        _end_row(2, "flaky", FLAKY, "failed"),
        _task_row(_reported_task(3, T0 + 3 * s, "flaky", FLAKY, attempt=2)),
        _end_row(4, "flaky", FLAKY, "completed", attempt=2),
        _task_row(_reported_task(5, T0 + 5 * s, "plain", outside)),
        _end_row(6, "plain", outside, "completed"),
        _task_row(_reported_task(7, T0 + 7 * s, "plain", outside)),
        _end_row(8, "plain", outside, "crashed"),
        _end_row(9, "orphan", LOAD, "completed"),
        _end_row(10, "odd", SHELL, "sideways"),
        _outcome(INSIDE, T0 + 30 * s, "COMPLETED"),
    ]
    events = to_openlineage(rows)
    for event in events:
        check_event(registry, event)
    runs = _by_run(events)
    flaky = runs[FLAKY]  # failed, admitted again, completed: one task run
    assert _types(flaky) == ["START", "OTHER", "OTHER", "COMPLETE"]
    assert [(end or {}).get("outcome") for end in _ends(flaky)] == [
        None,
        "failed",
        None,
        "completed",
    ]
    assert flaky[3]["run"]["facets"]["governance"]["decisionId"] == "tdec-3"
    # two calls outside Prefect: each end goes with its own decision's run
    plain = [evs for evs in runs.values() if evs[0]["job"]["name"].endswith(".plain")]
    assert sorted(_types(evs)[1] for evs in plain) == ["COMPLETE", "FAIL"]
    # an end without a task decision is governed by the flow run's decision
    orphan = runs[LOAD]
    assert _types(orphan) == ["START", "COMPLETE"]
    governance = orphan[1]["run"]["facets"]["governance"]
    assert governance["decisionId"] == governance["parentDecisionId"] == PARENT_DECISION
    assert (governance["taskName"], governance["taskRunId"]) == ("orphan", LOAD)
    assert SHELL not in runs  # an outcome the export does not know: a problem of the run
    end = runs[INSIDE][1]["run"]["facets"]["governance"]
    assert end["reportProblems"] == ["task end: outcome 'sideways'"]
