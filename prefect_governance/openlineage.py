"""The lineage as OpenLineage run events (https://openlineage.io/spec).

Pure functions over lineage rows: each governed flow run becomes a START event at its
decision, then one terminal event (COMPLETE, FAIL or ABORT) at its outcome. A refused run
is START and ABORT at the decision; a run with no outcome yet is only START. Every event
carries the decision as a custom ``governance`` run facet; the agent's memory is a dataset,
read on START and written when the run committed to it.

Rows of kinds this module does not know are ignored, as are runs that have no decision.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from typing import IO, Any

import attr
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import RunFacet, dataset_version_dataset, error_message_run
from openlineage.client.serde import Serde

from prefect_governance.lineage import LineageEvent

DEFAULT_NAMESPACE = "prefect-governance"


def _package_version() -> str:
    try:
        return version("prefect-governance")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0.1.0"


DEFAULT_PRODUCER = (
    f"https://github.com/prefect-governance/prefect-governance/tree/{_package_version()}"
)
GOVERNANCE_FACET = "governance"
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
    """The policy decision a flow run was governed by, and how the run ended."""

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

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._schemaURL = f"{governance_facet_schema_url(self._producer)}#/$defs/GovernanceRunFacet"


def governance_facet_schema(producer: str = DEFAULT_PRODUCER) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the ``governance`` run facet."""
    strings = {"type": "array", "items": {"type": "string"}}
    optional_string = {"type": ["string", "null"]}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": governance_facet_schema_url(producer),
        "$defs": {
            "GovernanceRunFacet": {
                "description": "The policy decision a Prefect flow run was governed by.",
                "allOf": [
                    {"$ref": RUN_FACET_SCHEMA_URL},
                    {
                        "type": "object",
                        "properties": {
                            "decisionId": {"type": "string"},
                            "verdict": {
                                "enum": ["allowed", "refused", "audited", "ungoverned"],
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
    """One flow run's rows (in time order) as timed OpenLineage run events."""
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
    if decision.verdict == "refused":
        end_state, ended = RunState.ABORT, decision.created_at
        outcome = None
    elif outcome is not None:
        end_state, ended = _TERMINAL.get(outcome.state or "", RunState.OTHER), outcome.created_at
    else:
        return timed
    facets: dict[str, RunFacet] = {
        GOVERNANCE_FACET: _governance_facet(
            decision, producer, outcome=outcome, rejections=_of_kind(rows, "memory_rejected")
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
    return [*timed, (_utc(ended), end)]


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
