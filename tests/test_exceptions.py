"""Policy exceptions, the pure parts and the operator's tools: the document, its signature,
its scope and lifetime, what reaches the policy, `apply` and `exception list`.

The end-to-end cases (a real worker waiving and then refusing, and the attacks) are in
tests/attacks/test_exceptions.py.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from pydantic import ValidationError

from prefect_governance.cli.apply import DocumentError, apply_documents, load_documents
from prefect_governance.cli.local import prefect_env
from prefect_governance.core.attestation import agent_payload
from prefect_governance.core.decision import decision_for
from prefect_governance.core.engines.base import EngineAnswer
from prefect_governance.core.exceptions import (
    CLOCK_SKEW,
    ExceptionRejected,
    ExceptionSpec,
    RunScope,
    applies,
    check_exception,
    check_exceptions,
    expiring_soon,
    listing,
    verify_exception,
)
from prefect_governance.core.settings import WORKER_SECRETS, GovernanceSettings
from prefect_governance.core.signing import sign
from prefect_governance.lineage.events import decision_event, decision_from_event
from prefect_governance.worker.blocks import GovernanceAgent, GovernanceException
from prefect_governance.worker.governor import Governor
from prefect_governance.worker.report import decision_markdown, refusal_message
from tests.agents import TEST_AGENT_KEY
from tests.exception_keys import (
    MALLORY_AS_SECURITY,
    MAX_LIFETIME,
    PINNED,
    SECURITY,
    exception,
    exception_keys_env,
    signed,
)

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
RULE = "prefect.governance.rules.parameters.deny"
DEPLOYMENT_ID = "6f1c2d2e-0000-4000-8000-0000000000b1"
RUN = RunScope(
    agent_id="etl-agent",
    pool="gov",
    flow_name="load-warehouse",
    deployment_name="nightly",
    deployment_id=DEPLOYMENT_ID,
)
CLI = [sys.executable, "-m", "prefect_governance.cli"]


def made(**fields) -> GovernanceException:
    return exception(**{"expires_at": NOW + timedelta(days=7), **fields})


def stored(block: GovernanceException) -> dict:
    """The block's data as the server holds it (what the worker reads)."""
    return block.model_dump(mode="json")


def check(name: str, block: GovernanceException, *, now=NOW, run=RUN, keys=PINNED):
    return check_exception(
        name, stored(block), keys=keys, run=run, now=now, max_lifetime=MAX_LIFETIME
    )


# --- the document ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"agents": [], "deployments": [], "pools": []}, "an exception for everything"),
        ({"rules": []}, "at least 1 item"),
        ({"rules": ["prefect.governance.decision.deny"]}, "can never be waived"),
        ({"rules": ["prefect.governance.rules.trust.warn"]}, "not a rule module's deny"),
        ({"rules": ["infrastructure"]}, "not a rule module's deny"),
        ({"message": "("}, "not a regular expression"),
        ({"deployments": ["*/nightly"]}, "a glob only over the deployment name"),
        ({"deployments": ["*"]}, "a glob only over the deployment name"),
        ({"deployments": ["nightly"]}, "a glob only over the deployment name"),
        ({"expires_at": "2026-12-08T00:00:00"}, "timezone"),
        ({"surprise": True}, "Extra inputs"),
    ],
)
def test_a_document_that_waives_too_much_or_is_malformed_is_invalid(fields, why):
    data = {**stored(made()), **fields}
    data.pop("block_type_slug")
    with pytest.raises(ValidationError, match=why):
        ExceptionSpec.model_validate(data)


def test_a_deployment_is_one_flows_name_a_glob_over_its_deployments_or_an_id():
    spec = made(deployments=["load-warehouse/nightly", "load-warehouse/*", DEPLOYMENT_ID])
    assert spec.deployments[1] == "load-warehouse/*"


# --- the signature ----------------------------------------------------------------------


def test_an_exception_signed_by_the_pinned_key_verifies_and_reaches_the_policy():
    block = signed("waiver", made(), now=NOW)
    assert block.issued_at == NOW and block.attestation["kid"] == "security"
    found = check("waiver", block)
    assert found is not None
    assert found.model_dump(mode="json") == {
        "name": "waiver",
        "rules": [RULE],
        "message": None,
        "agents": ["etl-agent"],
        "deployments": [],
        "pools": [],
        "owner": "security@example.com",
        "reason": "a one-off backfill",
        "ticket": "SEC-1",
        "issued_at": "2026-12-01T12:00:00Z",
        "expires_at": "2026-12-08T12:00:00Z",
    }


