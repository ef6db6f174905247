"""The lineage as a per-agent hash chain: links, verification, tampering, concurrency."""

from __future__ import annotations

import itertools
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from prefect_governance.lineage import store as lineage
from prefect_governance.lineage.events import LineageEvent, outcome_event
from prefect_governance.lineage.store import ChainProblem, LineageStore, event_hash, verify_chain


def _event(agent: str | None, n: int = 0, **fields) -> LineageEvent:
    values = {"verdict": "allowed", "allow": True, "reasons": [f"reason {n}"], **fields}
    return LineageEvent(kind="decision", agent_id=agent, flow_run_id=f"fr-{n}", **values)


def _copy(event: LineageEvent, **changes) -> LineageEvent:
    return LineageEvent(**{**event.model_dump(), **changes})


@pytest.fixture
def url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'lineage.db'}"


@pytest.fixture
def store(url) -> Iterator[LineageStore]:
    store = LineageStore(url)
    yield store
    store.dispose()


def _four(store: LineageStore, agent: str = "etl-agent") -> list[LineageEvent]:
    """Four records in one chain, the middle two in one call."""
    store.append(_event(agent, 1))
    store.append(_event(agent, 2), _event(agent, 3))
    store.append(_event(agent, 4))
    return store.chain(agent)


def _sql(store: LineageStore, statement: str, **params) -> None:
    with store.engine.begin() as connection:
        connection.execute(text(statement), params)


def _only(problems: list[ChainProblem]) -> ChainProblem:
    assert len(problems) == 1, problems
    return problems[0]


# --- chaining ----------------------------------------------------------------


def test_append_links_each_agent_into_its_own_chain(store):
    store.append(_event("a", 1), _event("b", 1), _event("a", 2))
    store.append(
        _event(None, 1),
        outcome_event(agent_id="a", flow_run_id="fr", decision_id=None, state="COMPLETED"),
    )
    store.append(_event("b", 2))

    assert store.chains() == ["-", "a", "b"]
    for name, length in (("a", 3), ("b", 2), ("-", 1)):
        events = store.chain(name)
        assert [e.seq for e in events] == list(range(1, length + 1))
        assert [e.chain for e in events] == [name] * length
        assert events[0].prev_hash is None
        for prev, event in itertools.pairwise(events):
            assert event.prev_hash == prev.hash
        for event in events:
            assert event.hash == event_hash(event)
            assert event.hash.startswith("sha256:") and len(event.hash) == 7 + 64
    assert store.chain("-")[0].agent_id is None
    # the two events of one call for agent a are consecutive in its chain
    assert [e.flow_run_id for e in store.chain("a")] == ["fr-1", "fr-2", "fr"]


def test_append_fills_in_the_callers_events(store):
    first, second = _event("a", 1), _event("a", 2)
    store.append(first, second)
    assert (first.chain, first.seq, first.prev_hash) == ("a", 1, None)
    assert (second.seq, second.prev_hash) == (2, first.hash)
    assert second.hash == event_hash(second)


def test_the_hash_covers_content_and_position(store):
    event = _event("a", 1)
    store.append(event)
    base = event_hash(event)
    for field, value in (
        ("verdict", "refused"),
        ("reasons", ["other"]),
        ("payload", {"x": 1}),
        ("seq", 2),
        ("prev_hash", "sha256:" + "0" * 64),
        ("chain", "b"),
        ("created_at", event.created_at + timedelta(microseconds=1)),
    ):
        assert event_hash(_copy(event, **{field: value})) != base, field
    # id and hash are not part of the hashed content
    assert event_hash(_copy(event, id=999, hash="x")) == base


# --- verification ------------------------------------------------------------


def test_an_untouched_database_verifies_also_after_reopening(url, store):
    _four(store)
    store.append(_event(None, 1), _event("other", 1))
    assert store.verify() == []
    store.dispose()
    reopened = LineageStore(url)
    assert reopened.verify() == []
    assert [e.seq for e in reopened.chain("etl-agent")] == [1, 2, 3, 4]
    reopened.dispose()


