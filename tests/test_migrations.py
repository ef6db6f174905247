"""The lineage schema under Alembic, on SQLite and on a real PostgreSQL.

A fresh database is migrated to the head; one made by the release before
migrations (tables from ``create_all``, no version table) is stamped and kept;
a later revision keeps the rows and the chains; openers racing on one database
migrate it once.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import create_engine, insert, inspect, text
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel, select

from prefect_governance.core.canonical import sha256_of
from prefect_governance.lineage.events import LineageEvent
from prefect_governance.lineage.memory import AgentMemory, MemoryStore
from prefect_governance.lineage.migrations import (
    BASELINE_TABLES,
    VERSION_TABLE,
    SchemaError,
    Upgrade,
    config,
    current,
    heads,
    migrate,
    upgrade,
)
from prefect_governance.lineage.store import LineageStore, event_hash, verify_chain
from tests.pg_support import scratch_database

HEAD = heads(config())
T0 = datetime(2025, 5, 1, 12, 0, tzinfo=timezone.utc)
MODELS = (LineageEvent.__table__, AgentMemory.__table__)
LATER_COLUMNS = {"governance_event": ("signature",)}  # 0004

# A revision after the packaged head, as a later release would ship it. Changing a
# column's type makes SQLite's batch mode copy the whole table (ids included).
REVISION_LATER = """
import sqlalchemy as sa
from alembic import op

revision = "0099"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("governance_event") as batch:
        batch.add_column(sa.Column("note", sa.String(), nullable=True))
        batch.alter_column("verdict", existing_type=sa.String(), type_=sa.String(64))


def downgrade():
    with op.batch_alter_table("governance_event") as batch:
        batch.alter_column("verdict", existing_type=sa.String(64), type_=sa.String())
        batch.drop_column("note")
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def new_url(request, tmp_path) -> Iterator:
    """Makes URLs of new, empty databases of one kind."""
    if request.param == "sqlite":
        counter = iter(range(100))
        yield lambda: f"sqlite:///{tmp_path / f'lineage-{next(counter)}.db'}"
        return
    server = request.getfixturevalue("postgres").url
    with contextlib.ExitStack() as stack:
        yield lambda: stack.enter_context(scratch_database(server, "migrations"))


@pytest.fixture
def url(new_url) -> str:
    return new_url()


def _engine(url: str) -> Engine:
    return create_engine(url)


def _schema(engine: Engine) -> dict:
    """Every table's columns, keys, constraints and indexes, as the database reports them."""
    inspector = inspect(engine)
    schema = {}
    for table in sorted(BASELINE_TABLES):
        schema[table] = {
            "columns": [
                (c["name"], str(c["type"]), c["nullable"], c.get("default"))
                for c in inspector.get_columns(table)
            ],
            "primary key": inspector.get_pk_constraint(table)["constrained_columns"],
            "unique": sorted(
                (u["name"], tuple(u["column_names"]))
                for u in inspector.get_unique_constraints(table)
            ),
            "indexes": sorted(
                (i["name"], tuple(i["column_names"]), bool(i["unique"]))
                for i in inspector.get_indexes(table)
            ),
        }
    return schema


def _version_rows(engine: Engine) -> list[tuple]:
    with engine.connect() as connection:
        return [tuple(r) for r in connection.exec_driver_sql(f"SELECT * FROM {VERSION_TABLE}")]


def _legacy(engine: Engine, tables=MODELS) -> None:
    """What the release before migrations left: tables by create_all, no version table
    (without the columns later revisions added)."""
    SQLModel.metadata.create_all(engine, tables=list(tables))
    with engine.begin() as connection:
        for table, columns in LATER_COLUMNS.items():
            if inspect(connection).has_table(table):
                for column in columns:
                    connection.execute(text(f'ALTER TABLE "{table}" DROP COLUMN "{column}"'))


