"""The lineage: an append-only table of governance events, stored with SQLModel.

SQLite under PREFECT_HOME by default; any SQLAlchemy URL (PostgreSQL in
production). Hash-chaining, memory and trust events build on this table later:
``seq``, ``prev_hash`` and ``hash`` are reserved for them.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, Literal

from sqlalchemy import JSON, Column, event
from sqlalchemy.engine import Engine
from sqlmodel import Field, Session, SQLModel, create_engine, func, select

from prefect_governance.models import Decision

EventKind = Literal["decision", "outcome"]


def _now() -> datetime:
    return datetime.now(timezone.utc)


class LineageEvent(SQLModel, table=True):
    """One governance event. Rows are only ever inserted."""

    __tablename__ = "governance_event"

    id: int | None = Field(default=None, primary_key=True)
    event_id: str = Field(default_factory=lambda: str(uuid.uuid4()), unique=True, index=True)
    created_at: datetime = Field(default_factory=_now, index=True)
    kind: str = Field(index=True)
    agent_id: str | None = Field(default=None, index=True)
    flow_run_id: str | None = Field(default=None, index=True)
    envelope_id: str | None = None
    decision_id: str | None = Field(default=None, index=True)
    verdict: str | None = None
    allow: bool | None = None
    reasons: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    warnings: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    engine: str | None = None
    policy_path: str | None = None
    policy_revision: str | None = None
    latency_ms: float | None = None
    mode: str | None = None
    state: str | None = Field(default=None, description="The run's final state, for outcomes.")
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # Reserved for the per-agent hash chain.
    seq: int | None = None
    prev_hash: str | None = None
    hash: str | None = None


def decision_event(
    decision: Decision, *, agent_id: str | None, flow_run_id: str, envelope: dict[str, Any] | None
) -> LineageEvent:
    """The lineage record of a decision (with the envelope it was about)."""
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
        payload={
            "envelope": envelope,
            "annotations": decision.annotations,
            "fail_mode": decision.fail_mode,
            "error": decision.error,
        },
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
        payload={"message": message, "status_code": status_code},
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


class LineageStore:
    """Append and read lineage events at one database URL."""

    def __init__(self, url: str):
        self.url = url
        self.engine: Engine = create_engine(url, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        SQLModel.metadata.create_all(self.engine, tables=[LineageEvent.__table__])

    def append(self, *events: LineageEvent) -> None:
        """Commit events durably, in one transaction; raise if that fails."""
        with Session(self.engine, expire_on_commit=False) as session:
            session.add_all(events)
            session.commit()

    def recent(
        self, limit: int = 50, *, agent_id: str | None = None, flow_run_id: str | None = None
    ) -> Sequence[LineageEvent]:
        """Newest events first."""
        query = select(LineageEvent).order_by(LineageEvent.id.desc()).limit(limit)
        if agent_id:
            query = query.where(LineageEvent.agent_id == agent_id)
        if flow_run_id:
            query = query.where(LineageEvent.flow_run_id == flow_run_id)
        with Session(self.engine) as session:
            return session.exec(query).all()

    def decision_counts(self, agent_id: str) -> tuple[int, int]:
        """How many runs of an agent were decided, and how many of them refused."""
        with Session(self.engine) as session:
            rows = session.exec(
                select(LineageEvent.verdict, func.count())
                .where(LineageEvent.agent_id == agent_id, LineageEvent.kind == "decision")
                .group_by(LineageEvent.verdict)
            ).all()
        counts = dict(rows)
        return sum(counts.values()), counts.get("refused", 0)

    def dispose(self) -> None:
        self.engine.dispose()
