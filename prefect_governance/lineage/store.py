"""The lineage: an append-only table of governance events, stored with SQLModel.

SQLite under PREFECT_HOME by default; any SQLAlchemy URL (PostgreSQL in
production). Events form one tamper-evident hash chain per agent (``chain`` is the
agent id, ``"-"`` for events without one): ``seq`` numbers the chain from 1,
``prev_hash`` is the previous record's ``hash`` and ``hash`` covers every column but
``id`` and ``hash``. ``verify_chain`` finds the first altered, deleted or reordered
record of a chain. Every chain has a head row (``ChainHead``): its newest record and
its decision counts, kept in the same transaction as the records, so appending and
counting take constant time however long the history, and deleting the newest
records of a chain is detected against it. Records are signed by the worker and count
only when a pinned key vouches for them (``lineage_auth``): ``verify`` checks the
chains, ``unvouched`` names the records nobody pinned vouches for, and every read the
governance relies on (trust, counts, refusals, decisions) skips them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from sqlalchemy import Boolean, bindparam, event, insert, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlmodel import Field, Session, SQLModel, col, create_engine, func, select, text

from prefect_governance.core.canonical import canonical_json, sha256_of
from prefect_governance.core.models import RUNNABLE
from prefect_governance.core.signing import SigningKey
from prefect_governance.lineage.auth import (
    UNVOUCHED,
    Vouch,
    record_signature,
    unvouched_ranges,
    vouch_of,
)
from prefect_governance.lineage.events import (
    CHAIN_SEQ_CONSTRAINT,
    LineageEvent,
    unvouched_event,
)
from prefect_governance.lineage.memory import MemoryStore
from prefect_governance.lineage.migrations import MEMORY_TABLE, migrate

ProblemKind = Literal["altered", "deleted", "reordered"]

NO_AGENT_CHAIN = "-"
APPEND_ATTEMPTS = 20
VERIFY_PAGE = 2000
_NOT_HASHED = frozenset({"id", "hash", "signature"})
_GOOD_CACHE = 200_000  # verified signatures a store remembers
_JSON_COLUMNS = ("reasons", "warnings", "payload")


def as_utc(value: datetime) -> datetime:
    """An aware UTC datetime; a naive one is taken to be UTC already."""
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def utc_iso(value: datetime) -> str:
    """The fixed ISO 8601 form hashed for datetimes: UTC, with microseconds."""
    return as_utc(value).isoformat(timespec="microseconds")


class ChainHead(SQLModel, table=True):
    """The newest record of a chain and the chain's decision counts, kept by append."""

    __tablename__ = "governance_chain_head"

    chain: str = Field(primary_key=True)
    seq: int
    hash: str
    decisions: int = 0
    refusals: int = 0


_EVENTS = LineageEvent.__table__  # type: ignore[attr-defined]  # set by SQLModel, undeclared
_HEADS = ChainHead.__table__  # type: ignore[attr-defined]
_HASHED = tuple(c.name for c in _EVENTS.columns if c.name not in _NOT_HASHED)
_INSERTED = tuple(c.name for c in _EVENTS.columns if c.name != "id")
# What verify reads of a record: every column but the signature (checked apart, once).
_NAMES = tuple(c.name for c in _EVENTS.columns if c.name != "signature")
_BOOLEANS = tuple(c.name for c in _EVENTS.columns if isinstance(c.type, Boolean))
# One chain's records as stored: JSON columns as their text, and every value as the driver
# gives it (a text query: no per-value processing by SQLAlchemy). See stored_hash.
_STORED_CHAIN = text(
    "SELECT "
    + ", ".join(f'CAST("{n}" AS TEXT) AS "{n}"' if n in _JSON_COLUMNS else f'"{n}"' for n in _NAMES)
    + f' FROM "{_EVENTS.name}" WHERE "chain" = :chain ORDER BY "seq"'
)


def chain_of(agent_id: str | None) -> str:
    """The chain an agent's events belong to."""
    return NO_AGENT_CHAIN if agent_id is None else agent_id


