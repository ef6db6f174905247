"""What a lineage record is, and what each kind of record says.

``LineageEvent`` is the row (the table ``governance_event``); ``EventKind`` names every
kind of record the package writes, and each kind's ``payload`` has a typed model here,
built by that kind's one factory below. The stored JSON is the model's fields, as they
were written before the models existed (the records' hashes and signatures cover it):
a payload model never adds, renames or drops a key.

What a run reported (task decisions, capability uses) is kept as the run reported it,
checked or not: those fields are ``Any``, and ``check`` says what the worker found.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict
from sqlalchemy import JSON, Column, UniqueConstraint
from sqlmodel import AutoString, Field, SQLModel

from prefect_governance.core.models import Decision
from prefect_governance.lineage.auth import UNVOUCHED
from prefect_governance.lineage.memory import CommitResult

EventKind = Literal[
    "decision",  # the policy's decision on a flow run (worker, before anything runs)
    "outcome",  # how the run ended
    "task_decision",  # a governed task's decision inside the run, as the run reported it
    "capability_use",  # a use of a capability inside the run (used, flagged or blocked)
    "task_end",  # how a governed task ended: its outcome, memory change and trust, as checked
    "report_problem",  # what was wrong with the run's report of its events
    "memory_commit",  # the run's memory proposals, committed as the next version
    "memory_rejected",  # ... rejected (schema errors, unusable or missing proposals)
    "memory_discarded",  # ... discarded (the run did not complete)
    "trust",  # the agent's trust score after a run (or a refusal)
    "gate_refusal",  # a start the gate refused (another worker type took the run)
    "unvouched",  # records on top of a chain that no pinned key vouches for
]
EVENT_KINDS: tuple[EventKind, ...] = get_args(EventKind)
assert UNVOUCHED in EVENT_KINDS

CHAIN_SEQ_CONSTRAINT = "uq_governance_event_chain_seq"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _no_items() -> list[str]:
    # Not ``list`` itself: SQLModel has pydantic inspect the factory's signature on every
    # new event, and inspecting a builtin's takes ~0.1 ms.
    return []


class LineageEvent(SQLModel, table=True):
    """One governance event. Rows are only ever inserted; append() chains them."""

    __tablename__ = "governance_event"
    __table_args__ = (UniqueConstraint("chain", "seq", name=CHAIN_SEQ_CONSTRAINT),)

    id: int | None = Field(default=None, primary_key=True)
    event_id: str = Field(default_factory=lambda: str(uuid.uuid4()), unique=True, index=True)
    # SQLModel stores it as UTC and reads it back aware; SQLite keeps no offset.
    created_at: datetime = Field(default_factory=_now, index=True)
    # A table model does not validate: a record read back may hold any kind (an older or
    # a forged one); the package writes only these.
    kind: EventKind = Field(index=True, sa_type=AutoString)
    agent_id: str | None = Field(default=None, index=True)
    flow_run_id: str | None = Field(default=None, index=True)
    envelope_id: str | None = None
    decision_id: str | None = Field(default=None, index=True)
    verdict: str | None = None
    allow: bool | None = None
    reasons: list[str] = Field(default_factory=_no_items, sa_column=Column(JSON, nullable=False))
    warnings: list[str] = Field(default_factory=_no_items, sa_column=Column(JSON, nullable=False))
    engine: str | None = None
    policy_path: str | None = None
    policy_revision: str | None = None
    latency_ms: float | None = None
    mode: str | None = None
    state: str | None = Field(default=None, description="The run's final state, for outcomes.")
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # The per-agent hash chain, filled in by LineageStore.append.
    chain: str = Field(default="", description="The agent id, or '-' for events without one.")
    seq: int | None = Field(default=None, nullable=False, description="1-based position in chain.")
    prev_hash: str | None = Field(default=None, description="hash of the previous record.")
    hash: str | None = Field(default=None, nullable=False, description="sha256 of canonical().")
    signature: str | None = Field(
        default=None, description="The worker's signature of hash (lineage_auth), if any."
    )


# --- the payload of each kind -----------------------------------------------------------


class Payload(BaseModel):
    """The ``payload`` of one kind of record: every field is stored, None included."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def stored(self) -> dict[str, Any]:
        """The payload as the record holds it."""
        return self.model_dump(mode="python")


