"""The lineage: an append-only table of governance events, stored with SQLModel.

SQLite under PREFECT_HOME by default; any SQLAlchemy URL (PostgreSQL in
production). Events form one tamper-evident hash chain per agent (``chain`` is the
agent id, ``"-"`` for events without one): ``seq`` numbers the chain from 1,
``prev_hash`` is the previous record's ``hash`` and ``hash`` covers every column but
``id`` and ``hash``. ``verify_chain`` finds the first altered, deleted or reordered
record of a chain. Deleting the newest records of a chain cannot be detected from the
chain alone.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from sqlalchemy import JSON, Column, UniqueConstraint, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel import Field, Session, SQLModel, create_engine, func, select, text

from prefect_governance.canonical import canonical_json, sha256_of
from prefect_governance.migrations import migrate
from prefect_governance.models import Decision

EventKind = Literal["decision", "outcome"]
ProblemKind = Literal["altered", "deleted", "reordered"]

NO_AGENT_CHAIN = "-"
APPEND_ATTEMPTS = 20
_CHAIN_SEQ_CONSTRAINT = "uq_governance_event_chain_seq"
_NOT_HASHED = frozenset({"id", "hash"})
_JSON_COLUMNS = ("reasons", "warnings", "payload")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(value: datetime) -> datetime:
    """An aware UTC datetime; a naive one is taken to be UTC already."""
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def utc_iso(value: datetime) -> str:
    """The fixed ISO 8601 form hashed for datetimes: UTC, with microseconds."""
    return as_utc(value).isoformat(timespec="microseconds")


class LineageEvent(SQLModel, table=True):
    """One governance event. Rows are only ever inserted; append() chains them."""

    __tablename__ = "governance_event"
    __table_args__ = (UniqueConstraint("chain", "seq", name=_CHAIN_SEQ_CONSTRAINT),)

    id: int | None = Field(default=None, primary_key=True)
    event_id: str = Field(default_factory=lambda: str(uuid.uuid4()), unique=True, index=True)
    # SQLModel stores it as UTC and reads it back aware; SQLite keeps no offset.
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
    # The per-agent hash chain, filled in by LineageStore.append.
    chain: str = Field(default="", description="The agent id, or '-' for events without one.")
    seq: int | None = Field(default=None, nullable=False, description="1-based position in chain.")
    prev_hash: str | None = Field(default=None, description="hash of the previous record.")
    hash: str | None = Field(default=None, nullable=False, description="sha256 of canonical().")


def chain_of(agent_id: str | None) -> str:
    """The chain an agent's events belong to."""
    return NO_AGENT_CHAIN if agent_id is None else agent_id


def _hashed_columns() -> list[str]:
    return [c.name for c in LineageEvent.__table__.columns if c.name not in _NOT_HASHED]


def _plain(value: Any) -> Any:
    return utc_iso(value) if isinstance(value, datetime) else value


def _record(event: LineageEvent) -> dict[str, Any]:
    """Every column but id and hash, as plain JSON values."""
    return {name: _plain(getattr(event, name)) for name in _hashed_columns()}


def canonical(event: LineageEvent) -> bytes:
    """The bytes hashed for an event."""
    return canonical_json(_record(event))


def event_hash(event: LineageEvent) -> str:
    """``sha256:<hex>`` of the event's canonical form."""
    return sha256_of(_record(event))


@dataclass(frozen=True)
class ChainProblem:
    """The first bad record of a chain."""

    chain: str
    seq: int | None
    event_id: str
    kind: ProblemKind
    message: str


def _problem(row: LineageEvent, kind: ProblemKind, what: str) -> ChainProblem:
    message = f"chain {row.chain}: record {row.seq} (event {row.event_id}) {what}"
    return ChainProblem(row.chain, row.seq, row.event_id, kind, message)


_ALTERED = "was altered: its hash does not match its content"


