"""Who wrote a lineage record: the worker's signature on it, checked against pinned keys.

Every record the governed worker appends carries a ``signature``: Ed25519, by the
worker's lineage key (``PREFECT_GOVERNANCE_LINEAGE_KEY``, which only the worker holds),
over the record's hash and its chain's decision counts after it. The hash covers the
record's content and its predecessor's hash, so a signature vouches for the record
and, through the chain, for where it stands. A record counts only when its signature
verifies with a key the reader pins (``PREFECT_GOVERNANCE_LINEAGE_KEYS``): anything
else (written around the worker, by flow code or a database client) is treated as
absent.

Before it appends, the worker checks that the chain's head is vouched for; when it is
not, it first appends an ``unvouched`` record naming the records after the last one
that is (``from_seq``..``to_seq``). So the newest vouched record of a chain vouches,
through the chain, for every record before it that no ``unvouched`` record names, and
``lineage verify`` checks one signature per chain, not one per record.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from prefect_governance.core.canonical import canonical_json
from prefect_governance.core.signing import SignatureError, SigningKey, sign_bytes, verify_bytes

UNVOUCHED: Final = "unvouched"
_DOMAIN = b"prefect-governance lineage record v1\x00"


@dataclass(frozen=True)
class Vouch:
    """What a record's valid signature says: its key and its chain's counts after it."""

    kid: str
    decisions: int
    refusals: int


def _message(record_hash: str, decisions: int, refusals: int) -> bytes:
    return _DOMAIN + canonical_json(
        {"hash": record_hash, "decisions": decisions, "refusals": refusals}
    )


def record_signature(key: SigningKey, record_hash: str, decisions: int, refusals: int) -> str:
    """The ``signature`` column of a record: ``KID:DECISIONS:REFUSALS:SIGNATURE``."""
    signature = sign_bytes(_message(record_hash, decisions, refusals), key)
    return f"{key.key_id}:{decisions}:{refusals}:{signature}"


def vouch_of(
    record_hash: str | None, signature: str | None, keys: Mapping[str, str]
) -> Vouch | None:
    """What a record's signature vouches for, or None when it is missing or does not
    verify with the pinned key its id names (the record's content must be checked to
    hash to ``record_hash`` apart: see ``LineageStore.vouched``)."""
    if not record_hash or not signature:
        return None
    try:
        kid, decisions, refusals, sig = signature.rsplit(":", 3)
        counts = int(decisions), int(refusals)
    except ValueError:
        return None
    public = keys.get(kid)
    if public is None:
        return None
    try:
        verify_bytes(_message(record_hash, *counts), sig, public)
    except SignatureError:
        return None
    return Vouch(kid, *counts)


def unvouched_ranges(
    last_vouched: int, last_seq: int, markers: Iterable[Mapping[str, object]]
) -> list[tuple[int, int]]:
    """The seq ranges of a chain's records nobody pinned vouches for, in order: those the
    vouched ``unvouched`` records name, and those after the newest vouched record."""
    ranges: list[tuple[int, int]] = []
    for marker in markers:
        low, high = marker.get("from_seq"), marker.get("to_seq")
        if isinstance(low, int) and isinstance(high, int) and low <= high <= last_vouched:
            ranges.append((low, high))
    if last_seq > last_vouched:
        ranges.append((last_vouched + 1, last_seq))
    return sorted(set(ranges))


def in_ranges(seq: int | None, ranges: Iterable[tuple[int, int]]) -> bool:
    return seq is not None and any(low <= seq <= high for low, high in ranges)