class DecisionPayload(Payload):
    envelope: dict[str, Any] | None  # the mutation envelope decided on (None: none was built)
    agent_block: str | None
    agent_version: int | None  # of the signed agent the decision was made for
    worker: str | None
    annotations: dict[str, str]
    rules: list[dict[str, Any]]  # the decision's rule attributions (Decision.reasons)
    fail_mode: str
    error: str | None
    rejected_approvals: list[str]
    approval: list[dict[str, Any]] = []  # the approvals an awaiting run waits for
    # The signed exceptions the policy was shown, the denies they waived, the ones rejected.
    exceptions: list[dict[str, Any]] = []
    waived: list[dict[str, Any]] = []
    rejected_exceptions: list[str] = []


class OutcomePayload(Payload):
    message: str | None
    status_code: int | None


class TaskDecisionPayload(Payload):
    # As the run reported them:
    seq: Any
    time: Any
    purpose: Any
    task: Any
    envelope: Any
    context: Any
    posture: Any  # the posture the task inherited, as the run said
    rules: Any
    annotations: Any
    fail_mode: Any
    error: Any
    # The worker's own:
    parent_decision_id: str
    check: dict[str, Any]  # what the worker found when it decided the same input again


class CapabilityUsePayload(Payload):
    # As the run reported them:
    seq: Any
    time: Any
    capability: Any
    use: Any
    task: Any
    # Whether the worker found the use covered (absent for a blocked use: nothing was used).
    check: dict[str, Any] | None = None

    def stored(self) -> dict[str, Any]:
        return self.model_dump(mode="python", exclude={"check"} if self.check is None else None)


class TaskEndPayload(Payload):
    # As the run reported them:
    seq: Any
    time: Any
    task: Any
    reported: Any  # what the run said: outcome, blocked, accepted, errors, posture
    # The worker's own (what the lineage keeps):
    parent_decision_id: str
    outcome: str  # as the worker holds it (Prefect's task state where the run's word differs)
    events: list[str]  # its trust events (core.trust.TrustEvent)
    previous: float  # the agent's score before it, as committed
    score: float  # ... after it
    posture: dict[str, Any]  # the posture the next task inherits, recomputed from the grant
    memory: dict[str, Any] | None  # {"status": committed|rejected|discarded, ...}; None: none
    check: dict[str, Any]  # {"verified": True}, or False with why the run's word differs


class ReportProblemPayload(Payload):
    """Nothing: the problems are the record's ``reasons``."""


class TrustPayload(Payload):
    score: float
    previous: float
    events: list[str]  # the run's trust events (core.trust.TrustEvent)


class MemoryCommitPayload(Payload):
    version: int
    content_hash: str
    schema_hash: str
    base_version: int
    rebased: bool


class MemoryRejectedPayload(Payload):
    base_version: int
    errors: list[str]


class MemoryDiscardedPayload(Payload):
    base_version: int
    reason: str


class GateRefusalPayload(Payload):
    state_id: str
    state_time: str | None
    worker: str | None
    worker_type: str | None


class UnvouchedPayload(Payload):
    from_seq: int
    to_seq: int
    why: str


PAYLOADS: dict[EventKind, type[Payload]] = {
    "decision": DecisionPayload,
    "outcome": OutcomePayload,
    "task_decision": TaskDecisionPayload,
    "capability_use": CapabilityUsePayload,
    "task_end": TaskEndPayload,
    "report_problem": ReportProblemPayload,
    "memory_commit": MemoryCommitPayload,
    "memory_rejected": MemoryRejectedPayload,
    "memory_discarded": MemoryDiscardedPayload,
    "trust": TrustPayload,
    "gate_refusal": GateRefusalPayload,
    "unvouched": UnvouchedPayload,
}
assert set(PAYLOADS) == set(EVENT_KINDS)