def _check_link(
    row: LineageEvent,
    prev: LineageEvent | None,
    expected: int,
    seqs: set[int | None],
    hashes: set[str | None],
) -> ChainProblem | None:
    """Is the row where it should be: right seq, after its predecessor, linked to it?"""
    if row.seq is None or row.seq < expected or (row.seq > expected and expected in seqs):
        return _problem(row, "reordered", f"is out of order: expected record {expected} here")
    if row.seq > expected:
        missing = str(expected) if row.seq == expected + 1 else f"{expected}..{row.seq - 1}"
        return _problem(row, "deleted", f"follows a gap: record {missing} was deleted")
    if prev is not None and (row.id or 0) <= (prev.id or 0):
        return _problem(row, "reordered", f"was written before record {prev.seq}: reordered")
    if row.prev_hash == (prev.hash if prev else None):
        return None
    if row.prev_hash in hashes:
        return _problem(row, "reordered", "links to another record of the chain: reordered")
    if event_hash(row) != row.hash:
        return _problem(row, "altered", _ALTERED)
    return _problem(row, "deleted", "does not link to the record before it: one was deleted")


def verify_chain(events: Sequence[LineageEvent]) -> ChainProblem | None:
    """The first problem of one chain's rows (in database order of seq), or None."""
    seqs, hashes = {e.seq for e in events}, {e.hash for e in events}
    prev: LineageEvent | None = None
    for expected, row in enumerate(events, start=1):
        problem = _check_link(row, prev, expected, seqs, hashes)
        if problem is None and event_hash(row) != row.hash:
            problem = _problem(row, "altered", _ALTERED)
        if problem is not None:
            return problem
        prev = row
    return None


def decision_event(
    decision: Decision,
    *,
    agent_id: str | None,
    flow_run_id: str,
    envelope: dict[str, Any] | None,
    agent_block: str | None = None,
    worker: str | None = None,
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
            "agent_block": agent_block,
            "worker": worker,
            "annotations": decision.annotations,
            "rules": [reason.model_dump() for reason in decision.reasons],
            "fail_mode": decision.fail_mode,
            "error": decision.error,
        },
    )