def test_an_altered_record_is_caught(store):
    events = _four(store)
    _four(store, "bystander")
    _sql(
        store,
        "UPDATE governance_event SET verdict = 'refused' WHERE chain = 'etl-agent' AND seq = 2",
    )
    problem = _only(store.verify())
    assert (problem.chain, problem.seq, problem.kind) == ("etl-agent", 2, "altered")
    assert problem.event_id == events[1].event_id
    assert problem.message == (
        f"chain etl-agent: record 2 (event {events[1].event_id}) was altered: "
        "its hash does not match its content"
    )


def test_an_altered_json_column_is_caught(store):
    events = _four(store)
    _sql(
        store,
        "UPDATE governance_event SET reasons = :r WHERE chain = 'etl-agent' AND seq = 3",
        r='["nothing to see"]',
    )
    problem = _only(store.verify())
    assert (problem.seq, problem.kind, problem.event_id) == (3, "altered", events[2].event_id)


def test_a_deleted_record_is_caught(store):
    events = _four(store)
    _sql(store, "DELETE FROM governance_event WHERE chain = 'etl-agent' AND seq = 2")
    problem = _only(store.verify())
    assert (problem.chain, problem.seq, problem.kind) == ("etl-agent", 3, "deleted")
    assert problem.event_id == events[2].event_id
    assert f"record 3 (event {events[2].event_id})" in problem.message
    assert "record 2 was deleted" in problem.message


def test_a_deleted_first_record_is_caught(store):
    events = _four(store)
    _sql(store, "DELETE FROM governance_event WHERE chain = 'etl-agent' AND seq = 1")
    problem = _only(store.verify())
    assert (problem.seq, problem.kind, problem.event_id) == (2, "deleted", events[1].event_id)
    assert "record 1 was deleted" in problem.message


def test_swapped_records_are_caught_as_reordered(store):
    events = _four(store)
    _sql(store, "UPDATE governance_event SET seq = -1 WHERE chain = 'etl-agent' AND seq = 2")
    _sql(store, "UPDATE governance_event SET seq = 2 WHERE chain = 'etl-agent' AND seq = 3")
    _sql(store, "UPDATE governance_event SET seq = 3 WHERE chain = 'etl-agent' AND seq = -1")
    problem = _only(store.verify())
    assert (problem.chain, problem.seq, problem.kind) == ("etl-agent", 2, "reordered")
    # the record now at position 2 is the one written third
    assert problem.event_id == events[2].event_id
    assert f"record 2 (event {events[2].event_id})" in problem.message


def test_ids_out_of_seq_order_are_caught_as_reordered(store):
    events = _four(store)
    first, second = events[1].id, events[2].id
    _sql(store, "UPDATE governance_event SET id = -1 WHERE id = :i", i=first)
    _sql(store, "UPDATE governance_event SET id = :a WHERE id = :b", a=first, b=second)
    _sql(store, "UPDATE governance_event SET id = :b WHERE id = -1", b=second)
    problem = _only(store.verify())
    assert (problem.seq, problem.kind, problem.event_id) == (3, "reordered", events[2].event_id)


def test_a_replaced_predecessor_is_caught(store):
    """Record 2 rewritten with a fresh, self-consistent hash still breaks record 3's link."""
    _four(store)
    [forged] = [e for e in store.chain("etl-agent") if e.seq == 2]
    forged.verdict = "refused"
    _sql(
        store,
        "UPDATE governance_event SET verdict = 'refused', hash = :h "
        "WHERE chain = 'etl-agent' AND seq = 2",
        h=event_hash(forged),
    )
    problem = _only(store.verify())
    assert (problem.seq, problem.kind) == (3, "deleted")


def test_only_the_first_problem_of_each_chain_is_reported(store):
    _four(store, "a")
    _four(store, "b")
    _four(store, "c")
    _sql(store, "UPDATE governance_event SET verdict = 'x' WHERE chain = 'a' AND seq IN (2, 4)")
    _sql(store, "DELETE FROM governance_event WHERE chain = 'b' AND seq IN (1, 3)")
    problems = store.verify()
    assert [(p.chain, p.seq, p.kind) for p in problems] == [
        ("a", 2, "altered"),
        ("b", 2, "deleted"),
    ]


def test_deleting_the_newest_records_is_caught_by_the_head(store):
    events = _four(store)
    _sql(store, "DELETE FROM governance_event WHERE chain = 'etl-agent' AND seq >= 3")
    problem = _only(store.verify())
    assert (problem.chain, problem.seq, problem.kind) == ("etl-agent", 3, "deleted")
    assert problem.event_id == events[1].event_id
    assert "ends at record 2, but its head is record 4: record 3..4 was deleted" in problem.message


