"""The lineage as OpenLineage run events (https://openlineage.io/spec).

Pure functions over lineage rows: each governed flow run becomes a START event at its
decision, then one terminal event (COMPLETE, FAIL or ABORT) at its outcome. A refused run
is START and ABORT at the decision; a run with no outcome yet is only START. Every event
carries the decision as a custom ``governance`` run facet; the agent's memory is a dataset,
read on START and written when the run committed to it.

Governance inside a run (``task_decision``, ``task_end``, ``capability_use`` and
``report_problem`` rows):

- Each governed Prefect task run is a run of its own, child of the flow run: runId from the
  task run id (as ``run_id``), job ``<flow job>.<task>``, the standard ``parent`` facet naming
  the flow run and its job, and the task's decision in the ``governance`` facet (with
  ``taskName``, ``taskRunId``, ``taskAttempt``, ``purpose``, ``parentDecisionId`` and
  whether the worker ``verified`` it). Its first decision is a START; every later decision
  about the same task run (a ``retry`` re-ask, or the admission of a later attempt) is not
  a run of its own but an OTHER event of the same run.
- Each end of a governed task (a ``task_end`` row: the worker's own account of it) is an
  event of its task run, with ``taskEnd`` in the ``governance`` facet of the task's latest
  decision: the outcome, the trust before and after it, the posture's window, the memory
  change and the worker's check of the run's word. The task run's last record ends it: an
  end as COMPLETE (completed), FAIL (failed, crashed, memory_rejected) or ABORT (refused),
  a refusing decision as ABORT (a task refused at once is START and ABORT at the decision,
  as a refused flow run is); an end followed by another attempt is an OTHER event. A task
  run whose last record is a decision that let it run has no terminal event. A task called
  outside Prefect (no task run) ends in the run of its latest decision. Task events are
  timed as the run reported them (never before the flow run's START).
- The flow run's terminal event lists the run's capability uses (``capabilityUses``:
  capability, ``used`` or ``blocked``, the task, why it was blocked) and what was wrong with
  the run's report (``reportProblems``) in its ``governance`` facet. A run with no outcome
  yet has no terminal event, so these wait for it.

Rows of kinds this module does not know are ignored, as are runs that have no decision.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import IO, Any

import attr
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import (
    RunFacet,
    dataset_version_dataset,
    error_message_run,
    parent_run,
)
from openlineage.client.serde import Serde

from prefect_governance import __version__
from prefect_governance.core.posture import OUTCOMES
from prefect_governance.lineage.events import LineageEvent

DEFAULT_NAMESPACE = "prefect-governance"


DEFAULT_PRODUCER = f"https://github.com/prefect-governance/prefect-governance/tree/{__version__}"
GOVERNANCE_FACET = "governance"
PARENT_FACET = "parent"
# The core definition every run facet extends, in the spec version of the installed client.
RUN_FACET_SCHEMA_URL = RunFacet._get_schema()
_TERMINAL = {
    "COMPLETED": RunState.COMPLETE,
    "FAILED": RunState.FAIL,
    "CRASHED": RunState.FAIL,
    "CANCELLED": RunState.ABORT,
}


def governance_facet_schema_url(producer: str = DEFAULT_PRODUCER) -> str:
    """Where the governance facet's JSON Schema lives, relative to the producer."""
    return f"{producer.rstrip('/')}/spec/facets/GovernanceRunFacet.json"


@attr.define
class GovernanceRunFacet(RunFacet):
    """The policy decision a flow run (or a task run inside it) was governed by, and how
    the run ended."""

    decisionId: str  # the decision's id in the lineage
    verdict: str  # allowed, refused, audited or ungoverned
    allow: bool
    deny: list[str]  # deny reasons
    warn: list[str]  # warnings
    engine: str
    policyPath: str
    mode: str  # enforce or audit
    flowRunId: str  # the Prefect flow run id
    policyRevision: str | None = None
    agentId: str | None = None
    envelopeId: str | None = None
    failMode: str | None = None
    error: str | None = None
    latencyMs: float | None = None
    annotations: dict[str, str] = attr.field(factory=dict)
    state: str | None = None  # the run's final Prefect state, on terminal events
    statusCode: int | None = None
    memoryErrors: list[str] | None = None  # why a memory write was rejected, if it was
    # A flow run's terminal event: what happened inside the run.
    capabilityUses: list[dict[str, Any]] | None = None  # see _capability_use
    reportProblems: list[str] | None = None  # what was wrong with the run's report
    # A task run's events: the task and the flow run's decision it was decided under.
    taskName: str | None = None
    taskRunId: str | None = None
    taskAttempt: int | None = None
    purpose: str | None = None  # admit (before the task body) or retry (may it run again?)
    parentDecisionId: str | None = None
    verified: bool | None = None  # did the worker, deciding the same input, agree?
    verifyReason: str | None = None  # why it did not, or could not tell
    taskEnd: dict[str, Any] | None = None  # how the task ended (see _task_end)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._schemaURL = f"{governance_facet_schema_url(self._producer)}#/$defs/GovernanceRunFacet"


