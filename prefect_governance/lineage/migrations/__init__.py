"""Schema migrations of the lineage database (Alembic), applied when a store opens.

The revisions ship in this package (``versions/``), so an installed worker brings
its database up to date itself: ``LineageStore`` and ``MemoryStore`` call
``migrate`` on open, and ``upgrade(url)`` does the same without opening a store.
No ``alembic.ini`` is needed; ``config()`` builds Alembic's configuration in code.

- The revision is kept in ``governance_alembic_version``, not ``alembic_version``,
  so the lineage can share a PostgreSQL database with Prefect's own server (whose
  migrations use the default table).
- A database made by the release before migrations (tables from SQLModel's
  ``create_all``, no version table) is adopted: stamped at the baseline revision
  0001, whose schema is exactly that release's, then upgraded. Its rows are kept.
- A database a newer release migrated (a revision this one does not know) is
  refused with ``SchemaError``, never written with an older idea of its schema.
- Many processes may open one database at once. The whole upgrade runs in one
  transaction under a lock: a transaction-scoped advisory lock on PostgreSQL (whose
  DDL is transactional), ``BEGIN IMMEDIATE`` (the database's write lock) on SQLite.
  The first opener migrates and commits; the others wait, then find the head.

A new revision (from a checkout)::

    python -c "from alembic import command; \
from prefect_governance.lineage.migrations import config; \
command.revision(config('sqlite:///lineage.db'), 'what changed', autogenerate=True)"
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import Connection, Engine

from prefect_governance.core.errors import GovernanceError

HERE = Path(__file__).resolve().parent
VERSION_TABLE = "governance_alembic_version"
BASELINE = "0001"
EVENT_TABLE = "governance_event"
MEMORY_TABLE = "governance_agent_memory"
PARAMETER_SCHEMA_TABLE = "governance_parameter_schema"
BASELINE_TABLES = frozenset({EVENT_TABLE, MEMORY_TABLE})
_LOCK_KEY = "prefect_governance:migrate"


class SchemaError(GovernanceError, RuntimeError):
    """The database holds a lineage schema that cannot be migrated in place."""


@dataclass(frozen=True)
class Upgrade:
    """What ``migrate`` did: the revisions before and after, and whether it adopted a
    database from before migrations (stamped at the baseline)."""

    before: tuple[str, ...]
    after: tuple[str, ...]
    adopted: bool = False

    @property
    def changed(self) -> bool:
        return self.before != self.after


def config(url: str | None = None, *, extra_versions: Sequence[Path] = ()) -> Config:
    """Alembic's configuration for the lineage schema, built in code.

    ``extra_versions`` adds version directories after the packaged one (a revision
    there may follow the packaged head).
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("path_separator", "os")
    locations = [HERE / "versions", *extra_versions]
    cfg.set_main_option("version_locations", os.pathsep.join(str(p) for p in locations))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@lru_cache(maxsize=8)
def _scripts_at(locations: str) -> tuple[tuple[str, ...], frozenset[str]]:
    """The head revision(s) and all known revisions of some version directories."""
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", locations)
    script = ScriptDirectory.from_config(cfg)
    known = frozenset(s.revision for s in script.walk_revisions())
    return tuple(sorted(script.get_heads())), known


def _scripts(cfg: Config) -> tuple[tuple[str, ...], frozenset[str]]:
    return _scripts_at(cfg.get_main_option("version_locations") or "")


def heads(cfg: Config) -> tuple[str, ...]:
    """The head revision(s) of a configuration's scripts (read once per process)."""
    return _scripts(cfg)[0]


def current(connection: Connection) -> tuple[str, ...]:
    """The revision(s) a database is at; empty when it has no version table."""
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return tuple(sorted(context.get_current_heads()))


def _lock(connection: Connection) -> None:
    """Hold the migration lock until the transaction ends."""
    if connection.dialect.name == "postgresql":
        connection.execute(
            text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": _LOCK_KEY}
        )
    elif connection.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _adopt(connection: Connection, cfg: Config) -> bool:
    """Stamp a database from before migrations at the baseline; False if it has no tables.

    A table that release did not get to create is left to the baseline to create.
    """
    inspector = inspect(connection)
    present = BASELINE_TABLES & set(inspector.get_table_names())
    if not present:
        return False
    if EVENT_TABLE in present:
        columns = {c["name"] for c in inspector.get_columns(EVENT_TABLE)}
        if "chain" not in columns:
            where = connection.engine.url.render_as_string(hide_password=True)
            raise SchemaError(
                f"the lineage database at {where!r} predates hash chaining "
                f"(table {EVENT_TABLE} has no 'chain' column): "
                "migrate it or move it aside to recreate it"
            )
    if present == BASELINE_TABLES:
        _run(command.stamp, cfg, connection, BASELINE)
    return True


def _run(action, cfg: Config, connection: Connection, revision: str) -> None:
    cfg.attributes["connection"] = connection
    try:
        action(cfg, revision)
    finally:
        cfg.attributes.pop("connection", None)


def migrate(engine: Engine, cfg: Config | None = None) -> Upgrade:
    """Bring the database to the head revision; a no-op (one read) when it is there."""
    cfg = cfg or config()
    target, known = _scripts(cfg)
    with engine.connect() as connection:
        before = current(connection)
    if before == target:
        return Upgrade(before, before)
    if not set(before) <= known:
        where = engine.url.render_as_string(hide_password=True)
        raise SchemaError(
            f"the lineage database at {where!r} is at revision {', '.join(before)}, which "
            f"this release of prefect-governance does not know (its head is "
            f"{', '.join(target)}): a newer release migrated it; upgrade this one"
        )
    with engine.connect() as connection, connection.begin():
        _lock(connection)
        before = current(connection)  # another process may have migrated meanwhile
        adopted = not before and _adopt(connection, cfg)
        _run(command.upgrade, cfg, connection, "heads")
        after = current(connection)
    return Upgrade(before, after, adopted)


def upgrade(url: str, cfg: Config | None = None) -> Upgrade:
    """Migrate the lineage database at a URL to the head revision."""
    engine = create_engine(url)
    try:
        return migrate(engine, cfg)
    finally:
        engine.dispose()
