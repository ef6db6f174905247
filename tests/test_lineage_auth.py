"""Who wrote a lineage record: signatures, what counts as vouched for, and the reads the
governance relies on (issue 15, 2), against a real SQLite and PostgreSQL database."""

from __future__ import annotations

from sqlalchemy import text

from prefect_governance.core.models import Decision
from prefect_governance.core.signing import SigningKey
from prefect_governance.lineage.auth import UNVOUCHED, record_signature, unvouched_ranges, vouch_of
from prefect_governance.lineage.events import LineageEvent, decision_event
from prefect_governance.lineage.store import LineageStore

WORKER = SigningKey.generate("worker-lineage")
OTHER = SigningKey.generate("someone-else")
PINNED = {WORKER.key_id: WORKER.public_b64}
HASH = "sha256:" + "ab" * 32


def test_a_signature_vouches_for_its_hash_and_counts_only():
    signature = record_signature(WORKER, HASH, 3, 1)
    vouch = vouch_of(HASH, signature, PINNED)
    assert vouch is not None and (vouch.kid, vouch.decisions, vouch.refusals) == (
        WORKER.key_id,
        3,
        1,
    )
    kid, _, _, sig = signature.rsplit(":", 3)
    assert vouch_of("sha256:" + "cd" * 32, signature, PINNED) is None, "another record"
    assert vouch_of(HASH, f"{kid}:3:0:{sig}", PINNED) is None, "other counts"
    assert vouch_of(HASH, signature, {}) is None, "no key pinned"
    assert vouch_of(HASH, record_signature(OTHER, HASH, 3, 1), PINNED) is None, "unpinned key"
    # another key under the pinned key's id
    forged = record_signature(SigningKey.generate(WORKER.key_id), HASH, 3, 1)
    assert vouch_of(HASH, forged, PINNED) is None
    for garbage in (None, "", "x", "a:b:c:d", f"{kid}:3:1:!!!"):
        assert vouch_of(HASH, garbage, PINNED) is None


def test_unvouched_ranges():
    assert unvouched_ranges(10, 10, []) == []
    assert unvouched_ranges(10, 12, []) == [(11, 12)]
    assert unvouched_ranges(0, 3, []) == [(1, 3)]
    markers = [{"from_seq": 4, "to_seq": 5}, {"from_seq": 20, "to_seq": 21}, {"bad": 1}]
    assert unvouched_ranges(10, 11, markers) == [(4, 5), (11, 11)], "a marker past it: ignored"


def _decision(verdict: str, run: str) -> LineageEvent:
    decision = Decision(
        id=f"d-{run}",
        verdict=verdict,  # type: ignore[arg-type]
        allow=verdict != "refused",
        deny=["no"] if verdict == "refused" else [],
        engine="embedded",
        policy_path="p",
    )
    return decision_event(decision, agent_id="agent", flow_run_id=run, envelope=None)


def _trust(score: float) -> LineageEvent:
    return LineageEvent(kind="trust", agent_id="agent", payload={"score": score})


def test_reads_skip_what_no_pinned_key_vouches_for(lineage_url):
    url = lineage_url
    worker = LineageStore(url, signer=WORKER, keys={})
    forger = LineageStore(url, signer=None, keys={})  # writes the database, holds no key
    reader = LineageStore(url, signer=None, keys=PINNED)
    try:
        worker.append(_decision("allowed", "r1"), _trust(0.5))
        # The forger: a refusal of a run that was never refused, a perfect score, an
        # allowed decision waiting to be settled, and rewritten counts.
        forger.append(_decision("refused", "r2"), _trust(1.0), _decision("allowed", "r3"))
        with forger.engine.begin() as connection:
            connection.execute(text("UPDATE governance_chain_head SET decisions = 0, refusals = 0"))
        # ... and one record whose content was changed under a valid signature.
        worker.append(_trust(0.6))
        with forger.engine.begin() as connection:
            connection.execute(
                text(
                    "UPDATE governance_event SET flow_run_id = 'r9' "
                    "WHERE seq = (SELECT MAX(seq) FROM governance_event)"
                )
            )
        assert reader.scores("agent", 10) == [0.5]  # the reader has verified record 2
        # A perfect score wearing record 2's hash and signature, as the newest record.
        with forger.engine.begin() as connection:
            payload = "CAST(:payload AS JSON)" if "postgresql" in url else ":payload"
            connection.execute(
                text(
                    "INSERT INTO governance_event (event_id, created_at, kind, agent_id, "
                    "reasons, warnings, payload, chain, seq, prev_hash, hash, signature) "
                    f"SELECT 'copied', created_at, kind, agent_id, reasons, warnings, {payload}, "
                    "chain, 99, prev_hash, hash, signature FROM governance_event WHERE seq = 2"
                ),
                {"payload": '{"score": 1.0}'},
            )
        for store in (reader, LineageStore(url, signer=None, keys=PINNED)):  # cached, cold
            assert store.scores("agent", 10) == [0.5]
            assert store.refusal_of("r2") is None
            assert [e.flow_run_id for e in store.unsettled()] == ["r1"]
            assert store.decision_counts("agent") == (1, 0)
            assert store.unvouched("agent") == [(3, 5), (7, 99)]
        markers = [e for e in reader.chain("agent") if e.kind == UNVOUCHED]
        assert [(m.payload["from_seq"], m.payload["to_seq"]) for m in markers] == [(3, 5)]
        assert reader.verify()[0].kind == "altered", "the changed record breaks the chain"
        # A verifier that pins nothing believes nothing.
        assert LineageStore(url, signer=None, keys={}).scores("agent", 10) == []
    finally:
        for store in (worker, forger, reader):
            store.dispose()