def test_a_rewritten_newest_record_is_caught_by_the_head(store):
    """The newest record rewritten with a fresh, self-consistent hash: only the head knows."""
    _four(store)
    [forged] = [e for e in store.chain("etl-agent") if e.seq == 4]
    forged.verdict = "refused"
    _sql(
        store,
        "UPDATE governance_event SET verdict = 'refused', hash = :h "
        "WHERE chain = 'etl-agent' AND seq = 4",
        h=event_hash(forged),
    )
    problem = _only(store.verify())
    assert (problem.seq, problem.kind) == (4, "altered")
    assert "is not the head the chain recorded" in problem.message


def test_a_deleted_head_is_caught_and_appending_rebuilds_it(store):
    _four(store)
    _sql(store, "DELETE FROM governance_chain_head WHERE chain = 'etl-agent'")
    problem = _only(store.verify())
    assert (problem.seq, problem.kind) == (4, "deleted") and "no head record" in problem.message
    store.append(_event("etl-agent", 5))  # the head is rebuilt from the records
    assert [e.seq for e in store.chain("etl-agent")] == [1, 2, 3, 4, 5]
    assert store.verify() == []
    assert store.decision_counts("etl-agent") == (5, 0)


def test_decision_counts_come_from_the_head(store):
    store.append(_event("a", 1), _event("a", 2, verdict="refused"), _event("b", 1))
    store.append(outcome_event(agent_id="a", flow_run_id="fr", decision_id=None, state="FAILED"))
    store.append(_event("a", 3, verdict="refused"))
    assert store.decision_counts("a") == (3, 2)
    assert store.decision_counts("b") == (1, 0)
    assert store.decision_counts("nobody") == (0, 0)
    assert store.lengths() == {"a": 4, "b": 1}


def test_json_is_stored_canonically_so_verify_need_not_decode_it(store, monkeypatch):
    event = _event("a", 1, payload={"z": [1, {"b": "é", "a": None}], "a": 1.5})
    store.append(event)
    with store.engine.connect() as connection:
        stored = connection.exec_driver_sql("SELECT payload, reasons FROM governance_event").one()
    assert stored == ('{"a":1.5,"z":[1,{"a":null,"b":"é"}]}', '["reason 1"]')

    def no_decoding(*args, **kwargs):
        raise AssertionError("verify decoded a canonical JSON column")

    monkeypatch.setattr(lineage.json, "loads", no_decoding)
    assert store.verify() == []


def test_json_stored_by_an_older_release_still_verifies(store):
    """Text with spaces (as json.dumps writes by default) is decoded and hashed."""
    store.append(_event("a", 1, payload={"k": [1, 2]}))
    _sql(store, "UPDATE governance_event SET payload = :p", p='{"k": [1, 2]}')
    assert store.verify() == []
    _sql(store, "UPDATE governance_event SET payload = :p", p='{"k": [1, 3]}')
    assert _only(store.verify()).kind == "altered"


def test_verify_chain_is_pure():
    assert verify_chain([]) is None
    first = _event("a", 1, chain="a", seq=1, id=1)
    first.hash = event_hash(first)
    second = _event("a", 2, chain="a", seq=2, id=2, prev_hash=first.hash)
    second.hash = event_hash(second)
    assert verify_chain([first, second]) is None
    assert verify_chain([second, first]).kind == "reordered"
    assert verify_chain([second]).kind == "deleted"


# --- storage -----------------------------------------------------------------


def _assert_round_trip(store: LineageStore, url: str, agent: str) -> None:
    written = _event(
        agent,
        1,
        created_at=datetime(
            2025, 3, 30, 1, 30, 0, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30))
        ),
        latency_ms=1.0 / 3.0,
        payload={
            "envelope": {"ünïcode": "✓", "n": [1, 2.5, None, True], "pair": ("a", 1)},
            "by_count": {10: "ten", 9: "nine"},
            "error": None,
        },
    )
    store.append(written, _event(agent, 2))
    computed = written.hash
    again = LineageStore(url)
    try:
        [read] = [e for e in again.chain(agent) if e.seq == 1]
        assert read.hash == computed
        assert event_hash(read) == computed
        assert read.created_at == written.created_at
        assert read.created_at.utcoffset() == timedelta(0)
        assert verify_chain(again.chain(agent)) is None
    finally:
        again.dispose()