def _plain(value: Any) -> Any:
    return utc_iso(value) if isinstance(value, datetime) else value


def _record(event: Any) -> dict[str, Any]:
    """Every column but id and hash, as plain JSON values."""
    return {name: _plain(getattr(event, name)) for name in _HASHED}


def canonical(event: LineageEvent) -> bytes:
    """The bytes hashed for an event."""
    return canonical_json(_record(event))


def event_hash(event: Any) -> str:
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


def _problem(row: Any, kind: ProblemKind, what: str) -> ChainProblem:
    message = f"chain {row.chain}: record {row.seq} (event {row.event_id}) {what}"
    return ChainProblem(row.chain, row.seq, row.event_id, kind, message)


_ALTERED = "was altered: its hash does not match its content"


# The seqs and hashes of a whole chain (asked for only once a link is broken).
ChainIndex = Callable[[], tuple[set[int | None], set[str | None]]]


def _check_link(
    row: Any, prev: Any, expected: int, index: ChainIndex, hash_of: Callable[[Any], str]
) -> ChainProblem | None:
    """Is the row where it should be: right seq, after its predecessor, linked to it?"""
    out_of_order = row.seq is None or row.seq < expected
    if out_of_order or (row.seq > expected and expected in index()[0]):
        return _problem(row, "reordered", f"is out of order: expected record {expected} here")
    if row.seq > expected:
        missing = str(expected) if row.seq == expected + 1 else f"{expected}..{row.seq - 1}"
        return _problem(row, "deleted", f"follows a gap: record {missing} was deleted")
    if prev is not None and (row.id or 0) <= (prev.id or 0):
        return _problem(row, "reordered", f"was written before record {prev.seq}: reordered")
    if row.prev_hash == (prev.hash if prev else None):
        return None
    if row.prev_hash in index()[1]:
        return _problem(row, "reordered", "links to another record of the chain: reordered")
    if hash_of(row) != row.hash:
        return _problem(row, "altered", _ALTERED)
    return _problem(row, "deleted", "does not link to the record before it: one was deleted")


def verify_chain(
    events: Iterable[Any],
    *,
    index: ChainIndex | None = None,
    hash_of: Callable[[Any], str] = event_hash,
) -> ChainProblem | None:
    """The first problem of one chain's rows (in database order of seq), or None.

    Rows are events or result rows with the same columns. ``index`` gives the seqs and
    hashes of the whole chain, which tell a reordered record from a deleted one; without
    it, ``events`` must be a sequence, and they are taken from it. ``hash_of``
    recomputes a row's hash.
    """
    if index is None:
        events = list(events)
        index = functools.cache(lambda: ({e.seq for e in events}, {e.hash for e in events}))
    prev: Any = None
    for expected, row in enumerate(events, start=1):
        problem = _check_link(row, prev, expected, index, hash_of)
        if problem is None and hash_of(row) != row.hash:
            problem = _problem(row, "altered", _ALTERED)
        if problem is not None:
            return problem
        prev = row
    return None


# Stand-ins for the JSON columns' text while the other columns are encoded (no stored
# string holds a NUL; a record whose strings do is hashed the slow way).
_MARKS = {name: f"\x00json:{name}\x00" for name in _JSON_COLUMNS}
_QUOTED_MARKS = {name: json.dumps(mark) for name, mark in _MARKS.items()}


