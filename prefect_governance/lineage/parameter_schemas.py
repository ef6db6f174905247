"""The parameter schema a worker first saw for each deployment: the reference for redaction.

A deployment's ``parameter_openapi_schema`` is what says a parameter is a ``SecretStr``,
and any API client may edit it (drop ``format: password``) after the deployment was
made; the worker cannot load the flow's code to see the real signature. So the worker
remembers the first schema it sees for each deployment id, in the lineage database
(a table only the worker writes), and redaction uses both: a value is secret when either
schema says so, or when they differ about it (``envelope.redact_by_schemas``).

The I/O is here; the rule is a pure function in ``envelope``.
"""

from __future__ import annotations

import weakref
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, Column
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel

from prefect_governance.core.canonical import sha256_of
from prefect_governance.lineage.migrations import PARAMETER_SCHEMA_TABLE, migrate


def _now() -> datetime:
    return datetime.now(timezone.utc)


class DeploymentParameterSchema(SQLModel, table=True):
    """The first parameter schema the worker saw for a deployment. Never updated."""

    __tablename__ = PARAMETER_SCHEMA_TABLE

    deployment_id: str = Field(primary_key=True)
    parameter_schema: dict[str, Any] = Field(
        default_factory=dict, sa_column=Column(JSON, nullable=False)
    )
    schema_hash: str
    first_seen: datetime = Field(default_factory=_now)


_migrated: weakref.WeakSet[Any] = weakref.WeakSet()


def remembered_schema(engine: Any, deployment_id: str, current: Any) -> Any:
    """The reference schema of a deployment: the one stored first, or (first sight) the
    current one, which is then stored. Two workers at once: the first insert wins."""
    if engine not in _migrated:
        migrate(engine)
        _migrated.add(engine)
    current = current if isinstance(current, dict) else {}
    with Session(engine) as session:
        row = session.get(DeploymentParameterSchema, deployment_id)
        if row is not None:
            return row.parameter_schema
        session.add(
            DeploymentParameterSchema(
                deployment_id=deployment_id,
                parameter_schema=current,
                schema_hash=sha256_of(current),
            )
        )
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            row = session.get(DeploymentParameterSchema, deployment_id)
            return row.parameter_schema if row is not None else current
    return current


def forget_schema(engine: Any, deployment_id: str) -> bool:
    """Drop a deployment's reference (the pool owner accepts its new schema); the next run
    makes its current schema the reference. True when there was one."""
    with Session(engine) as session:
        row = session.get(DeploymentParameterSchema, deployment_id)
        if row is None:
            return False
        session.delete(row)
        session.commit()
        return True
