"""The pool owner's signature over an agent, the deployments it binds, and the run's mode.

Pure functions (prefect_governance.core.attestation, governor.effective_mode, apply's key
reading); the same decisions against a real server and worker are in tests/attacks/.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from prefect_governance.cli.apply import SigningKeyError, agent_signing_key
from prefect_governance.core.attestation import (
    AttestationError,
    agent_payload,
    binds,
    rollback_reason,
    signed,
    verify_agent,
)
from prefect_governance.core.decision import worker_refusal
from prefect_governance.core.models import Constraints
from prefect_governance.core.settings import GovernanceSettings
from prefect_governance.core.signing import SigningKey
from prefect_governance.lineage.events import decision_event
from prefect_governance.lineage.store import LineageStore
from prefect_governance.worker.blocks import GovernanceAgent
from prefect_governance.worker.governor import effective_mode, last_decided_version
from tests.agents import TEST_AGENT_KEY, TEST_AGENT_KEYS

OWNER = SigningKey.generate("pool-owner")
PINNED = {OWNER.key_id: OWNER.public_b64}


def _agent(**fields) -> GovernanceAgent:
    return GovernanceAgent(
        **{
            "id": "etl",
            "owner": "data@example.com",
            "trust_scope": ["governed"],
            "capabilities": ["read:warehouse"],
            "deployments": ["load-warehouse/nightly"],
            **fields,
        }
    )


def _as_read_back(agent: GovernanceAgent) -> GovernanceAgent:
    """The agent as the worker reads it: the block document's data, validated again."""
    return GovernanceAgent.model_validate(json.loads(json.dumps(agent.model_dump(mode="json"))))


def test_a_signed_agent_verifies_as_the_worker_reads_it():
    agent = signed("etl-agent", _agent(trust_baseline=0.8, memory_schema={"type": "object"}), OWNER)
    verify_agent("etl-agent", _as_read_back(agent), PINNED)
    assert set(agent.attestation) == {"kid", "alg", "signature"}  # the payload is the block


def test_signing_is_deterministic_so_apply_can_tell_unchanged():
    assert signed("a", _agent(), OWNER).attestation == signed("a", _agent(), OWNER).attestation


@pytest.mark.parametrize(
    "field, value",
    [
        ("capabilities", ["read:warehouse", "delete:warehouse"]),
        ("trust_scope", ["governed", "elsewhere"]),
        ("deployments", ["*"]),
        ("mode", "audit"),
        ("policy_ref", "prefect/governance/nothing"),
        ("constraints", Constraints()),  # a field reset to its default is still a change
        ("trust_baseline", 0.99),
        ("version", 2),
        ("id", "another"),
        ("memory_schema", {"type": "object", "properties": {"x": {"type": "string"}}}),
    ],
)
def test_any_field_edited_after_signing_breaks_the_signature(field, value):
    agent = signed(
        "etl-agent",
        _agent(constraints={"parameters": {"rows": {"type": "integer", "maximum": 10}}}),
        OWNER,
    )
    edited = _as_read_back(agent)
    setattr(edited, field, value)
    with pytest.raises(AttestationError, match="does not carry the pool owner's signature"):
        verify_agent("etl-agent", _as_read_back(edited), PINNED)


def test_a_field_added_to_the_block_breaks_the_signature():
    data = signed("etl-agent", _agent(), OWNER).model_dump(mode="json")
    widened = GovernanceAgent.model_validate({**data, "grants_everything": True})
    with pytest.raises(AttestationError, match="does not carry"):
        verify_agent("etl-agent", widened, PINNED)


def test_a_signature_copied_to_another_block_name_does_not_verify():
    agent = signed("etl-agent", _agent(), OWNER)
    with pytest.raises(AttestationError, match="agent block 'copy' does not carry"):
        verify_agent("copy", agent, PINNED)
    assert agent_payload("copy", agent) != agent_payload("etl-agent", agent)


def test_an_unsigned_agent_is_refused_with_how_to_sign_it():
    with pytest.raises(AttestationError, match=r"not signed by the pool owner.*--signing-key"):
        verify_agent("etl-agent", _agent(), PINNED)


def test_a_rogue_key_under_the_pinned_id_does_not_verify():
    rogue = SigningKey.generate(OWNER.key_id)
    with pytest.raises(AttestationError, match="does not verify with key 'pool-owner'"):
        verify_agent("etl-agent", signed("etl-agent", _agent(), rogue), PINNED)