# --- one factory per kind ---------------------------------------------------------------


def decision_event(
    decision: Decision,
    *,
    agent_id: str | None,
    flow_run_id: str,
    envelope: dict[str, Any] | None,
    agent_block: str | None = None,
    worker: str | None = None,
    agent_version: int | None = None,
    exceptions: list[dict[str, Any]] | None = None,
) -> LineageEvent:
    """The lineage record of a decision (with the envelope it was about, the version of
    the signed agent it was made for, and the exceptions the policy was shown)."""
    payload = DecisionPayload(
        envelope=envelope,
        agent_block=agent_block,
        agent_version=agent_version,
        worker=worker,
        annotations=decision.annotations,
        rules=[reason.model_dump() for reason in decision.reasons],
        fail_mode=decision.fail_mode,
        error=decision.error,
        rejected_approvals=decision.rejected_approvals,
        approval=[request.model_dump() for request in decision.approval],
        exceptions=list(exceptions or []),
        waived=[waiver.model_dump() for waiver in decision.waived],
        rejected_exceptions=decision.rejected_exceptions,
    )
    return LineageEvent(
        kind="decision",
        agent_id=agent_id,
        flow_run_id=flow_run_id,
        envelope_id=(envelope or {}).get("id"),
        decision_id=decision.id,
        verdict=decision.verdict,
        allow=decision.allow,
        reasons=decision.deny,
        warnings=decision.warn,
        engine=decision.engine,
        policy_path=decision.policy_path,
        policy_revision=decision.policy_revision,
        latency_ms=decision.latency_ms,
        mode=decision.mode,
        payload=payload.stored(),
    )


def decision_from_event(event: LineageEvent) -> Decision:
    """The decision a decision record holds (the inverse of ``decision_event``; a record
    written by an older release may lack payload keys)."""
    payload = event.payload or {}
    return Decision(
        id=event.decision_id or "",
        verdict=event.verdict,
        allow=bool(event.allow),
        deny=list(event.reasons or []),
        warn=list(event.warnings or []),
        annotations=payload.get("annotations") or {},
        reasons=payload.get("rules") or [],
        engine=event.engine or "-",
        policy_path=event.policy_path or "",
        policy_revision=event.policy_revision,
        latency_ms=event.latency_ms or 0.0,
        mode=event.mode or "enforce",
        fail_mode=payload.get("fail_mode") or "closed",
        error=payload.get("error"),
        rejected_approvals=payload.get("rejected_approvals") or [],
        approval=payload.get("approval") or [],
        waived=payload.get("waived") or [],
        rejected_exceptions=payload.get("rejected_exceptions") or [],
    )


def outcome_event(
    *,
    agent_id: str | None,
    flow_run_id: str,
    decision_id: str | None,
    state: str,
    message: str | None = None,
    status_code: int | None = None,
) -> LineageEvent:
    """The lineage record of how a run ended."""
    return LineageEvent(
        kind="outcome",
        agent_id=agent_id,
        flow_run_id=flow_run_id,
        decision_id=decision_id,
        state=state,
        payload=OutcomePayload(message=message, status_code=status_code).stored(),
    )


