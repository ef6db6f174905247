"""Signed grants, memory under schema and trust, as pure logic and on real databases."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta, timezone

import pytest
from sqlmodel import create_engine

from prefect_governance.core.canonical import sha256_of
from prefect_governance.core.models import Grant
from prefect_governance.core.posture import merge_patch, schema_errors
from prefect_governance.core.signing import SignatureError, SigningKey, sign, verify
from prefect_governance.core.trust import TrustWeights, next_score, run_events, slope, trust_state
from prefect_governance.lineage.memory import MemoryStore
from prefect_governance.runtime import EnvelopeError, verify_grant
from tests.conftest import POLICIES

NOW = datetime(2026, 11, 24, 12, 5, tzinfo=timezone.utc)
EXAMPLE = json.loads((POLICIES / "examples" / "allowed" / "input.json").read_text())
RUN_ID = EXAMPLE["envelope"]["flow_run"]["id"]


def grant_payload(**changes) -> dict:
    payload = {
        "decision_id": "d-1",
        "verdict": "allowed",
        "envelope": EXAMPLE["envelope"],
        "agent": EXAMPLE["agent"],
        "memory": {"version": 2, "content": {"n": 1}},
    }
    payload.update(changes)
    return Grant.model_validate(payload).model_dump(mode="json")


KEY = SigningKey.generate("k-1")


def check(signed, *, run_id=RUN_ID, now=NOW, keys=None):
    keys = {"k-1": KEY.public_b64} if keys is None else keys
    return verify_grant(
        json.dumps(signed) if not isinstance(signed, str) else signed,
        flow_run_id=run_id,
        now=now,
        public_key=keys.get,
    )


def test_a_signed_grant_verifies_for_its_own_run():
    grant = check(sign(grant_payload(), KEY))
    assert (grant.decision_id, grant.memory.version, grant.agent.id) == ("d-1", 2, "etl-agent")


def test_a_forged_grant_is_rejected():
    signed = sign(grant_payload(), KEY)
    signed["payload"]["envelope"]["capabilities"] = ["admin"]
    with pytest.raises(EnvelopeError, match="forged"):
        check(signed)


def test_a_grant_signed_by_another_key_is_rejected():
    other = SigningKey.generate("k-1")  # same id, different key
    with pytest.raises(EnvelopeError, match="forged"):
        check(sign(grant_payload(), other))


def test_an_unknown_key_id_is_rejected():
    with pytest.raises(EnvelopeError, match="unknown key"):
        check(sign(grant_payload(), SigningKey.generate("k-2")))


def test_another_runs_grant_is_a_replay():
    with pytest.raises(EnvelopeError, match="replayed"):
        check(sign(grant_payload(), KEY), run_id="00000000-0000-4000-8000-000000000000")


def test_an_expired_grant_is_rejected():
    with pytest.raises(EnvelopeError, match="expired"):
        check(sign(grant_payload(), KEY), now=NOW + timedelta(hours=1))


@pytest.mark.parametrize("text", [None, "", "not json", "[]", '{"kid": "k-1"}'])
def test_a_missing_or_malformed_grant_is_rejected(text):
    with pytest.raises(EnvelopeError):
        check(text)


def test_signatures_cover_the_canonical_form():
    signed = sign({"b": 1, "a": [1, 2]}, KEY)
    reordered = {**signed, "payload": {"a": [1, 2], "b": 1}}
    assert verify(reordered, {"k-1": KEY.public_b64}) == {"a": [1, 2], "b": 1}
    with pytest.raises(SignatureError):
        verify({**signed, "payload": {"a": [2, 1], "b": 1}}, {"k-1": KEY.public_b64})


def test_merge_patch_follows_rfc_7386():
    assert merge_patch({"a": {"b": 1, "c": 2}, "d": 1}, {"a": {"b": None, "e": 3}, "d": [1]}) == {
        "a": {"c": 2, "e": 3},
        "d": [1],
    }


SCHEMA = {
    "type": "object",
    "properties": {"rows": {"type": "integer", "minimum": 0}, "tables": {"type": "array"}},
    "additionalProperties": False,
}


def test_schema_errors_name_the_field():
    assert schema_errors({"rows": -1, "x": 1}, SCHEMA) == [
        "(root): Additional properties are not allowed ('x' was unexpected)",
        "rows: -1 is less than the minimum of 0",
    ]
    assert schema_errors({"rows": 1}, SCHEMA) == []


def _commit(memory, patch, base=0):
    return memory.commit(
        "a", [patch], base_version=base, schema=SCHEMA, decision_id="d", flow_run_id="f"
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def memory(request, tmp_path):
    if request.param == "sqlite":
        engine = create_engine(f"sqlite:///{tmp_path / 'm.db'}")
    else:
        pg = request.getfixturevalue("postgres")
        engine = create_engine(pg.url)
    store = MemoryStore(engine)
    yield store
    with engine.begin() as connection:
        connection.exec_driver_sql("DELETE FROM governance_agent_memory")
    engine.dispose()


def test_memory_commits_versions_with_content_hashes(memory):
    first = _commit(memory, {"rows": 5})
    second = _commit(memory, {"tables": ["t"]}, base=1)
    assert (first.version, second.version) == (1, 2)
    latest = memory.latest("a")
    assert latest.content == {"rows": 5, "tables": ["t"]}
    assert latest.content_hash == sha256_of({"rows": 5, "tables": ["t"]})
    assert latest.schema_hash == sha256_of(SCHEMA)


def test_an_invalid_proposal_is_rejected_with_its_errors(memory):
    result = _commit(memory, {"rows": "many"})
    assert not result.committed
    assert result.errors == ("rows: 'many' is not of type 'integer'",)
    assert memory.latest("a").version == 0


def test_a_stale_commit_is_rebased_not_overwritten(memory):
    _commit(memory, {"rows": 1})
    stale = _commit(memory, {"tables": ["x"]}, base=0)  # started before version 1 existed
    assert stale.committed and stale.rebased and stale.version == 2
    assert memory.latest("a").content == {"rows": 1, "tables": ["x"]}


def test_concurrent_commits_lose_no_update(memory):
    def writer(i):
        for j in range(10):
            assert _commit(memory, {"tables": [f"{i}-{j}"]}).committed

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    history = memory.history("a")
    assert [row.version for row in history] == list(range(1, 41))
    # each commit re-based on the one before: every write is somewhere in the history
    written = {row.content["tables"][0] for row in history}
    assert written == {f"{i}-{j}" for i in range(4) for j in range(10)}


def test_slope_and_window():
    assert slope([0.9, 0.8, 0.7]) == pytest.approx(-0.1)
    assert slope([0.5]) == 0.0
    state = trust_state([1.0, 0.9, 0.8, 0.7], baseline=1.0, runs=4, refusals=0, k=3)
    assert (state.score, state.window, state.slope) == (0.7, [0.9, 0.8, 0.7], pytest.approx(-0.1))
    assert trust_state([], baseline=0.4, runs=0, refusals=0, k=3).score == 0.4


def test_trust_moves_by_the_weights_and_stays_in_bounds():
    weights = TrustWeights()
    assert next_score(0.5, ["completed"], weights) == pytest.approx(0.52)
    assert next_score(0.05, ["refused"], weights) == 0.0
    assert next_score(0.99, ["completed", "completed"], weights) == 1.0
    custom = TrustWeights(failed=-0.5)
    assert next_score(0.9, ["failed"], custom) == pytest.approx(0.4)


def test_run_events_from_decision_and_state():
    assert run_events(verdict="refused", state=None, warned=False, memory_rejected=False) == [
        "refused"
    ]
    assert run_events(verdict="allowed", state="FAILED", warned=True, memory_rejected=True) == [
        "failed",
        "warned",
        "memory_rejected",
    ]
    assert run_events(
        verdict="audited", state="COMPLETED", warned=False, memory_rejected=False
    ) == [
        "completed",
        "warned",
    ]