def _chained_rows(engine: Engine, agent: str, count: int) -> list[str]:
    """Write a valid chain the way that release did; return the rows' hashes."""
    hashes: list[str] = []
    table = LineageEvent.__table__
    columns = {c["name"] for c in inspect(engine).get_columns(table.name)}
    with Session(engine) as session:
        for seq in range(1, count + 1):
            event = LineageEvent(
                kind="decision",
                agent_id=agent,
                flow_run_id=f"fr-{seq}",
                verdict="refused" if seq % 2 == 0 else "allowed",
                allow=seq % 2 == 1,
                reasons=[f"reason {seq}"],
                payload={"n": seq},
                created_at=T0 + timedelta(seconds=seq),
                chain=agent,
                seq=seq,
                prev_hash=hashes[-1] if hashes else None,
            )
            event.hash = event_hash(event)
            hashes.append(event.hash)
            row = event.model_dump(exclude={"id"})
            session.execute(insert(table).values({k: row[k] for k in row if k in columns}))
        session.commit()
    return hashes


def _memory_row(engine: Engine, agent: str) -> None:
    with Session(engine) as session:
        content = {"total_rows": 7}
        session.add(
            AgentMemory(
                agent_id=agent,
                version=1,
                content=content,
                content_hash=sha256_of(content),
                schema_hash=sha256_of({"type": "object"}),
            )
        )
        session.commit()


def _chain(engine: Engine, agent: str) -> list[LineageEvent]:
    with Session(engine) as session:
        query = select(LineageEvent).where(LineageEvent.chain == agent)
        return list(session.exec(query.order_by(LineageEvent.seq)).all())


# --- fresh and legacy databases ------------------------------------------------


def test_a_fresh_database_is_migrated_to_the_head(url):
    assert upgrade(url) == Upgrade(before=(), after=HEAD, adopted=False)
    engine = _engine(url)
    try:
        assert _version_rows(engine) == [HEAD]
        assert set(inspect(engine).get_table_names()) >= BASELINE_TABLES
        assert upgrade(url) == Upgrade(before=HEAD, after=HEAD), "a second upgrade is a no-op"
        store = LineageStore(url)
        try:
            store.append(LineageEvent(kind="decision", agent_id="a", flow_run_id="fr"))
            assert store.verify() == [] and [e.seq for e in store.chain("a")] == [1]
        finally:
            store.dispose()
    finally:
        engine.dispose()


def test_the_migrated_schema_is_exactly_the_one_the_models_make(new_url):
    migrated, made = _engine(new_url()), _engine(new_url())
    try:
        migrate(migrated)
        SQLModel.metadata.create_all(made, tables=list(MODELS))
        assert _schema(migrated) == _schema(made)
    finally:
        migrated.dispose()
        made.dispose()


def test_a_database_from_before_migrations_is_stamped_and_keeps_its_rows(url):
    engine = _engine(url)
    try:
        _legacy(engine)
        hashes = _chained_rows(engine, "etl", 5)
        _memory_row(engine, "etl")
        assert not inspect(engine).has_table(VERSION_TABLE)

        store = LineageStore(url)  # what a worker of this release does on open
        try:
            assert _version_rows(engine) == [HEAD]
            assert [e.hash for e in store.chain("etl")] == hashes
            assert store.verify() == []
            # That release signed nothing: its records are kept and chained, but no key
            # vouches for them, so they count as absent.
            assert store.unvouched("etl") == [(1, 5)]
            assert store.decision_counts("etl") == (0, 0)
            store.append(LineageEvent(kind="outcome", agent_id="etl", flow_run_id="fr-5"))
            assert [(e.seq, e.kind) for e in store.chain("etl")][4:] == [
                (5, "decision"),
                (6, "unvouched"),
                (7, "outcome"),
            ]
            assert store.verify() == []
            assert store.unvouched("etl") == [(1, 5)]
            memory = MemoryStore(store.engine).latest("etl")
            assert (memory.version, memory.content) == (1, {"total_rows": 7})
        finally:
            store.dispose()
    finally:
        engine.dispose()


def test_adopting_reports_the_stamp(url):
    engine = _engine(url)
    try:
        _legacy(engine)
        assert migrate(engine) == Upgrade(before=(), after=HEAD, adopted=True)
    finally:
        engine.dispose()


def test_a_table_the_old_release_never_created_is_added(url):
    """That release made the memory table only when memory was first used."""
    engine = _engine(url)
    try:
        _legacy(engine, tables=[LineageEvent.__table__])
        hashes = _chained_rows(engine, "etl", 3)
        assert migrate(engine) == Upgrade(before=(), after=HEAD, adopted=True)
        assert inspect(engine).has_table(AgentMemory.__tablename__)
        assert [e.hash for e in _chain(engine, "etl")] == hashes
        assert MemoryStore(engine).latest("etl").version == 0
    finally:
        engine.dispose()