@pytest.mark.parametrize(
    "field", ["expires_at", "agents", "pools", "rules", "message", "owner", "issued_at"]
)
def test_any_field_edited_after_signing_breaks_the_signature(field):
    block = signed("waiver", made(), now=NOW)
    edited = {
        "expires_at": NOW + timedelta(days=60),
        "agents": ["etl-agent", "other-agent"],
        "pools": ["gov"],
        "rules": [RULE, "prefect.governance.rules.scope.deny"],
        "message": ".*",
        "owner": "mallory",
        "issued_at": NOW + timedelta(days=1),
    }[field]
    setattr(block, field, edited)
    with pytest.raises(ExceptionRejected, match="does not verify with key 'security'"):
        check("waiver", block)


def test_a_signature_copied_to_another_block_name_does_not_verify():
    block = signed("waiver", made(), now=NOW)
    with pytest.raises(ExceptionRejected, match="does not verify"):
        check("another-waiver", block)


@pytest.mark.parametrize(
    ("key", "why"),
    [
        (MALLORY_AS_SECURITY, "the signature does not verify with key 'security'"),
        (TEST_AGENT_KEY, "signed with an unknown key 'test-pool-owner'"),
    ],
)
def test_an_exception_signed_by_another_key_waives_nothing(key, why):
    with pytest.raises(ExceptionRejected, match=why):
        check("waiver", signed("waiver", made(), key, now=NOW))


def test_an_agents_signature_is_no_exceptions_signature_even_with_the_same_key():
    """The payload says what it is: a pool owner who holds the security key too cannot
    turn an agent's signature into an exception's."""
    agent = GovernanceAgent(id="waiver", owner="o", trust_scope=["gov"])
    document = sign(agent_payload("waiver", agent), SECURITY)
    block = made(issued_at=NOW)
    block.attestation = {k: v for k, v in document.items() if k != "payload"}
    with pytest.raises(ExceptionRejected, match="does not verify"):
        check("waiver", block)


def test_an_unsigned_or_malformed_exception_waives_nothing():
    with pytest.raises(ExceptionRejected, match="not signed"):
        check("waiver", made(issued_at=NOW))
    data = {**stored(made(issued_at=NOW)), "attestation": "signed"}
    with pytest.raises(ExceptionRejected, match="invalid"):
        check_exception("waiver", data, keys=PINNED, run=RUN, now=NOW, max_lifetime=MAX_LIFETIME)
    spec = ExceptionSpec.model_validate(
        {k: v for k, v in stored(made(issued_at=NOW)).items() if k != "block_type_slug"}
    )
    spec.attestation = ["x"]  # type: ignore[assignment]
    with pytest.raises(ExceptionRejected, match="malformed"):
        verify_exception("waiver", spec, PINNED)


# --- the lifetime -----------------------------------------------------------------------


def test_apply_refuses_to_sign_an_exception_past_or_beyond_the_maximum_lifetime():
    with pytest.raises(ValueError, match="longer than the maximum 90 days"):
        signed("waiver", made(expires_at=NOW + timedelta(days=91)), now=NOW)
    with pytest.raises(ValueError, match="not after it was issued"):
        signed("waiver", made(expires_at=NOW), now=NOW)


def test_the_worker_ignores_an_exception_living_beyond_its_maximum():
    from prefect_governance.core.exceptions import signed_exception

    long_lived = signed_exception(
        "waiver",
        made(expires_at=NOW + timedelta(days=365)),
        SECURITY,
        now=NOW,
        max_lifetime=timedelta(days=400),
    )
    with pytest.raises(ExceptionRejected, match="longer than the maximum"):
        check("waiver", long_lived)


def test_an_exception_issued_in_the_future_waits_beyond_the_clock_skew():
    block = signed("waiver", made(expires_at=NOW + timedelta(days=8)), now=NOW + timedelta(days=1))
    with pytest.raises(ExceptionRejected, match="not valid before"):
        check("waiver", block)
    assert check("waiver", block, now=NOW + timedelta(days=1) - CLOCK_SKEW) is not None