def stored_hash(row: Any) -> str:
    """The hash of a record as stored (a row of ``_STORED_CHAIN``).

    The store writes JSON in canonical form, so the hashed bytes are the other columns'
    canonical JSON with that text spliced in: no decoding and re-encoding. Text stored
    otherwise (an older release wrote it with spaces) is decoded and hashed as usual.
    """
    record = dict(zip(_NAMES, row, strict=True))
    del record["id"], record["hash"]
    created_at = record["created_at"]  # SQLite gives the stored text, and 0/1 for booleans
    if isinstance(created_at, str):
        created_at = datetime.fromisoformat(created_at)
    record["created_at"] = utc_iso(created_at)
    for name in _BOOLEANS:
        if record[name] is not None:
            record[name] = bool(record[name])
    texts = {name: record[name] for name in _JSON_COLUMNS}
    if not any("\x00" in v for v in record.values() if isinstance(v, str)):
        record.update(_MARKS)
        spliced = canonical_json(record).decode()
        for name, stored in texts.items():
            spliced = spliced.replace(_QUOTED_MARKS[name], stored, 1)
        digest = "sha256:" + hashlib.sha256(spliced.encode()).hexdigest()
        if digest == row.hash:
            return digest
    return sha256_of({**record, **{name: json.loads(t) for name, t in texts.items()}})


def _json_text(value: Any) -> str:
    return canonical_json(value).decode()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA synchronous=FULL")
    # The indexes of a long history (random uuids among them) stay in memory: 64 MiB at most.
    cursor.execute("PRAGMA cache_size=-65536")
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


def _retryable(exc: DBAPIError) -> bool:
    """A lost race for a chain position, a new chain's head or its memory version, a lock
    that timed out (SQLite), or a connection the database dropped (it is replaced on the
    retry)."""
    message = str(exc.orig).lower()
    if isinstance(exc, IntegrityError):
        return any(
            name in message
            for name in (CHAIN_SEQ_CONSTRAINT, "governance_event.chain", _HEADS.name, MEMORY_TABLE)
        )
    return exc.connection_invalidated or "locked" in message


# Computes more events inside an append's transaction, under its chains' locks, from what
# that transaction reads (the newest trust score, the memory it commits): see append.
Derive = Callable[[Connection], Sequence["LineageEvent"]]


def _agent_of_chain(chain: str) -> str | None:
    return None if chain == NO_AGENT_CHAIN else chain


@dataclass
class _Head:
    """A chain's head as an append sees it under the chain's lock."""

    seq: int = 0
    hash: str | None = None
    decisions: int = 0
    refusals: int = 0
    stored: bool = False  # whether the head row exists

    def advance(self, event: LineageEvent) -> None:
        self.seq, self.hash = event.seq or 0, event.hash
        if event.kind == "decision":
            self.decisions += 1
            self.refusals += event.verdict == "refused"


# The statements of an append, built once (building one per call cost more than running it).
_INSERT_EVENT = insert(_EVENTS)
_INSERT_HEAD = insert(_HEADS)
_UPDATE_HEAD = (
    update(_HEADS)
    .where(_HEADS.c.chain == bindparam("head_of"))
    .values({name: bindparam(f"new_{name}") for name in ("seq", "hash", "decisions", "refusals")})
)
_READ_HEADS = (
    select(_HEADS)
    .where(_HEADS.c.chain.in_(bindparam("chains", expanding=True)))
    .order_by(_HEADS.c.chain)
)
_LOCK_HEADS = _READ_HEADS.with_for_update()


def _heads(connection: Connection, chains: list[str], *, lock: bool = False) -> dict[str, _Head]:
    """The heads of some chains (primary-key reads). With ``lock``, locked until the
    transaction ends (PostgreSQL row locks, taken in chain order; SQLite holds its one
    write lock already): a chain new to the store has no head row to lock, so two first
    appenders race, and the loser retries."""
    query = _LOCK_HEADS if lock else _READ_HEADS
    rows = {row.chain: row for row in connection.execute(query, {"chains": chains})}
    return {
        chain: _Head(row.seq, row.hash, row.decisions, row.refusals, stored=True)
        if (row := rows.get(chain)) is not None
        else _head_from_records(connection, chain)
        for chain in chains
    }


