"""Agent memory: a JSON document per agent, versioned, under the agent's JSON Schema.

Runs propose JSON merge patches (RFC 7386). A proposal is validated against
the schema and committed as the next version, never over another: a commit applies
the patches to the latest version (re-basing a proposal whose base went stale: applied
and validated again). The governor commits inside the lineage append that records the
commit (``commit_in``), under the agent's chain lock.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, Column, UniqueConstraint, insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, col, select

from prefect_governance.core.canonical import sha256_of
from prefect_governance.core.models import MemorySnapshot
from prefect_governance.core.posture import merge_patch, schema_errors
from prefect_governance.lineage.migrations import migrate


def _now() -> datetime:
    return datetime.now(timezone.utc)


class AgentMemory(SQLModel, table=True):
    """One committed version of an agent's memory. Rows are only ever inserted."""

    __tablename__ = "governance_agent_memory"
    __table_args__ = (UniqueConstraint("agent_id", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    agent_id: str = Field(index=True)
    version: int
    content: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    content_hash: str
    schema_hash: str
    decision_id: str | None = None
    flow_run_id: str | None = None
    created_at: datetime = Field(default_factory=_now)


@dataclass(frozen=True)
class CommitResult:
    committed: bool
    version: int | None = None
    content_hash: str | None = None
    base_version: int = 0
    rebased: bool = False
    errors: tuple[str, ...] = ()


def snapshot(row: Any) -> MemorySnapshot:
    """A memory version (a row of the table) as a snapshot; None: no version yet."""
    if row is None:
        return MemorySnapshot()
    return MemorySnapshot(
        version=row.version,
        content=row.content,
        content_hash=row.content_hash,
        schema_hash=row.schema_hash,
    )


class MemoryStore:
    """Agent memory in the lineage database (migrated to the current schema on open)."""

    def __init__(self, engine: Any):
        self.engine = engine
        migrate(engine)

    def _latest(self, session: Session, agent_id: str) -> AgentMemory | None:
        query = (
            select(AgentMemory)
            .where(AgentMemory.agent_id == agent_id)
            .order_by(col(AgentMemory.version).desc())
            .limit(1)
        )
        return session.exec(query).first()

    def latest(self, agent_id: str) -> MemorySnapshot:
        with Session(self.engine) as session:
            return snapshot(self._latest(session, agent_id))

    def history(self, agent_id: str) -> list[AgentMemory]:
        with Session(self.engine) as session:
            query = select(AgentMemory).where(AgentMemory.agent_id == agent_id)
            return list(session.exec(query.order_by(AgentMemory.version)).all())

    def commit(
        self,
        agent_id: str,
        patches: list[dict[str, Any]],
        *,
        base_version: int,
        schema: dict[str, Any],
        decision_id: str | None,
        flow_run_id: str | None,
        attempts: int = 20,
    ) -> CommitResult:
        """Apply the patches on the latest version, validate, insert the next version (in a
        transaction of its own, re-based when another commit took that version first)."""
        for _ in range(attempts):
            try:
                with self.engine.begin() as connection:
                    return commit_in(
                        connection,
                        agent_id,
                        patches,
                        base_version=base_version,
                        schema=schema,
                        decision_id=decision_id,
                        flow_run_id=flow_run_id,
                    )
            except IntegrityError:
                time.sleep(random.uniform(0.001, 0.02))  # that version was taken: re-base
        raise RuntimeError(f"memory of agent {agent_id!r}: no commit after {attempts} attempts")


_MEMORY = AgentMemory.__table__  # type: ignore[attr-defined]  # set by SQLModel, undeclared


def commit_in(
    connection: Connection,
    agent_id: str,
    patches: list[dict[str, Any]],
    *,
    base_version: int,
    schema: dict[str, Any],
    decision_id: str | None,
    flow_run_id: str | None,
) -> CommitResult:
    """Apply the patches on the latest version, validate, insert the next version, inside
    the caller's transaction (the lineage append that records the commit, under the
    agent's chain lock: so a run's memory is committed once, with its record)."""
    latest = connection.execute(
        select(_MEMORY)
        .where(_MEMORY.c.agent_id == agent_id)
        .order_by(_MEMORY.c.version.desc())
        .limit(1)
    ).first()
    current = snapshot(latest)
    content: Any = current.content
    for patch in patches:
        content = merge_patch(content, patch)
    rebased = current.version != base_version
    errors = schema_errors(content, schema)
    if errors:
        return CommitResult(False, base_version=base_version, errors=tuple(errors), rebased=rebased)
    version, content_hash = current.version + 1, sha256_of(content)
    connection.execute(
        insert(_MEMORY).values(
            agent_id=agent_id,
            version=version,
            content=content,
            content_hash=content_hash,
            schema_hash=sha256_of(schema),
            decision_id=decision_id,
            flow_run_id=flow_run_id,
            created_at=_now(),
        )
    )
    return CommitResult(
        True, version=version, content_hash=content_hash, base_version=base_version, rebased=rebased
    )
