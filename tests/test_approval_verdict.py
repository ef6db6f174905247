"""Approvals as a verdict, the pure parts: the decision on a policy's approval request, the
agent's timeout under its signature, when a wait began, and when a recheck is recorded."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from prefect_governance.core.attestation import (
    AttestationError,
    agent_payload,
    signed,
    verify_agent,
)
from prefect_governance.core.decision import TASK_CANNOT_WAIT, decision_for, for_task
from prefect_governance.core.engines.base import EngineAnswer
from prefect_governance.core.models import Approval, Decision, MutationEnvelope
from prefect_governance.core.signing import SigningKey
from prefect_governance.lineage.events import decision_event
from prefect_governance.worker.blocks import GovernanceAgent
from prefect_governance.worker.governor import (
    Assessment,
    awaiting_since,
    same_wait,
    used_approvals,
)
from prefect_governance.worker.report import approval_deadline, awaiting_message

ROOT = Path(__file__).resolve().parent.parent
POLICIES_EXAMPLE_ENVELOPE = json.loads(
    (ROOT / "policies" / "examples" / "allowed" / "input.json").read_text()
)["envelope"]

REQUEST = {"approvers": ["alice"], "timeout_seconds": 600, "reason": "needs alice"}


def _decide(result: dict, mode="enforce") -> Decision:
    return decision_for(
        EngineAnswer(result={"allow": False, **result}, revision="r"),
        engine="embedded",
        policy_path="prefect/governance/decision",
        mode=mode,
        fail_mode="closed",
        decision_id="d-1",
    )


def test_an_approval_request_with_no_deny_waits_and_starts_nothing():
    decision = _decide({"approval": [REQUEST]})
    assert decision.verdict == "awaiting_approval"
    assert decision.waits and not decision.runs and not decision.allow
    assert decision.deny == []  # waiting is no refusal: no reason is invented
    assert decision.approval[0].approvers == ["alice"]


def test_a_policy_that_allows_yet_asks_for_an_approval_still_waits():
    assert _decide({"allow": True, "approval": [REQUEST]}).verdict == "awaiting_approval"


def test_a_deny_outweighs_an_approval_request():
    decision = _decide({"deny": ["no"], "approval": [REQUEST]})
    assert decision.verdict == "refused" and decision.deny == ["no"] and not decision.waits


def test_in_audit_mode_a_run_that_would_wait_runs_and_says_so():
    decision = _decide({"approval": [REQUEST]}, mode="audit")
    assert decision.verdict == "audited" and decision.runs
    assert decision.warn == [
        "audit mode: this run would wait for an approval by one of alice (needs alice)"
    ]


@pytest.mark.parametrize(
    "request_", [{**REQUEST, "timeout_seconds": 0}, {**REQUEST, "extra": 1}, {"approvers": "a"}]
)
def test_a_malformed_approval_request_is_a_refusal(request_):
    decision = _decide({"approval": [request_]})
    assert decision.verdict == "refused" and "wrong shape" in decision.deny[0]


def test_an_agent_signed_before_the_approval_timeout_existed_still_verifies():
    owner = SigningKey.generate("pool-owner")
    pinned = {owner.key_id: owner.public_b64}
    agent = GovernanceAgent(
        id="etl",
        owner="o@example.com",
        trust_scope=["p"],
        constraints={"approval": {"approvers": ["alice"]}},
    )
    payload = agent_payload("etl", agent)
    assert payload["agent"]["constraints"]["approval"] == {"approvers": ["alice"]}
    attested = signed("etl", agent, owner)
    verify_agent("etl", attested, pinned)
    # Setting the timeout after signing breaks the signature (it is signed once set).
    edited = GovernanceAgent.model_validate(
        json.loads(json.dumps(attested.model_dump(mode="json")))
    )
    assert edited.constraints.approval is not None
    edited.constraints.approval.timeout_seconds = 10
    with pytest.raises(AttestationError):
        verify_agent("etl", edited, pinned)
    timed = signed("etl", edited, owner)
    verify_agent("etl", timed, pinned)


def _event(verdict: str, at: datetime, envelope: dict | None = None, **decision) -> object:
    made = Decision(
        id=f"d-{at.timestamp()}",
        verdict=verdict,
        allow=verdict == "allowed",
        engine="embedded",
        policy_path="p",
        **decision,
    )
    event = decision_event(made, agent_id="etl", flow_run_id="run", envelope=envelope)
    event.created_at = at
    return event


T0 = datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc)


def test_the_wait_began_at_the_first_awaiting_decision():
    events = [
        _event("awaiting_approval", T0),
        _event("awaiting_approval", T0 + timedelta(minutes=5)),
    ]
    assert awaiting_since(events) == T0
    assert awaiting_since([]) is None
    assert awaiting_since([_event("refused", T0)]) is None
    naive = _event("awaiting_approval", T0.replace(tzinfo=None))  # as SQLite reads it back
    assert awaiting_since([naive]) == T0


def test_the_first_awaiting_state_bounds_the_wait_when_the_lineage_lost_it():
    """A worker restarted without a lineage key vouches for none of its predecessor's
    records: the run's first AwaitingApproval state still says when the wait began, and an
    API client adding states can only make it earlier (a shorter wait)."""
    state_at = T0 + timedelta(seconds=1)
    assert awaiting_since([], [state_at, state_at + timedelta(minutes=3)]) == state_at
    assert awaiting_since([_event("awaiting_approval", T0)], [state_at]) == T0
    forged_earlier = T0 - timedelta(hours=2)
    assert awaiting_since([_event("awaiting_approval", T0)], [forged_earlier]) == forged_earlier


def test_an_approval_the_run_went_ahead_on_is_spent():
    approval = {"id": "a" * 32, "approver": "alice"}
    earlier = [
        _event("awaiting_approval", T0, envelope={"approvals": []}),
        _event("allowed", T0 + timedelta(minutes=1), envelope={"approvals": [approval]}),
        _event("refused", T0 + timedelta(minutes=2), envelope={"approvals": [{"id": "b" * 32}]}),
    ]
    used = used_approvals(earlier)
    assert used == {"a" * 32: earlier[1].decision_id}  # a refusal spends nothing
    assert used_approvals([]) == {}


def _assessment(earlier, *, approvals=(), **decision) -> Assessment:
    envelope = MutationEnvelope.model_validate(POLICIES_EXAMPLE_ENVELOPE)
    envelope.approvals = list(approvals)
    made = Decision(
        id="now",
        verdict="awaiting_approval",
        allow=False,
        engine="embedded",
        policy_path="p",
        approval=[REQUEST],
        **decision,
    )
    return Assessment(made, envelope=envelope, earlier=earlier)


BOB = Approval(
    id="b0b", approver="bob", binding="flow_run", issued_at=T0, expires_at=T0 + timedelta(hours=1)
)


def test_a_recheck_that_changed_nothing_is_not_recorded_again():
    envelope = json.loads(
        MutationEnvelope.model_validate(POLICIES_EXAMPLE_ENVELOPE).model_dump_json()
    )
    earlier = [_event("awaiting_approval", T0, envelope, approval=[REQUEST])]
    assert same_wait(_assessment(earlier))
    # Something changed: recorded.
    assert not same_wait(_assessment(earlier, approvals=[BOB]))
    assert not same_wait(_assessment(earlier, rejected_approvals=["x: expired"]))
    assert not same_wait(_assessment(earlier, warn=["new warning"]))
    other = [_event("awaiting_approval", T0, envelope, approval=[{**REQUEST, "reason": "other"}])]
    assert not same_wait(_assessment(other))
    # The first wait, or a wait after another verdict, is recorded.
    assert not same_wait(_assessment([]))
    assert not same_wait(_assessment([_event("allowed", T0, envelope)]))


def test_the_state_message_says_who_until_when_and_how():
    decision = _decide(
        {"approval": [REQUEST, {**REQUEST, "approvers": ["bob"], "timeout_seconds": 60}]}
    )
    deadline = approval_deadline(decision, T0)
    assert deadline == T0 + timedelta(seconds=60)  # the shortest timeout
    message = awaiting_message(decision, "run-1", deadline)
    assert message.startswith("Awaiting approval by one of alice, bob until 2026-12-02T12:01:00")
    assert "prefect-governance approve --flow-run run-1 --approver NAME --key FILE" in message


def test_a_task_cannot_wait_an_approval_request_refuses_it():
    decision = for_task(_decide({"approval": [REQUEST]}))
    assert decision.verdict == "refused" and decision.deny == [TASK_CANNOT_WAIT]
    allowed = _decide({"allow": True})
    assert for_task(allowed) is allowed