def test_a_database_from_before_chaining_is_refused_and_left_alone(url):
    engine = _engine(url)
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql(
                "CREATE TABLE governance_event (id INTEGER PRIMARY KEY, event_id VARCHAR, "
                "kind VARCHAR, seq INTEGER, prev_hash VARCHAR, hash VARCHAR)"
            )
        with pytest.raises(SchemaError, match="predates hash chaining"):
            LineageStore(url)
        tables = set(inspect(engine).get_table_names())
        assert tables == {"governance_event"}, "the refused upgrade left something behind"
    finally:
        engine.dispose()


# --- a later revision ------------------------------------------------------------


@pytest.fixture
def later(tmp_path):
    """The packaged revisions plus a later 0099 in a scratch versions directory."""
    versions = tmp_path / "later-versions"
    versions.mkdir()
    (versions / "0099_note.py").write_text(REVISION_LATER.replace("{head}", HEAD[0]))
    return config(extra_versions=[versions])


def test_a_later_revision_keeps_rows_and_chains(url, later):
    store = LineageStore(url)
    try:
        for n in range(4):
            store.append(
                LineageEvent(kind="decision", agent_id="etl", flow_run_id=f"fr-{n}"),
                LineageEvent(kind="decision", agent_id="ops", flow_run_id=f"fr-{n}"),
            )
        MemoryStore(store.engine).commit(
            "etl",
            [{"rows": 1}],
            base_version=0,
            schema={"type": "object"},
            decision_id=None,
            flow_run_id=None,
        )
        before = {agent: store.chain(agent) for agent in ("etl", "ops")}
    finally:
        store.dispose()

    engine = _engine(url)
    try:
        assert migrate(engine, later) == Upgrade(before=HEAD, after=("0099",))
        assert _version_rows(engine) == [("0099",)]
        columns = {c["name"]: c for c in inspect(engine).get_columns("governance_event")}
        assert "note" in columns and getattr(columns["verdict"]["type"], "length", None) == 64
        for agent, events in before.items():
            after = _chain(engine, agent)
            assert [(e.id, e.seq, e.hash) for e in after] == [(e.id, e.seq, e.hash) for e in events]
            assert verify_chain(after) is None
        with engine.connect() as connection:
            notes = connection.exec_driver_sql("SELECT note FROM governance_event").all()
        assert [n for (n,) in notes] == [None] * 8
        with Session(engine) as session:  # not MemoryStore: this release stops at 0001
            memory = session.exec(select(AgentMemory)).all()
        assert [(m.version, m.content) for m in memory] == [(1, {"rows": 1})]
    finally:
        engine.dispose()


def test_an_older_release_refuses_a_database_a_newer_one_migrated(url, later):
    upgrade(url, later)
    with pytest.raises(SchemaError, match=r"revision 0099, which this release .* does not know"):
        LineageStore(url)


# --- openers racing -----------------------------------------------------------


@pytest.mark.parametrize("start", ["fresh", "legacy"])
def test_openers_racing_on_one_database_migrate_it_once(url, start):
    if start == "legacy":
        engine = _engine(url)
        _legacy(engine)
        hashes = _chained_rows(engine, "etl", 3)
        engine.dispose()
    openers = 6
    barrier = threading.Barrier(openers, timeout=60)
    results: list[Upgrade] = []
    errors: list[BaseException] = []

    def open_it() -> None:
        engine = _engine(url)
        try:
            barrier.wait()
            results.append(migrate(engine))
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=open_it) for _ in range(openers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert len(results) == openers
    assert [r.changed for r in results].count(True) == 1, results
    assert [r.adopted for r in results].count(True) == (start == "legacy")
    engine = _engine(url)
    try:
        assert _version_rows(engine) == [HEAD]
        with engine.connect() as connection:
            assert current(connection) == HEAD
        if start == "legacy":
            assert [e.hash for e in _chain(engine, "etl")] == hashes
    finally:
        engine.dispose()