def _reported(value: Any) -> dict[str, Any]:
    """A reported item as a dict (a report model, or a dict read back by key)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="python", by_alias=True, exclude_unset=True)
    return value


def task_decision_event(
    reported: Any,
    *,
    agent_id: str | None,
    flow_run_id: str,
    parent_decision_id: str,
    check: dict[str, Any],
) -> LineageEvent:
    """The lineage record of a task decision made inside a run (as the run reported it).

    ``check`` is what the worker found when it decided the same input again.
    """
    reported = _reported(reported)
    decision = reported.get("decision") or {}
    envelope = reported.get("envelope") or {}
    payload = TaskDecisionPayload(
        seq=reported.get("seq"),
        time=reported.get("time"),
        purpose=reported.get("purpose"),
        parent_decision_id=parent_decision_id,
        task=reported.get("task"),
        envelope=envelope,
        context=reported.get("context"),
        posture=reported.get("posture"),
        rules=decision.get("reasons") or [],
        annotations=decision.get("annotations") or {},
        fail_mode=decision.get("fail_mode"),
        error=decision.get("error"),
        check=check,
    )
    return LineageEvent(
        kind="task_decision",
        agent_id=agent_id,
        flow_run_id=flow_run_id,
        envelope_id=envelope.get("id"),
        decision_id=decision.get("id"),
        verdict=decision.get("verdict"),
        allow=decision.get("allow"),
        reasons=list(decision.get("deny") or []),
        warnings=list(decision.get("warn") or []),
        engine=decision.get("engine"),
        policy_path=decision.get("policy_path"),
        policy_revision=decision.get("policy_revision"),
        latency_ms=decision.get("latency_ms"),
        mode=decision.get("mode"),
        payload=payload.stored(),
    )


def capability_use_event(
    reported: Any,
    *,
    agent_id: str | None,
    flow_run_id: str,
    parent_decision_id: str,
    check: dict[str, Any] | None = None,
) -> LineageEvent:
    """The lineage record of one use of a capability inside a run (allowed or blocked).

    ``check``: whether the worker found the use covered by the run's signed grant and its
    task's declarations; a use it found not covered is ``flagged``, never ``used``.
    """
    reported = _reported(reported)
    granted = reported.get("granted") is True
    flagged = granted and check is not None and check.get("verified") is False
    if flagged:
        verdict, reasons = "flagged", [str(check.get("why"))]  # type: ignore[union-attr]
    elif granted:
        verdict, reasons = "used", []
    else:
        verdict, reasons = "blocked", [str(reported.get("reason"))]
    payload = CapabilityUsePayload(
        seq=reported.get("seq"),
        time=reported.get("time"),
        capability=reported.get("capability"),
        use=reported.get("use"),
        task=reported.get("task"),
        check=check,
    )
    return LineageEvent(
        kind="capability_use",
        agent_id=agent_id,
        flow_run_id=flow_run_id,
        decision_id=parent_decision_id,
        verdict=verdict,
        allow=granted and not flagged,
        reasons=reasons,
        payload=payload.stored(),
    )


def task_end_event(
    reported: Any,
    *,
    agent_id: str | None,
    flow_run_id: str,
    parent_decision_id: str,
    outcome: str,
    events: Sequence[str],
    posture: dict[str, Any],
    check: dict[str, Any],
) -> LineageEvent:
    """The lineage record of one governed task's end, as the worker computed it.

    Its trust (``previous``, ``score``) and ``memory`` are set when the worker settles
    the run, under the agent's chain lock (:func:`settle_task_end`)."""
    reported = _reported(reported)
    said = {k: reported.get(k) for k in ("outcome", "blocked", "accepted", "errors", "posture")}
    payload = TaskEndPayload(
        seq=reported.get("seq"),
        time=reported.get("time"),
        task=reported.get("task"),
        reported=said,
        parent_decision_id=parent_decision_id,
        outcome=outcome,
        events=list(events),
        previous=posture["score"],
        score=posture["score"],
        posture=posture,
        memory=None,
        check=check,
    )
    return LineageEvent(
        kind="task_end",
        agent_id=agent_id,
        flow_run_id=flow_run_id,
        decision_id=parent_decision_id,
        verdict=outcome,
        allow=outcome == "completed",
        reasons=[] if check.get("verified") is not False else [str(check.get("why"))],
        payload=payload.stored(),
    )


def settle_task_end(
    event: LineageEvent, *, previous: float, score: float, memory: dict[str, Any] | None
) -> None:
    """Complete a task's end record with the trust and memory change committed for it
    (before the append hashes it)."""
    event.payload = {**event.payload, "previous": previous, "score": score, "memory": memory}