def _head_from_records(connection: Connection, chain: str) -> _Head:
    """The head of a chain without a head row: new, or written around the store."""
    where = _EVENTS.c.chain == chain
    last = connection.execute(
        select(_EVENTS.c.seq, _EVENTS.c.hash).where(where).order_by(_EVENTS.c.seq.desc()).limit(1)
    ).first()
    if last is None:
        return _Head()
    counts = dict(
        connection.execute(
            select(_EVENTS.c.verdict, func.count())
            .where(where, _EVENTS.c.kind == "decision")
            .group_by(_EVENTS.c.verdict)
        ).all()
    )
    return _Head(last.seq, last.hash, sum(counts.values()), counts.get("refused", 0))


def _write_head(connection: Connection, chain: str, head: _Head) -> None:
    values = {
        "seq": head.seq,
        "hash": head.hash,
        "decisions": head.decisions,
        "refusals": head.refusals,
    }
    if head.stored:
        params = {f"new_{name}": value for name, value in values.items()}
        connection.execute(_UPDATE_HEAD, {"head_of": chain, **params})
    else:
        connection.execute(_INSERT_HEAD, {"chain": chain, **values})


def _check_head(chain: str, last: Any, stored: Any) -> ChainProblem | None:
    """Does the chain end where its head says? (Its newest records deleted, if not.)"""

    def problem(seq: int, kind: ProblemKind, what: str) -> ChainProblem:
        return ChainProblem(chain, seq, last.event_id, kind, f"chain {chain}: {what}")

    if stored is None:
        return problem(last.seq, "deleted", "has no head record: the head was deleted")
    if stored.seq > last.seq:
        gap = str(stored.seq) if stored.seq == last.seq + 1 else f"{last.seq + 1}..{stored.seq}"
        return problem(
            last.seq + 1,
            "deleted",
            f"ends at record {last.seq}, but its head is record {stored.seq}: "
            f"record {gap} was deleted",
        )
    if (stored.seq, stored.hash) != (last.seq, last.hash):
        return problem(
            last.seq,
            "altered",
            f"record {last.seq} (event {last.event_id}) is not the head the chain "
            f"recorded (record {stored.seq}): altered",
        )
    return None


class _FromSettings:
    """The default of a store's signer: the configured lineage key, if any."""


FROM_SETTINGS = _FromSettings()