def governance_facet_schema(producer: str = DEFAULT_PRODUCER) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the ``governance`` run facet."""
    strings = {"type": "array", "items": {"type": "string"}}
    optional_string = {"type": ["string", "null"]}
    capability_use = {
        "type": "object",
        "properties": {
            "capability": {"type": "string"},
            "verdict": {"enum": ["used", "blocked", "flagged"]},
            "task": optional_string,
            "taskRunId": optional_string,
            "use": optional_string,
            "reason": optional_string,
            "time": optional_string,
        },
        "required": ["capability", "verdict"],
    }
    optional_integer = {"type": ["integer", "null"]}
    memory_change = {
        "type": "object",
        "properties": {
            "status": {"enum": ["committed", "rejected", "discarded"]},
            "version": optional_integer,
            "contentHash": optional_string,
            "fields": strings,
            "errors": strings,
            "rebased": {"type": ["boolean", "null"]},
        },
        "required": ["status"],
    }
    task_end = {
        "type": "object",
        "properties": {
            "outcome": {"enum": list(OUTCOMES)},
            "attempt": optional_integer,
            "events": strings,
            "trustPrevious": {"type": "number"},
            "trustScore": {"type": "number"},
            "window": {"type": "array", "items": {"type": "number"}},
            "slope": {"type": ["number", "null"]},
            "tasks": optional_integer,
            "memoryVersion": optional_integer,
            "memory": memory_change,
            "verified": {"type": "boolean"},
            "verifyReason": optional_string,
        },
        "required": ["outcome", "trustPrevious", "trustScore", "window", "verified"],
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": governance_facet_schema_url(producer),
        "$defs": {
            "GovernanceRunFacet": {
                "description": (
                    "The policy decision a Prefect flow run, or a task run inside it, "
                    "was governed by."
                ),
                "allOf": [
                    {"$ref": RUN_FACET_SCHEMA_URL},
                    {
                        "type": "object",
                        "properties": {
                            "decisionId": {"type": "string"},
                            "verdict": {
                                "enum": [
                                    "allowed",
                                    "refused",
                                    "audited",
                                    "ungoverned",
                                    "awaiting_approval",
                                ],
                            },
                            "allow": {"type": "boolean"},
                            "deny": strings,
                            "warn": strings,
                            "engine": {"type": "string"},
                            "policyPath": {"type": "string"},
                            "policyRevision": optional_string,
                            "mode": {"enum": ["enforce", "audit"]},
                            "failMode": {"enum": ["closed", "open", None]},
                            "agentId": optional_string,
                            "flowRunId": {"type": "string"},
                            "envelopeId": optional_string,
                            "error": optional_string,
                            "latencyMs": {"type": ["number", "null"]},
                            "annotations": {
                                "type": "object",
                                "additionalProperties": {"type": "string"},
                            },
                            "state": optional_string,
                            "statusCode": {"type": ["integer", "null"]},
                            "memoryErrors": strings,
                            "capabilityUses": {"type": "array", "items": capability_use},
                            "reportProblems": strings,
                            "taskName": optional_string,
                            "taskRunId": optional_string,
                            "taskAttempt": {"type": ["integer", "null"]},
                            "purpose": {"enum": ["admit", "retry", None]},
                            "parentDecisionId": optional_string,
                            "verified": {"type": ["boolean", "null"]},
                            "verifyReason": optional_string,
                            "taskEnd": task_end,
                        },
                        "required": [
                            "decisionId",
                            "verdict",
                            "allow",
                            "deny",
                            "warn",
                            "engine",
                            "policyPath",
                            "mode",
                            "flowRunId",
                        ],
                    },
                ],
                "type": "object",
            }
        },
        "type": "object",
        "properties": {GOVERNANCE_FACET: {"$ref": "#/$defs/GovernanceRunFacet"}},
    }


def event_time(moment: datetime) -> str:
    """ISO 8601 with a timezone; naive times (as SQLite returns them) are UTC."""
    return _utc(moment).isoformat()


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def run_id(flow_run_id: str) -> str:
    """The OpenLineage runId: the flow run's UUID (a stable UUID derived from other ids)."""
    try:
        return str(uuid.UUID(flow_run_id))
    except ValueError:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"prefect-flow-run:{flow_run_id}"))