def test_an_unpinned_key_id_does_not_verify():
    other = SigningKey.generate("someone-else")
    with pytest.raises(AttestationError, match="unknown key 'someone-else'"):
        verify_agent("etl-agent", signed("etl-agent", _agent(), other), PINNED)


def test_no_pinned_keys_refuses_everything_and_says_what_to_set():
    agent = signed("etl-agent", _agent(), OWNER)
    with pytest.raises(AttestationError, match="PREFECT_GOVERNANCE_AGENT_KEYS"):
        verify_agent("etl-agent", agent, {})


@pytest.mark.parametrize(
    "attestation",
    [
        "not a mapping",
        {"kid": "pool-owner", "alg": "Ed25519"},
        {"kid": "pool-owner", "alg": "none", "signature": "x"},
        {"kid": "pool-owner", "alg": "Ed25519", "signature": "not base64 !"},
    ],
)
def test_a_malformed_attestation_is_refused(attestation):
    agent = _agent().model_copy(update={"attestation": attestation})
    with pytest.raises(AttestationError):
        verify_agent("etl-agent", agent, PINNED)


DEPLOYMENT_ID = uuid.uuid4()


@pytest.mark.parametrize(
    "patterns, expected",
    [
        (["load-warehouse/nightly"], True),
        (["load-warehouse/nightly-2"], False),
        (["load-warehouse/*"], True),
        (["*/nightly"], True),
        (["*"], True),
        (["Load-Warehouse/nightly"], False),  # case-sensitive
        (["load-warehouse/night?y"], True),
        ([str(DEPLOYMENT_ID)], True),
        ([str(DEPLOYMENT_ID).upper()], True),
        ([str(uuid.uuid4())], False),
        (["nightly"], False),  # a deployment name alone is not its full name
        ([], False),  # binds nothing: fail closed
    ],
)
def test_which_deployments_an_agent_binds(patterns, expected):
    found = binds(
        patterns,
        flow_name="load-warehouse",
        deployment_name="nightly",
        deployment_id=DEPLOYMENT_ID,
    )
    assert found is expected


def test_an_ad_hoc_run_is_never_bound():
    assert not binds(["*"], flow_name="load-warehouse", deployment_name=None, deployment_id=None)


@pytest.mark.parametrize(
    "pool, agent, expected",
    [
        ("enforce", None, "enforce"),
        ("enforce", "audit", "enforce"),  # an agent cannot relax the pool
        ("enforce", "enforce", "enforce"),
        ("audit", None, "audit"),
        ("audit", "enforce", "enforce"),  # but can make it stricter
        ("audit", "audit", "audit"),
    ],
)
def test_the_mode_is_the_pools_and_an_agent_can_only_tighten_it(pool, agent, expected):
    assert effective_mode(pool, agent) == expected


def test_the_signing_key_comes_from_the_file_else_the_environment(tmp_path: Path):
    path = tmp_path / "owner.key"
    path.write_text(OWNER.seed_b64 + "\n")
    key = agent_signing_key(path, None, {})
    assert (key.key_id, key.public_b64) == ("pool-owner", OWNER.public_b64)
    env = {
        "PREFECT_GOVERNANCE_AGENT_SIGNING_KEY": TEST_AGENT_KEY.seed_b64,
        "PREFECT_GOVERNANCE_AGENT_SIGNING_KEY_ID": "team-a",
    }
    key = agent_signing_key(None, None, env)
    assert (key.key_id, key.public_b64) == ("team-a", TEST_AGENT_KEY.public_b64)
    assert agent_signing_key(None, "team-b", env).key_id == "team-b"  # --key-id wins
    assert agent_signing_key(path, None, env).public_b64 == OWNER.public_b64  # the file wins
    assert agent_signing_key(None, None, {}) is None


@pytest.mark.parametrize(
    "seed, key_id, reason",
    [
        ("c2hvcnQ", None, "not an Ed25519 seed"),
        (OWNER.seed_b64, "Bad Id", "key id must be lowercase"),
    ],
)
def test_a_bad_signing_key_is_an_error(tmp_path: Path, seed, key_id, reason):
    path = tmp_path / "owner.key"
    path.write_text(seed)
    with pytest.raises(SigningKeyError, match=reason):
        agent_signing_key(path, key_id, {})
    with pytest.raises(SigningKeyError, match="cannot read"):
        agent_signing_key(tmp_path / "missing.key", None, {})