class LineageStore:
    """Append and read lineage events at one database URL.

    Opening a store migrates its database to the current schema (see ``migrations``).
    ``signer`` signs every appended record (None: signs nothing); ``keys`` (key id to
    public key) are the keys whose signatures this store believes, with the signer's own.
    Both default to the settings (``PREFECT_GOVERNANCE_LINEAGE_KEY``, ``..._KEYS``).
    """

    def __init__(
        self,
        url: str,
        *,
        append_timeout: float = 15.0,
        signer: SigningKey | _FromSettings | None = FROM_SETTINGS,
        keys: Mapping[str, str] | None = None,
    ):
        self.url = url
        self.append_timeout = append_timeout  # seconds an append may keep retrying
        if isinstance(signer, _FromSettings) or keys is None:
            from prefect_governance.core.settings import GovernanceSettings, lineage_signer

            settings = GovernanceSettings()
            if isinstance(signer, _FromSettings):
                signer = lineage_signer(settings, ephemeral=False)
            keys = settings.lineage_keys if keys is None else keys
        self.signer = signer
        self.keys: dict[str, str] = dict(keys)
        if signer is not None:
            self.keys[signer.key_id] = signer.public_b64
        self._good: dict[tuple[str, str | None], Vouch] = {}  # signatures that verified
        self._heads_vouched: dict[str, tuple[int, str | None, int, int]] = {}
        self._memory: MemoryStore | None = None
        # JSON is stored in canonical form, so verify can hash the stored text as it is.
        self.engine: Engine = create_engine(url, pool_pre_ping=True, json_serializer=_json_text)
        # Appends retry a connection the database dropped themselves, so their pool does
        # without the ping (a round trip per append).
        self._appender: Engine = create_engine(url, json_serializer=_json_text)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self._appender, "connect", _sqlite_pragmas)
        try:
            migrate(self.engine)
        except Exception:
            self.dispose()
            raise

    def append(
        self,
        *events: LineageEvent,
        once_per_decision: str | None = None,
        derive: Derive | None = None,
    ) -> bool:
        """Chain, sign and commit events durably, in one transaction; raise if that fails.

        Each event gets the next seq of its agent's chain; a lost race with another
        appender (unique chain/seq) is rolled back and retried from the new head,
        for at most ``append_timeout`` seconds (then the error is raised). With
        ``once_per_decision`` (an event kind), nothing is appended when the decision
        of the (first) event of that kind already has a record of that kind (checked
        under the chain's lock): returns whether the events were appended. ``derive``
        runs in the transaction, under the chains' locks, after that check; the events
        it returns (on the same chains) are appended after ``events``.
        """
        if not events:
            return False
        for e in events:
            _normalise(e)
        ordered = _by_chain(events)
        given_ids = [e.id for e in ordered]
        once = None
        if once_per_decision:
            decision_id = next(
                (e.decision_id for e in events if e.kind == once_per_decision),
                events[0].decision_id,
            )
            once = (once_per_decision, decision_id)
        deadline = time.monotonic() + self.append_timeout
        for attempt in range(1, APPEND_ATTEMPTS + 1):
            try:
                return self._append_once(ordered, once, derive)
            except (IntegrityError, OperationalError) as exc:
                last = attempt == APPEND_ATTEMPTS or time.monotonic() >= deadline
                if last or not _retryable(exc):
                    raise
            for e, given in zip(ordered, given_ids, strict=True):
                e.id = given
            for e in ordered:  # a record written around the store may hold the next seq
                self._heads_vouched.pop(e.chain, None)
            time.sleep(random.uniform(0.001, 0.005 * attempt))
        raise RuntimeError(f"lineage append: no attempt made ({APPEND_ATTEMPTS=})")

    def _append_once(
        self,
        events: list[LineageEvent],
        once: tuple[str, str | None] | None,
        derive: Derive | None,
    ) -> bool:
        with self._appender.connect() as connection:
            if connection.dialect.name == "sqlite":
                connection.exec_driver_sql("BEGIN IMMEDIATE")  # the database's write lock
            heads = _heads(connection, sorted({e.chain for e in events}), lock=True)
            if once is not None and self._has(connection, *once):
                connection.rollback()
                return False
            markers: list[LineageEvent] = []
            for chain, head in heads.items():
                marker = self._vouch_head(connection, chain, head)
                if marker is not None:
                    markers.append(marker)
            derived = list(derive(connection)) if derive is not None else []
            for e in derived:
                _normalise(e)
                if e.chain not in heads:
                    raise ValueError(f"a derived event is on chain {e.chain}, which is not locked")
            for e in _by_chain([*markers, *events, *derived]):
                head = heads[e.chain]
                e.seq, e.prev_hash = head.seq + 1, head.hash
                e.hash = event_hash(e)
                head.advance(e)  # one at a time: ids rise with seq
                if self.signer is not None:
                    e.signature = record_signature(
                        self.signer, e.hash, head.decisions, head.refusals
                    )
                row = {name: getattr(e, name) for name in _INSERTED}
                key = connection.execute(_INSERT_EVENT, row).inserted_primary_key
                assert key is not None  # an insert has one
                e.id = key[0]
            for chain, head in heads.items():
                _write_head(connection, chain, head)
            connection.commit()
        if self.signer is not None:
            for chain, head in heads.items():
                self._heads_vouched[chain] = (head.seq, head.hash, head.decisions, head.refusals)
        return True

    # --- who wrote a record ---------------------------------------------------

    def vouched(self, row: Any) -> Vouch | None:
        """What a pinned key vouches for a record (an event or a row with its columns):
        None unless its content hashes to its hash and its signature verifies."""
        record_hash, signature = getattr(row, "hash", None), getattr(row, "signature", None)
        if not record_hash or event_hash(row) != record_hash:
            return None
        known = (record_hash, signature)  # a signature verifies once per store
        if known in self._good:
            return self._good[known]
        vouch = vouch_of(record_hash, signature, self.keys)
        if vouch is not None:
            if len(self._good) >= _GOOD_CACHE:
                self._good.clear()
            self._good[known] = vouch
        return vouch

    def authentic(self, rows: Iterable[Any]) -> list[Any]:
        """The rows a pinned key vouches for, in order."""
        return [row for row in rows if self.vouched(row) is not None]

    def _last_vouched(self, connection: Connection, chain: str, below: int | None = None) -> Any:
        """The newest record of a chain a pinned key vouches for (below a seq), or None."""
        query = select(_EVENTS).where(_EVENTS.c.chain == chain, _EVENTS.c.signature.is_not(None))
        if below is not None:
            query = query.where(_EVENTS.c.seq < below)
        rows = connection.execute(
            query.order_by(_EVENTS.c.seq.desc()).execution_options(yield_per=100)
        )
        try:
            return next((row for row in rows if self.vouched(row) is not None), None)
        finally:
            rows.close()

    def _vouched_head(self, connection: Connection, chain: str, head: _Head) -> int | None:
        """Set a chain's head from its newest record and its counts from the newest
        vouched record; return the seq of that vouched record when it is not the newest
        (0: none is), or None when the head is vouched for."""
        cached = self._heads_vouched.get(chain)
        if cached is not None and cached[:2] == (head.seq, head.hash):
            head.decisions, head.refusals = cached[2:]
            return None
        last = connection.execute(
            select(_EVENTS).where(_EVENTS.c.chain == chain).order_by(_EVENTS.c.seq.desc()).limit(1)
        ).first()
        if last is None:
            head.seq, head.hash, head.decisions, head.refusals = 0, None, 0, 0
            return None
        head.seq, head.hash = last.seq, last.hash
        vouch = self.vouched(last)
        base = 0
        if vouch is None:
            found = self._last_vouched(connection, chain, below=last.seq)
            vouch = self.vouched(found) if found is not None else None
            base = found.seq if found is not None else 0
        head.decisions, head.refusals = (vouch.decisions, vouch.refusals) if vouch else (0, 0)
        return None if base == 0 and vouch is not None else base

    def _vouch_head(self, connection: Connection, chain: str, head: _Head) -> LineageEvent | None:
        """Before a signed append: the ``unvouched`` record naming the records on top of a
        chain that no pinned key vouches for, if there are any."""
        if self.signer is None:
            return None
        base = self._vouched_head(connection, chain, head)
        if base is None:
            return None
        marker = unvouched_event(
            _agent_of_chain(chain), base + 1, head.seq, "no signature by a pinned key"
        )
        _normalise(marker)
        return marker

    def unvouched_chains(self) -> dict[str, list[tuple[int, int]]]:
        """Every chain that has records no pinned key vouches for, and their seq ranges."""
        return {chain: ranges for chain in self.chains() if (ranges := self.unvouched(chain))}

    def unvouched(self, chain: str) -> list[tuple[int, int]]:
        """The seq ranges of a chain's records no pinned key vouches for (see lineage_auth);
        trustworthy once ``verify_chain`` finds the chain intact."""
        with self.engine.connect() as connection:
            last_seq = connection.execute(
                select(func.max(_EVENTS.c.seq)).where(_EVENTS.c.chain == chain)
            ).scalar()
            if last_seq is None:
                return []
            newest = self._last_vouched(connection, chain)
            if newest is None:
                return [(1, int(last_seq))]
            markers = connection.execute(
                select(_EVENTS.c.payload).where(
                    _EVENTS.c.chain == chain,
                    _EVENTS.c.kind == UNVOUCHED,
                    _EVENTS.c.seq <= newest.seq,
                )
            ).scalars()
            return unvouched_ranges(newest.seq, int(last_seq), list(markers))

    @staticmethod
    def _has(connection: Connection, kind: str, decision_id: str | None) -> bool:
        query = select(_EVENTS.c.id).where(
            _EVENTS.c.kind == kind, _EVENTS.c.decision_id == decision_id
        )
        return connection.execute(query.limit(1)).first() is not None

    def recent(
        self, limit: int = 50, *, agent_id: str | None = None, flow_run_id: str | None = None
    ) -> Sequence[LineageEvent]:
        """Newest events first."""
        query = select(LineageEvent).order_by(col(LineageEvent.id).desc()).limit(limit)
        if agent_id:
            query = query.where(LineageEvent.agent_id == agent_id)
        if flow_run_id:
            query = query.where(LineageEvent.flow_run_id == flow_run_id)
        with Session(self.engine) as session:
            return session.exec(query).all()

    def last_runs_with(self, agent_id: str, kind: str, runs: int) -> list[LineageEvent]:
        """Every vouched record of the agent's newest ``runs`` flow runs that have a
        vouched record of ``kind``, by seq."""
        chain = LineageEvent.chain == chain_of(agent_id)
        newest = (
            select(LineageEvent)
            .where(chain, LineageEvent.kind == kind)
            .order_by(col(LineageEvent.seq).desc())
        )
        found: list[str] = []
        with Session(self.engine) as session:
            rows = session.exec(newest.execution_options(yield_per=100))
            for row in rows:
                if len(found) >= runs:
                    break
                if (
                    row.flow_run_id
                    and row.flow_run_id not in found
                    and self.vouched(row) is not None
                ):
                    found.append(row.flow_run_id)
            rows.close()
            if not found:
                return []
            query = (
                select(LineageEvent)
                .where(chain, col(LineageEvent.flow_run_id).in_(found))
                .order_by(col(LineageEvent.seq))
            )
            return self.authentic(session.exec(query).all())

    def refusal_of(self, flow_run_id: str) -> LineageEvent | None:
        """The newest vouched refused decision recorded for a flow run, if any."""
        query = (
            select(LineageEvent)
            .where(
                LineageEvent.flow_run_id == flow_run_id,
                LineageEvent.kind == "decision",
                LineageEvent.verdict == "refused",
            )
            .order_by(col(LineageEvent.id).desc())
        )
        with Session(self.engine) as session:
            return next(iter(self.authentic(session.exec(query).all())), None)

    def scores(self, agent_id: str, k: int, *, connection: Connection | None = None) -> list[float]:
        """The agent's last k vouched trust scores, oldest first (inside ``connection``'s
        transaction when given)."""
        query = (
            select(_EVENTS)  # the chain's (chain, seq) index, newest first
            .where(
                _EVENTS.c.chain == chain_of(agent_id),
                _EVENTS.c.kind == "trust",
                _EVENTS.c.signature.is_not(None),
            )
            .order_by(_EVENTS.c.seq.desc())
        )
        found: list[float] = []
        with contextlib.ExitStack() as stack:
            if connection is None:
                connection = stack.enter_context(self.engine.connect())
            rows = connection.execute(query.execution_options(yield_per=max(k, 1)))
            stack.callback(rows.close)
            for row in rows:
                if len(found) >= k:
                    break
                if self.vouched(row) is not None:
                    found.append(float(row.payload["score"]))
        return found[::-1]

    def last_decided_version(self, agent_id: str, *, look_back: int = 50) -> int | None:
        """The agent version the agent's newest vouched decision (among its ``look_back``
        newest decisions) was made with; None: none, or it names no version."""
        query = (
            select(LineageEvent)  # the chain's (chain, seq) index, newest first
            .where(LineageEvent.chain == chain_of(agent_id), LineageEvent.kind == "decision")
            .order_by(col(LineageEvent.seq).desc())
            .limit(look_back)
        )
        with Session(self.engine) as session:
            rows = session.exec(query)
            row = next((r for r in rows if self.vouched(r) is not None), None)
        version = (row.payload or {}).get("agent_version") if row is not None else None
        return int(version) if isinstance(version, int) else None

    def decisions_of(
        self, flow_run_ids: Iterable[str], *, chunk: int = 500
    ) -> dict[str, list[LineageEvent]]:
        """The vouched decision records of each of these flow runs, by flow run id (every
        id given has an entry; a record no pinned key vouches for counts as absent). The
        ids are asked for ``chunk`` at a time."""
        ids = list(dict.fromkeys(str(i) for i in flow_run_ids))
        found: dict[str, list[LineageEvent]] = {i: [] for i in ids}
        with Session(self.engine) as session:
            for start in range(0, len(ids), chunk):
                query = select(LineageEvent).where(
                    LineageEvent.kind == "decision",
                    LineageEvent.flow_run_id.in_(ids[start : start + chunk]),  # type: ignore[union-attr]
                )
                for event in self.authentic(session.exec(query).all()):
                    found.setdefault(str(event.flow_run_id), []).append(event)
        return found

    @property
    def memory(self) -> MemoryStore:
        """The agents' memory in this store's database (one per store)."""
        if self._memory is None:
            self._memory = MemoryStore(self.engine)
        return self._memory

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
        problems = (self.verify_chain(name) for name in self.chains())
        return [p for p in problems if p is not None]

    def verify_chain(self, chain: str) -> ChainProblem | None:
        """The first problem of one chain, its head included, read in pages."""
        where = _EVENTS.c.chain == chain

        @functools.cache
        def index() -> tuple[set[int | None], set[str | None]]:
            query = select(_EVENTS.c.seq, _EVENTS.c.hash).where(where)
            with self.engine.connect() as connection:
                rows = connection.execute(query).all()
            return {seq for seq, _ in rows}, {hash_ for _, hash_ in rows}

        with self.engine.connect() as connection:
            rows = connection.execution_options(yield_per=VERIFY_PAGE).execute(
                _STORED_CHAIN, {"chain": chain}
            )
            problem = verify_chain(rows, index=index, hash_of=stored_hash)
            rows.close()
            last = connection.execute(
                select(_EVENTS.c.seq, _EVENTS.c.hash, _EVENTS.c.event_id)
                .where(where)
                .order_by(_EVENTS.c.seq.desc())
                .limit(1)
            ).first()
            stored = connection.execute(select(_HEADS).where(_HEADS.c.chain == chain)).first()
        if problem is None and last is not None:
            problem = _check_head(chain, last, stored)
        return problem

    def lengths(self) -> dict[str, int]:
        """How many records each chain has."""
        query = select(_EVENTS.c.chain, func.count()).group_by(_EVENTS.c.chain)
        with self.engine.connect() as connection:
            return {chain: count for chain, count in connection.execute(query).all()}

    def decision_counts(self, agent_id: str) -> tuple[int, int]:
        """How many runs of an agent were decided, and how many of them refused, as the
        newest vouched record of its chain counts them."""
        with self.engine.connect() as connection:
            chain = chain_of(agent_id)
            head = _heads(connection, [chain])[chain]
            self._vouched_head(connection, chain, head)
        return head.decisions, head.refusals

    def unsettled(self, verdicts: Iterable[str] = RUNNABLE) -> list[LineageEvent]:
        """Vouched decisions that let a run go ahead and have no outcome record yet, oldest
        first."""
        outcomes = select(LineageEvent.decision_id).where(
            LineageEvent.kind == "outcome", col(LineageEvent.decision_id).is_not(None)
        )
        query = (
            select(LineageEvent)
            .where(
                LineageEvent.kind == "decision",
                col(LineageEvent.verdict).in_(list(verdicts)),
                col(LineageEvent.decision_id).not_in(outcomes),
            )
            .order_by(LineageEvent.id)
        )
        with Session(self.engine) as session:
            return self.authentic(session.exec(query).all())

    def dispose(self) -> None:
        self.engine.dispose()
        self._appender.dispose()