def report_problem_event(
    problems: list[str], *, agent_id: str | None, flow_run_id: str, parent_decision_id: str
) -> LineageEvent:
    """What was wrong with a run's report of its governance events (missing, foreign, garbled)."""
    return LineageEvent(
        kind="report_problem",
        agent_id=agent_id,
        flow_run_id=flow_run_id,
        decision_id=parent_decision_id,
        reasons=problems,
        payload=ReportProblemPayload().stored(),
    )


def trust_event(
    *,
    agent_id: str,
    flow_run_id: str,
    decision_id: str,
    score: float,
    previous: float,
    events: Sequence[str],
) -> LineageEvent:
    """The agent's trust score after one run (or refusal), from the score before it."""
    return LineageEvent(
        kind="trust",
        agent_id=agent_id,
        flow_run_id=flow_run_id,
        decision_id=decision_id,
        payload=TrustPayload(score=score, previous=previous, events=events).stored(),
    )


def memory_commit_event(
    result: CommitResult,
    *,
    agent_id: str,
    flow_run_id: str,
    decision_id: str,
    schema_hash: str,
    base_version: int,
) -> LineageEvent:
    """The run's memory proposals, committed as ``result.version`` of the agent's memory."""
    if not result.committed or result.version is None or result.content_hash is None:
        raise ValueError("a memory commit record is of a committed version")
    payload = MemoryCommitPayload(
        version=result.version,
        content_hash=result.content_hash,
        schema_hash=schema_hash,
        base_version=base_version,
        rebased=result.rebased,
    )
    return LineageEvent(
        kind="memory_commit",
        agent_id=agent_id,
        flow_run_id=flow_run_id,
        decision_id=decision_id,
        payload=payload.stored(),
    )


def memory_rejected_event(
    problems: list[str], *, agent_id: str, flow_run_id: str, decision_id: str, base_version: int
) -> LineageEvent:
    """The run's memory proposals, rejected (none of them is committed)."""
    return LineageEvent(
        kind="memory_rejected",
        agent_id=agent_id,
        flow_run_id=flow_run_id,
        decision_id=decision_id,
        reasons=problems,
        payload=MemoryRejectedPayload(base_version=base_version, errors=problems).stored(),
    )


def memory_discarded_event(
    reason: str, *, agent_id: str, flow_run_id: str, decision_id: str, base_version: int
) -> LineageEvent:
    """The run's memory proposals, discarded unread (the run did not complete)."""
    return LineageEvent(
        kind="memory_discarded",
        agent_id=agent_id,
        flow_run_id=flow_run_id,
        decision_id=decision_id,
        payload=MemoryDiscardedPayload(base_version=base_version, reason=reason).stored(),
    )


def gate_refusal_event(flow_run: Any, agent_id: str | None) -> LineageEvent:
    """The lineage record of a start the gate refused (by whatever worker made it), from
    the Prefect flow run and its final state."""
    labels = flow_run.labels or {}
    state = flow_run.state
    payload = GateRefusalPayload(
        state_id=str(state.id),
        state_time=state.timestamp.isoformat() if state.timestamp else None,
        worker=labels.get("prefect.worker.name"),
        worker_type=labels.get("prefect.worker.type"),
    )
    return LineageEvent(
        kind="gate_refusal",
        agent_id=agent_id,
        flow_run_id=str(flow_run.id),
        decision_id=labels.get("governance.decision_id"),
        verdict="refused",
        allow=False,
        reasons=[state.message],
        payload=payload.stored(),
    )


def unvouched_event(agent_id: str | None, from_seq: int, to_seq: int, why: str) -> LineageEvent:
    """The record naming the records ``from_seq..to_seq`` of a chain that no pinned key
    vouches for (see ``lineage.auth``)."""
    return LineageEvent(
        kind=UNVOUCHED,
        agent_id=agent_id,
        reasons=[f"records {from_seq}..{to_seq} were not written by a governed worker"],
        payload=UnvouchedPayload(from_seq=from_seq, to_seq=to_seq, why=why).stored(),
    )