def decision_from_event(event: LineageEvent) -> Decision:
    """The decision a decision record holds (the inverse of ``decision_event``)."""
    payload = event.payload or {}
    return Decision(
        id=event.decision_id or "",
        verdict=event.verdict,  # type: ignore[arg-type]
        allow=bool(event.allow),
        deny=list(event.reasons or []),
        warn=list(event.warnings or []),
        annotations=payload.get("annotations") or {},
        reasons=payload.get("rules") or [],
        engine=event.engine or "-",
        policy_path=event.policy_path or "",
        policy_revision=event.policy_revision,
        latency_ms=event.latency_ms or 0.0,
        mode=event.mode or "enforce",  # type: ignore[arg-type]
        fail_mode=payload.get("fail_mode") or "closed",
        error=payload.get("error"),
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


def _normalise(event: LineageEvent) -> None:
    """Give an event the values it will have when read back, so its hash survives storage."""
    event.chain = chain_of(event.agent_id)
    event.created_at = as_utc(event.created_at)
    for name in _JSON_COLUMNS:
        setattr(event, name, json.loads(json.dumps(getattr(event, name))))


def _by_chain(events: Iterable[LineageEvent]) -> list[LineageEvent]:
    """Events grouped by chain (chains in order of first appearance), order kept within."""
    groups: dict[str, list[LineageEvent]] = {}
    for e in events:
        groups.setdefault(e.chain, []).append(e)
    return [e for group in groups.values() for e in group]


def _retryable(exc: Exception) -> bool:
    """A lost race for a chain position (or, on SQLite, a lock that timed out)."""
    message = str(getattr(exc, "orig", exc)).lower()
    if isinstance(exc, IntegrityError):
        return _CHAIN_SEQ_CONSTRAINT in message or "governance_event.chain" in message
    return isinstance(exc, OperationalError) and "locked" in message


class LineageStore:
    """Append and read lineage events at one database URL.

    Opening a store migrates its database to the current schema (see ``migrations``).
    """

    def __init__(self, url: str, *, append_timeout: float = 15.0):
        self.url = url
        self.append_timeout = append_timeout  # seconds an append may keep retrying
        self.engine: Engine = create_engine(url, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            migrate(self.engine)
        except Exception:
            self.engine.dispose()
            raise

    def append(self, *events: LineageEvent, once_per_decision: str | None = None) -> bool:
        """Chain and commit events durably, in one transaction; raise if that fails.

        Each event gets the next seq of its agent's chain; a lost race with another
        appender (unique chain/seq) is rolled back and retried from the new head,
        for at most ``append_timeout`` seconds (then the error is raised). With
        ``once_per_decision`` (an event kind), nothing is appended when the first
        event's decision already has a record of that kind (checked under the chain's
        lock): returns whether the events were appended.
        """
        if not events:
            return False
        for e in events:
            _normalise(e)
        ordered = _by_chain(events)
        given_ids = [e.id for e in ordered]
        once = (once_per_decision, events[0].decision_id) if once_per_decision else None
        deadline = time.monotonic() + self.append_timeout
        for attempt in range(1, APPEND_ATTEMPTS + 1):
            try:
                return self._append_once(ordered, once)
            except (IntegrityError, OperationalError) as exc:
                last = attempt == APPEND_ATTEMPTS or time.monotonic() >= deadline
                if last or not _retryable(exc):
                    raise
            for e, given in zip(ordered, given_ids, strict=True):
                e.id = given
            time.sleep(random.uniform(0.001, 0.005 * attempt))

    def _append_once(self, events: list[LineageEvent], once: tuple[str, str | None] | None) -> bool:
        chains = sorted({e.chain for e in events})
        with Session(self.engine, expire_on_commit=False) as session:
            self._lock(session, chains)
            if once is not None and self._has(session, *once):
                return False
            heads = {chain: self._head(session, chain) for chain in chains}
            for e in events:
                seq, prev_hash = heads[e.chain]
                e.seq, e.prev_hash = seq + 1, prev_hash
                e.hash = event_hash(e)
                heads[e.chain] = (e.seq, e.hash)
                session.add(e)
                session.flush()  # one at a time: ids rise with seq
            session.commit()
        return True

    @staticmethod
    def _has(session: Session, kind: str, decision_id: str | None) -> bool:
        query = select(LineageEvent.id).where(
            LineageEvent.kind == kind, LineageEvent.decision_id == decision_id
        )
        return session.exec(query.limit(1)).first() is not None

    def _lock(self, session: Session, chains: list[str]) -> None:
        """Serialise appenders: SQLite's write lock, or PostgreSQL per-chain advisory locks."""
        connection = session.connection()
        if self.engine.dialect.name == "sqlite":
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        elif self.engine.dialect.name == "postgresql":
            for chain in chains:
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"),
                    {"key": f"{LineageEvent.__tablename__}:{chain}"},
                )

    @staticmethod
    def _head(session: Session, chain: str) -> tuple[int, str | None]:
        """The seq and hash of the newest record of a chain; (0, None) if it is empty."""
        row = session.exec(
            select(LineageEvent.seq, LineageEvent.hash)
            .where(LineageEvent.chain == chain)
            .order_by(LineageEvent.seq.desc())
            .limit(1)
        ).first()
        return (0, None) if row is None else (row[0] or 0, row[1])

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

    def chain(self, chain: str) -> list[LineageEvent]:
        """All records of one chain, by seq."""
        query = select(LineageEvent).where(LineageEvent.chain == chain).order_by(LineageEvent.seq)
        with Session(self.engine) as session:
            return list(session.exec(query).all())

    def chains(self) -> list[str]:
        """The names of all chains, sorted."""
        with Session(self.engine) as session:
            return list(
                session.exec(
                    select(LineageEvent.chain).distinct().order_by(LineageEvent.chain)
                ).all()
            )

    def verify(self) -> list[ChainProblem]:
        """The first problem of every chain that has one."""
        problems = (verify_chain(self.chain(name)) for name in self.chains())
        return [p for p in problems if p is not None]

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

    def unsettled(
        self, verdicts: Iterable[str] = ("allowed", "audited", "ungoverned")
    ) -> list[LineageEvent]:
        """Decisions that let a run go ahead and have no outcome record yet, oldest first."""
        outcomes = select(LineageEvent.decision_id).where(
            LineageEvent.kind == "outcome", LineageEvent.decision_id.is_not(None)
        )
        query = (
            select(LineageEvent)
            .where(
                LineageEvent.kind == "decision",
                LineageEvent.verdict.in_(list(verdicts)),
                LineageEvent.decision_id.not_in(outcomes),
            )
            .order_by(LineageEvent.id)
        )
        with Session(self.engine) as session:
            return list(session.exec(query).all())

    def dispose(self) -> None:
        self.engine.dispose()