def test_hash_round_trips_through_sqlite(url, store):
    _assert_round_trip(store, url, "rt-agent")


def _stale_head_once(monkeypatch) -> list[list[str]]:
    """The next append reads an empty head once (as if another appender won the race)."""
    real_heads = lineage._heads
    calls: list[list[str]] = []

    def stale_once(connection, chains, *, lock=False):
        calls.append(chains)
        if len(calls) == 1:
            return {chain: lineage._Head() for chain in chains}
        return real_heads(connection, chains, lock=lock)

    monkeypatch.setattr(lineage, "_heads", stale_once)
    return calls


def test_a_lost_race_is_retried_from_the_new_head(store, monkeypatch):
    store.append(_event("a", 1))
    calls = _stale_head_once(monkeypatch)
    store.append(_event("a", 2))
    assert len(calls) == 2
    assert [e.seq for e in store.chain("a")] == [1, 2]
    assert store.verify() == []


def test_other_integrity_errors_are_not_retried(store):
    first = _event("a", 1)
    store.append(first)
    with pytest.raises(IntegrityError):
        store.append(_event("a", 2, event_id=first.event_id))
    assert [e.seq for e in store.chain("a")] == [1]


def test_a_database_from_before_chaining_is_refused(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE governance_event (id INTEGER PRIMARY KEY, event_id VARCHAR, "
            "kind VARCHAR, seq INTEGER, prev_hash VARCHAR, hash VARCHAR)"
        )
    with pytest.raises(RuntimeError, match="predates hash chaining"):
        LineageStore(f"sqlite:///{path}")


# --- concurrency -------------------------------------------------------------


def _hammer(url: str, agent: str, threads: int, appends: int) -> None:
    """Each thread opens its own store on the same URL; all start appending together."""
    barrier = threading.Barrier(threads, timeout=60)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            store = LineageStore(url)
            try:
                barrier.wait()
                for n in range(appends):
                    store.append(_event(agent, worker * 1000 + n))
            finally:
                store.dispose()
        except BaseException as exc:  # reported below
            barrier.abort()
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in pool)
    assert errors == []


def test_concurrent_appenders_never_fork_a_sqlite_chain(url, store):
    _hammer(url, "busy", threads=4, appends=50)
    events = store.chain("busy")
    assert [e.seq for e in events] == list(range(1, 201))
    assert len({e.flow_run_id for e in events}) == 200
    assert store.verify() == []


# --- PostgreSQL --------------------------------------------------------------


def _pg_url(postgres, timezone_name: str | None = None) -> str:
    if timezone_name is None:
        return postgres.url
    return f"{postgres.url}?options={quote(f'-c timezone={timezone_name}')}"


def test_concurrent_appenders_never_fork_a_postgresql_chain(postgres):
    agent = f"busy-{uuid.uuid4().hex[:8]}"
    _hammer(postgres.url, agent, threads=4, appends=25)
    store = LineageStore(postgres.url)
    try:
        events = store.chain(agent)
        assert [e.seq for e in events] == list(range(1, 101))
        assert verify_chain(events) is None
        assert store.verify() == []
    finally:
        store.dispose()


def test_hash_round_trips_through_postgresql(postgres):
    """Even with a session time zone far from UTC."""
    url = _pg_url(postgres, "Asia/Kolkata")
    store = LineageStore(url)
    try:
        with store.engine.connect() as connection:
            assert connection.execute(text("SHOW timezone")).scalar() == "Asia/Kolkata"
        _assert_round_trip(store, url, f"rt-{uuid.uuid4().hex[:8]}")
    finally:
        store.dispose()


def test_a_lost_race_is_retried_on_postgresql(postgres, monkeypatch):
    agent = f"race-{uuid.uuid4().hex[:8]}"
    store = LineageStore(postgres.url)
    try:
        store.append(_event(agent, 1))
        calls = _stale_head_once(monkeypatch)
        store.append(_event(agent, 2))
        assert len(calls) == 2
        events = store.chain(agent)
        assert [e.seq for e in events] == [1, 2]
        assert verify_chain(events) is None
    finally:
        store.dispose()