def test_an_expired_exception_still_reaches_the_policy_which_warns_of_it():
    block = signed("waiver", made(expires_at=NOW + timedelta(hours=1)), now=NOW)
    found = check("waiver", block, now=NOW + timedelta(days=3))
    assert found is not None and found.expires_at < NOW + timedelta(days=3)


# --- the scope --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scope", "applies_to_run"),
    [
        ({"agents": ["etl-agent"]}, True),
        ({"agents": ["other-agent"]}, False),
        ({"agents": [], "pools": ["gov"]}, True),
        ({"agents": [], "pools": ["prod"]}, False),
        ({"agents": ["etl-agent"], "pools": ["prod"]}, False),  # every named scope must match
        ({"agents": [], "deployments": ["load-warehouse/nightly"]}, True),
        ({"agents": [], "deployments": ["load-warehouse/*"]}, True),
        ({"agents": [], "deployments": [DEPLOYMENT_ID]}, True),
        ({"agents": [], "deployments": ["load-warehouse/weekly"]}, False),
        ({"agents": ["etl-agent"], "deployments": ["other-flow/nightly"]}, False),
    ],
)
def test_an_exception_applies_where_every_scope_it_names_matches(scope, applies_to_run):
    assert applies(made(**scope), RUN) is applies_to_run


def test_an_ad_hoc_run_is_never_in_a_deployment_scope():
    ad_hoc = RunScope(agent_id="etl-agent", pool="gov", flow_name="load-warehouse")
    assert not applies(made(deployments=["load-warehouse/*"]), ad_hoc)


def test_only_the_exceptions_that_claim_this_run_are_reported_as_rejected():
    documents = {
        "good": stored(signed("good", made(), now=NOW)),
        "forged-here": stored(signed("forged-here", made(), MALLORY_AS_SECURITY, now=NOW)),
        "forged-elsewhere": stored(
            signed("forged-elsewhere", made(agents=["other"]), MALLORY_AS_SECURITY, now=NOW)
        ),
        "out-of-scope": stored(signed("out-of-scope", made(pools=["prod"]), now=NOW)),
        "invalid-here": {"rules": ["prefect.governance.decision.deny"], "agents": ["etl-agent"]},
        "invalid-elsewhere": {"rules": [], "agents": ["other"]},
        "hostile": ["not", "a", "mapping"],
        "scope-unreadable": {"agents": "etl-agent"},
    }
    found, rejected = check_exceptions(
        documents, keys=PINNED, run=RUN, now=NOW, max_lifetime=MAX_LIFETIME
    )
    assert [e.name for e in found] == ["good"]
    assert [r.split(":")[0] for r in rejected] == [
        "exception 'forged-here'",
        "exception 'hostile'",
        "exception 'invalid-here'",
        "exception 'scope-unreadable'",
    ], rejected
    assert "can never be waived" in rejected[2]


def test_rejected_exceptions_are_capped():
    documents = {f"x{i:02}": {"agents": ["etl-agent"]} for i in range(30)}
    _, rejected = check_exceptions(
        documents, keys=PINNED, run=RUN, now=NOW, max_lifetime=MAX_LIFETIME
    )
    assert len(rejected) == 21 and rejected[-1] == "... and 10 more"


def test_a_waiver_about_to_expire_is_noted_for_the_runs_log():
    soon = check("soon", signed("soon", made(expires_at=NOW + timedelta(days=2)), now=NOW))
    later = check("later", signed("later", made(expires_at=NOW + timedelta(days=30)), now=NOW))
    assert soon is not None and later is not None
    notes = expiring_soon([soon, later], {"soon", "later"}, NOW, timedelta(days=7))
    assert len(notes) == 1 and "'soon' waived a deny" in notes[0] and "SEC-1" in notes[0]
    assert expiring_soon([soon], set(), NOW, timedelta(days=7)) == []


# --- the decision -----------------------------------------------------------------------