def task_run_id(task_run: str) -> str:
    """The OpenLineage runId of a task run: its UUID (a stable UUID derived from other ids)."""
    try:
        return str(uuid.UUID(task_run))
    except ValueError:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"prefect-task-run:{task_run}"))


def job_name(envelope: dict[str, Any] | None) -> str:
    """``<flow>/<deployment>`` from the envelope, the flow alone, or ``unknown``."""
    flow = ((envelope or {}).get("flow") or {}).get("name")
    deployment = ((envelope or {}).get("deployment") or {}).get("name")
    if flow and deployment:
        return f"{flow}/{deployment}"
    return flow or "unknown"


def memory_dataset_name(agent_id: str) -> str:
    """The dataset name of an agent's memory."""
    return f"agents/{agent_id}/memory"


def _order(row: LineageEvent) -> tuple[datetime, int]:
    return _utc(row.created_at), row.seq if row.seq is not None else (row.id or 0)


def group_runs(events: Iterable[LineageEvent]) -> dict[str, list[LineageEvent]]:
    """Rows by flow run id (rows without one are dropped), each run's rows in time order."""
    runs: dict[str, list[LineageEvent]] = {}
    for row in events:
        if row.flow_run_id:
            runs.setdefault(row.flow_run_id, []).append(row)
    return {key: sorted(rows, key=_order) for key, rows in runs.items()}


def _of_kind(rows: list[LineageEvent], kind: str) -> list[LineageEvent]:
    return [row for row in rows if row.kind == kind]


def _governing_decision(
    decisions: list[LineageEvent], outcome: LineageEvent | None
) -> LineageEvent:
    """The decision the outcome names, or else the latest one."""
    named = [d for d in decisions if outcome and d.decision_id == outcome.decision_id]
    return (named or decisions)[-1]


def _governance_facet(
    decision: LineageEvent,
    producer: str,
    *,
    outcome: LineageEvent | None = None,
    rejections: list[LineageEvent] | None = None,
    **inside: Any,
) -> GovernanceRunFacet:
    payload = decision.payload or {}
    errors = [str(e) for row in rejections or [] for e in (row.payload or {}).get("errors") or []]
    status = (outcome.payload or {}).get("status_code") if outcome else None
    return GovernanceRunFacet(
        producer=producer,
        decisionId=decision.decision_id or "",
        verdict=decision.verdict or "",
        allow=bool(decision.allow),
        deny=list(decision.reasons or []),
        warn=list(decision.warnings or []),
        engine=decision.engine or "",
        policyPath=decision.policy_path or "",
        mode=decision.mode or "enforce",
        flowRunId=decision.flow_run_id or "",
        policyRevision=decision.policy_revision,
        agentId=decision.agent_id,
        envelopeId=decision.envelope_id,
        failMode=payload.get("fail_mode"),
        error=payload.get("error"),
        latencyMs=decision.latency_ms,
        annotations=dict(payload.get("annotations") or {}),
        state=outcome.state if outcome else None,
        statusCode=status,
        memoryErrors=errors or None,
        **inside,
    )


def _error_facet(outcome: LineageEvent, producer: str) -> error_message_run.ErrorMessageRunFacet:
    message = (outcome.payload or {}).get("message") or f"the flow run ended {outcome.state}"
    return error_message_run.ErrorMessageRunFacet(
        producer=producer, message=message, programmingLanguage="python"
    )


def _memory_output(
    agent_id: str, commit: LineageEvent, namespace: str, producer: str
) -> OutputDataset:
    payload = commit.payload or {}
    label = payload.get("version")
    if label is None:
        label = payload.get("content_hash")
    facets: dict[str, Any] = {}
    if label is not None:
        facets["version"] = dataset_version_dataset.DatasetVersionDatasetFacet(
            producer=producer, datasetVersion=str(label)
        )
    return OutputDataset(namespace=namespace, name=memory_dataset_name(agent_id), facets=facets)


