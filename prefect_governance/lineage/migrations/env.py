"""Alembic's environment for the lineage schema.

Runs on the connection ``migrate`` hands over (already locked, inside its
transaction), or, from the ``alembic`` command line, on ``sqlalchemy.url``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import MetaData, create_engine
from sqlalchemy.engine import Connection

from prefect_governance.lineage.migrations import VERSION_TABLE


def _target_metadata() -> MetaData:
    """The tables the models declare (for ``alembic revision --autogenerate``)."""
    from prefect_governance.lineage.events import LineageEvent
    from prefect_governance.lineage.memory import AgentMemory
    from prefect_governance.lineage.parameter_schemas import DeploymentParameterSchema

    metadata = MetaData()
    # SQLModel sets __table__ on a table model; its types do not declare it.
    tables = (
        LineageEvent.__table__,  # type: ignore[attr-defined]
        AgentMemory.__table__,  # type: ignore[attr-defined]
        DeploymentParameterSchema.__table__,  # type: ignore[attr-defined]
    )
    for table in tables:
        table.to_metadata(metadata)
    return metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=_target_metadata(),
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(context.config.get_main_option("sqlalchemy.url") or "")
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("the lineage schema migrates online only")
main()