def test_the_decision_the_lineage_and_the_artifact_keep_the_waivers():
    waiver = {"exception": "waiver", "rule": RULE, "message": 'parameter "rows" is 500'}
    result = {"allow": True, "deny": [], "warn": [], "waived": [waiver]}
    decision = decision_for(
        EngineAnswer(result=result),
        engine="embedded",
        policy_path="prefect/governance/decision",
        mode="enforce",
        fail_mode="closed",
    )
    assert decision.verdict == "allowed" and [w.model_dump() for w in decision.waived] == [waiver]
    decision.rejected_exceptions = ["exception 'forged': the signature does not verify"]
    event = decision_event(
        decision, agent_id="etl-agent", flow_run_id="r", envelope=None, exceptions=[{"name": "x"}]
    )
    assert event.payload["waived"] == [waiver]
    assert event.payload["exceptions"] == [{"name": "x"}]
    back = decision_from_event(event)
    assert back.waived == decision.waived
    assert back.rejected_exceptions == decision.rejected_exceptions
    markdown = decision_markdown(decision, "etl-agent")
    assert "## Waived by exception" in markdown and "`waiver`" in markdown
    assert "## Exceptions not accepted" in markdown
    decision.verdict, decision.deny = "refused", ["no"]
    assert "exceptions not accepted: exception 'forged'" in refusal_message(decision)


def test_a_waiver_of_the_wrong_shape_is_an_engine_failure_not_a_pass():
    decision = decision_for(
        EngineAnswer(result={"allow": True, "waived": [{"exception": 1}]}),
        engine="embedded",
        policy_path="p",
        mode="enforce",
        fail_mode="closed",
    )
    assert decision.verdict == "refused" and decision.error and "waived" in decision.error


class _Unreadable:
    """A Prefect client whose block listing fails (a fault not produced for real here)."""

    async def read_block_documents_by_type(self, *args, **kwargs):
        raise ConnectionError("the server went away")


def test_exceptions_that_cannot_be_read_waive_nothing_and_warn():
    governor = Governor(GovernanceSettings(exception_keys=PINNED))
    found, rejected, unread = asyncio.run(governor._exceptions(_Unreadable(), RUN, NOW))  # type: ignore[arg-type]
    assert found == [] and rejected == []
    assert unread and "could not be read (ConnectionError" in unread
    assert "decided without any" in unread


def test_without_pinned_exception_keys_nothing_is_read():
    governor = Governor(GovernanceSettings())
    assert asyncio.run(governor._exceptions(_Unreadable(), RUN, NOW)) == ([], [], None)  # type: ignore[arg-type]


def test_the_exception_signing_seed_never_reaches_a_run():
    assert "PREFECT_GOVERNANCE_EXCEPTION_SIGNING_KEY" in WORKER_SECRETS


# --- apply and exception list --------------------------------------------------------------


def _document(name: str, expires: datetime, **spec) -> str:
    body = {
        "rules": [RULE],
        "agents": ["cli-agent"],
        "owner": "security@example.com",
        "reason": "backfill",
        "ticket": "SEC-7",
        "expires_at": expires.isoformat(),
        **spec,
    }
    return json.dumps({"kind": "exception", "name": name, "spec": body})


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"attestation": {"kid": "security"}}, "spec.attestation"),
        ({"issued_at": "2026-12-01T00:00:00Z"}, "spec.issued_at"),
        ({"agents": []}, "spec"),
        ({"rules": ["prefect.governance.decision.deny"]}, "spec.rules"),
    ],
)
def test_apply_refuses_a_document_it_must_not_sign(tmp_path, spec, field):
    path = tmp_path / "x.yaml"
    path.write_text(_document("x", datetime.now(timezone.utc) + timedelta(days=1), **spec))
    with pytest.raises(DocumentError) as caught:
        load_documents(path)
    assert caught.value.field == field, caught.value