def run_events(
    rows: list[LineageEvent], *, namespace: str, producer: str
) -> list[tuple[datetime, RunEvent]]:
    """One flow run's rows (in time order) as timed OpenLineage run events: the flow run's,
    then those of its governed task runs."""
    decisions = _of_kind(rows, "decision")
    if not decisions:
        return []
    outcomes = _of_kind(rows, "outcome")
    outcome = outcomes[-1] if outcomes else None
    decision = _governing_decision(decisions, outcome)
    envelope = (decision.payload or {}).get("envelope")
    run = run_id(decision.flow_run_id or "")
    job = Job(namespace=namespace, name=job_name(envelope))
    agent = decision.agent_id
    memory_in = (
        [InputDataset(namespace=namespace, name=memory_dataset_name(agent))] if agent else []
    )
    start = RunEvent(
        eventType=RunState.START,
        eventTime=event_time(decision.created_at),
        run=Run(runId=run, facets={GOVERNANCE_FACET: _governance_facet(decision, producer)}),
        job=job,
        inputs=memory_in,
        producer=producer,
    )
    timed = [(_utc(decision.created_at), start)]
    tasks, malformed = _task_events(
        rows,
        decision=decision,
        parent_job=job,
        not_before=_utc(decision.created_at),
        producer=producer,
    )
    if decision.verdict == "refused":
        end_state, ended = RunState.ABORT, decision.created_at
        outcome = None
    elif outcome is not None:
        end_state, ended = _TERMINAL.get(outcome.state or "", RunState.OTHER), outcome.created_at
    else:
        return [*timed, *tasks]
    problems = [
        *(str(r) for row in _of_kind(rows, "report_problem") for r in row.reasons),
        *malformed,
    ]
    uses = [_capability_use(row) for row in _of_kind(rows, "capability_use")]
    facets: dict[str, RunFacet] = {
        GOVERNANCE_FACET: _governance_facet(
            decision,
            producer,
            outcome=outcome,
            rejections=_of_kind(rows, "memory_rejected"),
            capabilityUses=uses or None,
            reportProblems=problems or None,
        )
    }
    if outcome is not None and end_state == RunState.FAIL:
        facets["errorMessage"] = _error_facet(outcome, producer)
    commits = _of_kind(rows, "memory_commit")
    written = (
        [_memory_output(agent, commits[-1], namespace, producer)]
        if agent and commits and outcome is not None
        else []
    )
    end = RunEvent(
        eventType=end_state,
        eventTime=event_time(ended),
        run=Run(runId=run, facets=facets),
        job=job,
        outputs=written,
        producer=producer,
    )
    return [*timed, *tasks, (_utc(ended), end)]


# --- governance inside a run --------------------------------------------------------------