def test_the_worker_pins_agent_keys_from_the_environment(monkeypatch):
    monkeypatch.setenv("PREFECT_GOVERNANCE_AGENT_KEYS", TEST_AGENT_KEYS)
    assert GovernanceSettings().agent_keys == {TEST_AGENT_KEY.key_id: TEST_AGENT_KEY.public_b64}
    monkeypatch.setenv("PREFECT_GOVERNANCE_AGENT_KEYS", '{"pool-owner": "too-short"}')
    with pytest.raises(ValidationError, match="not an Ed25519 public key"):
        GovernanceSettings()
    monkeypatch.delenv("PREFECT_GOVERNANCE_AGENT_KEYS")
    assert GovernanceSettings().agent_keys == {}


@pytest.mark.parametrize(
    "version, last, refused",
    [(1, None, False), (2, 2, False), (3, 2, False), (1, 2, True)],
)
def test_an_agent_older_than_its_last_decided_version_is_a_rollback(version, last, refused):
    reason = rollback_reason("etl-agent", version, last)
    assert (reason is not None) is refused
    if refused:
        assert f"is version {version}, older than version {last}" in reason


def test_the_last_decided_version_is_the_latest_decisions(tmp_path: Path):
    store = LineageStore(f"sqlite:///{tmp_path / 'l.db'}")
    assert last_decided_version(store, "etl") is None
    decision = worker_refusal("x", policy_path="p", mode="enforce", fail_mode="closed")
    for run, version in (("r1", 3), ("r2", None), ("r3", 2)):  # None: a record from before
        store.append(
            decision_event(
                decision, agent_id="etl", flow_run_id=run, envelope=None, agent_version=version
            )
        )
    assert last_decided_version(store, "etl") == 2  # the latest, not the highest
    assert last_decided_version(store, "another") is None
    store.dispose()


def test_the_test_helpers_save_agents_a_worker_accepts(prefect_server):
    """tests/agents.py: signed with the pinned test key, bound to every deployment when the
    agent names none (the product's default binds nothing)."""
    import asyncio

    from prefect import get_client

    from prefect_governance.worker.governor import load_agent
    from tests.agents import asave_agent, save_agent

    keys = GovernanceSettings().agent_keys  # what tests/conftest.py pinned
    save_agent(_agent(id="helper-sync", deployments=[]), "helper-sync")

    async def saved() -> list[GovernanceAgent]:
        await asave_agent(_agent(id="helper-async"), "helper-async")
        async with get_client() as client:
            return [await load_agent(client, n, keys) for n in ("helper-sync", "helper-async")]

    sync, async_ = asyncio.run(saved())
    assert sync.deployments == ["*"]  # the tests' convenience
    assert async_.deployments == ["load-warehouse/nightly"]  # kept when given
    assert keys == {TEST_AGENT_KEY.key_id: TEST_AGENT_KEY.public_b64}


def test_an_agent_signed_before_infrastructure_constraints_existed_still_verifies():
    """The payload of an agent signed by a release without `constraints.infrastructure`
    (the key absent) is what the verifier rebuilds while the field is unset."""
    from prefect_governance.core.signing import sign

    agent = _agent()
    old_payload = agent_payload("etl", agent)
    assert "infrastructure" not in old_payload["agent"]["constraints"]
    document = sign(old_payload, OWNER)
    stored = agent.model_copy(
        update={"attestation": {k: v for k, v in document.items() if k != "payload"}}
    )
    verify_agent("etl", stored, PINNED)
    # Setting the newer field after signing breaks it, as any other edit does.
    widened = stored.model_copy(
        update={
            "constraints": Constraints.model_validate({"infrastructure": {"host_network": True}})
        }
    )
    with pytest.raises(AttestationError):
        verify_agent("etl", widened, PINNED)
    # And an agent signed with the field set does not verify with it removed.
    with_section = signed(
        "etl", _agent(constraints={"infrastructure": {"allow_privileged": True}}), OWNER
    )
    stripped = with_section.model_copy(update={"constraints": Constraints()})
    with pytest.raises(AttestationError):
        verify_agent("etl", stripped, PINNED)