def test_apply_signs_is_idempotent_and_skips_what_it_cannot_sign(prefect_server, tmp_path):
    now = datetime.now(timezone.utc)
    (tmp_path / "a.yaml").write_text(_document("cli-waiver", now + timedelta(days=3)))
    (tmp_path / "b.yaml").write_text(_document("cli-too-long", now + timedelta(days=200)))
    documents = load_documents(tmp_path)

    async def apply(key=SECURITY):
        changes = await apply_documents(documents, exception_key=key)
        return {c.name: (c.action, c.reason) for c in changes}

    keyless = asyncio.run(apply(None))
    assert all(a == "skipped" and "--exception-key" in r for a, r in keyless.values())
    first = asyncio.run(apply())
    assert first["cli-waiver"][0] in ("created", "updated"), first
    assert first["cli-too-long"][0] == "skipped"
    assert "longer than the maximum" in first["cli-too-long"][1]
    block = asyncio.run(GovernanceException.aload("cli-waiver"))
    verify_exception("cli-waiver", block, PINNED)
    stamped = block.issued_at
    assert asyncio.run(apply())["cli-waiver"] == ("unchanged", None)
    assert asyncio.run(GovernanceException.aload("cli-waiver")).issued_at == stamped
    # an API client tampers with it: applying again signs it again (updated)
    block.expires_at = now + timedelta(days=80)
    asyncio.run(block.asave("cli-waiver", overwrite=True))
    assert asyncio.run(apply())["cli-waiver"][0] == "updated"
    again = asyncio.run(GovernanceException.aload("cli-waiver"))
    assert again.expires_at == datetime.fromisoformat((now + timedelta(days=3)).isoformat())
    verify_exception("cli-waiver", again, PINNED)


def _cli(server, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=prefect_env(server.home, server.api_url, **env),
    )


def test_exception_list_shows_active_expiring_expired_and_unverified(prefect_server, tmp_path):
    now = datetime.now(timezone.utc)

    async def save():
        for name, block in {
            "list-active": signed(
                "list-active", exception(agents=["list-agent"], expires_at=now + timedelta(days=30))
            ),
            "list-soon": signed(
                "list-soon", exception(agents=["list-agent"], expires_at=now + timedelta(hours=5))
            ),
            "list-expired": signed(
                "list-expired",
                exception(agents=["list-agent"], expires_at=now - timedelta(days=1)),
                now=now - timedelta(days=2),
            ),
            "list-forged": signed(
                "list-forged", exception(agents=["list-agent"]), MALLORY_AS_SECURITY
            ),
        }.items():
            await block.asave(name, overwrite=True)

    asyncio.run(save())
    listed = _cli(prefect_server, "exception", "list", "--json", **exception_keys_env())
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in map(json.loads, listed.stdout.splitlines())}
    assert rows["list-active"]["status"] == "active"
    assert rows["list-soon"]["status"] == "expiring"
    assert rows["list-expired"]["status"] == "expired"
    assert rows["list-forged"]["status"] == "unverified"
    assert "does not verify" in rows["list-forged"]["problem"]
    assert rows["list-active"]["agents"] == ["list-agent"] and rows["list-active"]["ticket"]
    soon = _cli(
        prefect_server, "exception", "list", "--expiring-within", "1d", **exception_keys_env()
    )
    assert soon.returncode == 0, soon.stderr
    names = {line.split()[0] for line in soon.stdout.splitlines()[2:]}
    assert "list-soon" in names and not names & {"list-active", "list-expired", "list-forged"}
    table = _cli(prefect_server, "exception", "list", **exception_keys_env())
    assert "parameters.deny" in table.stdout and "agents=list-agent" in table.stdout
    unpinned = _cli(prefect_server, "exception", "list", "--json")
    statuses = {r["name"]: r["status"] for r in map(json.loads, unpinned.stdout.splitlines())}
    assert statuses["list-active"] == "unverified", "without pinned keys nothing verifies"
    bad = _cli(prefect_server, "exception", "list", "--expiring-within", "soon")
    assert bad.returncode == 2


def test_listing_names_an_invalid_block():
    listed = listing(
        {"broken": {"rules": []}, "hostile": "x"},
        keys=PINNED,
        now=NOW,
        within=timedelta(days=7),
        max_lifetime=MAX_LIFETIME,
    )
    assert [(item.name, item.status) for item in listed] == [
        ("broken", "invalid"),
        ("hostile", "invalid"),
    ]
    assert listed[0].row()["expires_at"] is None


def test_keygen_makes_an_exception_key(tmp_path):
    result = subprocess.run(
        [*CLI, "keygen", str(tmp_path / "security.key"), "--exception"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("security=")
    assert "PREFECT_GOVERNANCE_EXCEPTION_KEYS=" in result.stderr
    assert Path(tmp_path / "security.key").stat().st_mode & 0o777 == 0o600