_VERDICTS = frozenset({"allowed", "refused", "audited", "ungoverned"})
# How a task run ends, by the outcome of its last end.
_TASK_ENDS = {
    "completed": RunState.COMPLETE,
    "failed": RunState.FAIL,
    "crashed": RunState.FAIL,
    "memory_rejected": RunState.FAIL,
    "refused": RunState.ABORT,
}
assert set(_TASK_ENDS) == set(OUTCOMES)
_MODES = frozenset({"enforce", "audit"})
NOT_A_TASK_RUN = "(not a task run)"  # the run id of a governed task called outside Prefect
_OUTSIDE_PREFECT = "decision:"  # the key of such a task's run: its decision's


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    """A string as is; other JSON values (reported by the run, unchecked) as JSON text."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def _task_of(row: LineageEvent) -> dict[str, Any]:
    payload = _dict(row.payload)
    return _dict(payload.get("task")) or _dict(_dict(payload.get("envelope")).get("task"))


def task_run_key(row: LineageEvent) -> str:
    """The task run a task decision is about: the Prefect task run id, or for a task called
    outside Prefect (no task run), the decision itself."""
    task_run = _task_of(row).get("run_id")
    if isinstance(task_run, str) and task_run and task_run != NOT_A_TASK_RUN:
        return task_run
    return f"{_OUTSIDE_PREFECT}{row.decision_id or row.event_id}"


def _reported_time(row: LineageEvent) -> datetime:
    """When the run says it decided or ended (``payload.time``), else when the row was
    written."""
    reported = _dict(row.payload).get("time")
    if isinstance(reported, str):
        try:
            return _utc(datetime.fromisoformat(reported))
        except ValueError:
            pass
    return _utc(row.created_at)


def _malformed(row: LineageEvent) -> str | None:
    """Why a task decision (or end) cannot be exported as one, if it cannot."""
    if row.kind == "task_end":
        return None if row.verdict in _TASK_ENDS else f"task end: outcome {row.verdict!r}"
    if row.verdict not in _VERDICTS:
        return f"task decision {row.decision_id or row.event_id}: verdict {row.verdict!r}"
    if row.mode is not None and row.mode not in _MODES:
        return f"task decision {row.decision_id or row.event_id}: mode {row.mode!r}"
    return None


def _task_end(end: LineageEvent) -> dict[str, Any]:
    """A task's end as the ``taskEnd`` of its event's facet (the worker's own fields)."""
    payload = _dict(end.payload)
    posture = _dict(payload.get("posture"))
    memory = payload.get("memory")
    check = _dict(payload.get("check"))
    attempt = _dict(payload.get("task")).get("attempt")
    return {
        "outcome": end.verdict,
        "attempt": attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else None,
        "events": list(payload.get("events") or []),
        "trustPrevious": payload.get("previous"),
        "trustScore": payload.get("score"),
        "window": list(posture.get("window") or []),
        "slope": posture.get("slope"),
        "tasks": posture.get("tasks"),
        "memoryVersion": posture.get("memory_version"),
        "memory": {
            "status": memory.get("status"),
            "version": memory.get("version"),
            "contentHash": memory.get("content_hash"),
            "fields": memory.get("fields"),
            "errors": memory.get("errors"),
            "rebased": memory.get("rebased"),
        }
        if isinstance(memory, dict)
        else None,
        "verified": check.get("verified") is True,
        "verifyReason": _text(check.get("why")),
    }


def _task_facet(
    row: LineageEvent, producer: str, end: LineageEvent | None = None
) -> GovernanceRunFacet:
    """The governance facet of a task decision (its reported fields made to fit the schema),
    with the task's ``end`` if this event is one (``row`` is then the task's latest decision,
    or the flow run's when the task has none)."""
    payload = _dict(row.payload)
    task = _task_of(row) or (_task_of(end) if end is not None else {})
    check = _dict(payload.get("check"))
    attempt, verified = task.get("attempt"), check.get("verified")
    latency = row.latency_ms
    clean = LineageEvent(
        kind=row.kind,
        agent_id=row.agent_id,
        flow_run_id=row.flow_run_id,
        envelope_id=_text(row.envelope_id),
        decision_id=_text(row.decision_id),
        verdict=row.verdict,
        allow=row.allow is True,
        reasons=[_text(r) or "" for r in row.reasons or []],
        warnings=[_text(w) or "" for w in row.warnings or []],
        engine=_text(row.engine),
        policy_path=_text(row.policy_path),
        policy_revision=_text(row.policy_revision),
        latency_ms=latency
        if isinstance(latency, (int, float)) and not isinstance(latency, bool)
        else None,
        mode=row.mode,
        payload={
            "fail_mode": payload.get("fail_mode")
            if payload.get("fail_mode") in ("closed", "open")
            else None,
            "error": _text(payload.get("error")),
            "annotations": {
                str(k): _text(v) or "" for k, v in _dict(payload.get("annotations")).items()
            },
        },
    )
    return _governance_facet(
        clean,
        producer,
        taskName=_text(task.get("name")),
        taskRunId=_text(task.get("run_id")),
        taskAttempt=attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else None,
        purpose=payload.get("purpose") if payload.get("purpose") in ("admit", "retry") else None,
        parentDecisionId=_text(payload.get("parent_decision_id"))
        or (end.decision_id if end is not None else None),
        verified=verified if isinstance(verified, bool) else None,
        verifyReason=_text(check.get("why")),
        taskEnd=_task_end(end) if end is not None else None,
    )


def _by_task_run(rows: list[LineageEvent]) -> tuple[dict[str, list[LineageEvent]], list[str]]:
    """A flow run's task decisions and ends by task run (each in the run's order), and the
    ones that could not be exported (malformed reports)."""
    by_task: dict[str, list[LineageEvent]] = {}
    outside: dict[str | None, str] = {}  # a task called outside Prefect: its latest decision
    malformed: list[str] = []
    for row in rows:
        if row.kind not in ("task_decision", "task_end"):
            continue
        why = _malformed(row)
        if why is not None:
            malformed.append(why)
            continue
        key = task_run_key(row)
        if key.startswith(_OUTSIDE_PREFECT):  # no task run: an end goes with its task's decision
            name = _text(_task_of(row).get("name"))
            if row.kind == "task_decision":
                outside[name] = key
            else:
                key = outside.get(name, f"end:{row.event_id}")
        by_task.setdefault(key, []).append(row)
    return by_task, malformed


def _task_events(
    rows: list[LineageEvent],
    *,
    decision: LineageEvent,
    parent_job: Job,
    not_before: datetime,
    producer: str,
) -> tuple[list[tuple[datetime, RunEvent]], list[str]]:
    """The governed task runs of a flow run (governed by ``decision``) as timed run events
    (see the module's doc), and the task records that could not be exported."""
    by_task, malformed = _by_task_run(rows)
    parent = parent_run_facet(run_id(decision.flow_run_id or ""), parent_job, producer)
    timed: list[tuple[datetime, RunEvent]] = []
    for key, items in by_task.items():
        name = _text(_task_of(items[0]).get("name")) or "unknown-task"
        job = Job(namespace=parent_job.namespace, name=f"{parent_job.name}.{name}")
        run = task_run_id(key)
        moment = not_before
        decided: LineageEvent | None = None  # the task's latest decision so far
        for position, row in enumerate(items):
            moment = max(moment, _reported_time(row))
            ending: RunState | None
            if row.kind == "task_end":
                facet = _task_facet(decided or decision, producer, end=row)
                ending = _TASK_ENDS[row.verdict or ""]
            else:
                decided, facet = row, _task_facet(row, producer)
                ending = RunState.ABORT if row.verdict == "refused" else None
            types = [RunState.START] if position == 0 else []
            if position == len(items) - 1 and ending is not None:
                types.append(ending)
            elif position > 0:
                types.append(RunState.OTHER)
            facets: dict[str, RunFacet] = {PARENT_FACET: parent, GOVERNANCE_FACET: facet}
            for event_type in types:
                event = RunEvent(
                    eventType=event_type,
                    eventTime=event_time(moment),
                    run=Run(runId=run, facets=facets),
                    job=job,
                    producer=producer,
                )
                timed.append((moment, event))
    return timed, malformed


def parent_run_facet(run: str, job: Job, producer: str) -> parent_run.ParentRunFacet:
    """The standard ``parent`` facet: the flow run a task run belongs to."""
    return parent_run.ParentRunFacet(
        producer=producer,
        run=parent_run.Run(runId=run),
        job=parent_run.Job(namespace=job.namespace, name=job.name),
    )


def _capability_use(row: LineageEvent) -> dict[str, Any]:
    """One use of a capability, as listed in the flow run's ``governance`` facet."""
    payload = _dict(row.payload)
    task = _dict(payload.get("task"))
    blocked = row.verdict != "used"  # blocked, or flagged: a use the worker's record lacks
    return {
        "capability": _text(payload.get("capability")) or "",
        "verdict": row.verdict if row.verdict in ("used", "flagged") else "blocked",
        "task": _text(task.get("name")),
        "taskRunId": _text(task.get("run_id")),
        "use": _text(payload.get("use")),
        "reason": "; ".join(_text(r) or "" for r in row.reasons or []) or None if blocked else None,
        "time": _text(payload.get("time")),
    }


def to_openlineage(
    events: Iterable[LineageEvent],
    *,
    namespace: str = DEFAULT_NAMESPACE,
    producer: str = DEFAULT_PRODUCER,
) -> list[dict[str, Any]]:
    """Lineage rows as OpenLineage run events (plain JSON dicts), in time order.

    Within a run, START always precedes its terminal event, even at the same instant. An
    outcome whose state is not final (``UNKNOWN``) gives an ``OTHER`` event, not an end.
    """
    timed = [
        (moment, index, position, event)
        for index, rows in enumerate(group_runs(events).values())
        for position, (moment, event) in enumerate(
            run_events(rows, namespace=namespace, producer=producer)
        )
    ]
    timed.sort(key=lambda item: item[:3])
    return [Serde.to_dict(event) for *_, event in timed]


def write_jsonl(
    events: list[dict[str, Any]], path_or_stream: str | os.PathLike[str] | IO[str]
) -> None:
    """Write events as JSON Lines: one compact JSON object a line."""
    lines = "".join(json.dumps(event, separators=(",", ":")) + "\n" for event in events)
    if isinstance(path_or_stream, (str, os.PathLike)):
        with open(path_or_stream, "w", encoding="utf-8") as stream:
            stream.write(lines)
    else:
        path_or_stream.write(lines)
