"""The Prefect events of decisions and settled runs (worker/events.py): names, resources,
payload, redaction; and that nothing in the product reads events (they are information,
not authority)."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from prefect_governance.core.envelope import REDACTED
from prefect_governance.core.models import Decision, MutationEnvelope, Reason
from prefect_governance.core.settings import GovernanceSettings
from prefect_governance.worker.blocks import GovernanceAgent
from prefect_governance.worker.events import PrefectEvents, decision_event, settled_event
from prefect_governance.worker.governor import Assessment
from prefect_governance.worker.observe import Decided, Observers, Settled
from tests.conftest import POLICIES

PATTERNS = GovernanceSettings().redact_patterns
TOKEN = "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"  # a GitHub token's shape
BLOCK_ID = uuid.uuid4()
POOL_ID = uuid.uuid4()


def _envelope(**parameters: Any) -> MutationEnvelope:
    data = json.loads((POLICIES / "examples" / "allowed" / "input.json").read_text())["envelope"]
    data["flow_run"]["tags"] = ["nightly", TOKEN]
    data["parameters"] = parameters
    return MutationEnvelope.model_validate(data)


def _assessment(verdict: str = "refused", **decision: Any) -> Assessment:
    agent = GovernanceAgent(
        id="etl-agent", owner="sec@example.com", trust_scope=["etl"], capabilities=["read:x"]
    )
    agent._block_document_id = BLOCK_ID
    fields: dict[str, Any] = {
        "id": "decision-1",
        "verdict": verdict,
        "allow": verdict != "refused",
        "engine": "embedded",
        "policy_path": "prefect/governance/decision",
        "policy_revision": "sha256:abc",
        "latency_ms": 1.5,
        **decision,
    }
    return Assessment(
        Decision.model_construct(**fields),
        agent=agent,
        envelope=_envelope(api_token=REDACTED, rows=3),
        agent_block="etl-agent-block",
        worker="w1",
    )


WORKER = {
    "prefect.resource.id": "prefect.worker.governed-process.w1",
    "prefect.resource.name": "w1",
    "prefect.worker-type": "governed-process",
}


def _roles(event: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {
        r["prefect.resource.role"]: r
        for r in event["related"]
        if r.get("prefect.resource.role") != "tag"
    }


def test_a_refusal_names_its_run_deployment_flow_agent_pool_policy_and_worker() -> None:
    assessment = _assessment(
        deny=["capability delete:warehouse is not granted"],
        reasons=[
            Reason(
                kind="deny",
                message="capability delete:warehouse is not granted",
                rule="prefect.governance.rules.capabilities.deny",
            )
        ],
    )
    seen = Decided(assessment, "run-1", "etl", lineage_seconds=0.004)
    event = decision_event(seen, PATTERNS, pool_id=str(POOL_ID), worker=WORKER)
    envelope = assessment.envelope
    assert envelope is not None and envelope.deployment is not None
    assert event["event"] == "prefect-governance.decision.refused"
    assert event["resource"]["prefect.resource.id"] == "prefect-governance.decision.decision-1"
    assert event["resource"]["prefect-governance.verdict"] == "refused"
    roles = _roles(event)
    assert roles["flow-run"]["prefect.resource.id"] == "prefect.flow-run.run-1"
    assert (
        roles["deployment"]["prefect.resource.id"] == f"prefect.deployment.{envelope.deployment.id}"
    )
    assert roles["flow"]["prefect.resource.id"] == f"prefect.flow.{envelope.flow.id}"
    assert roles["agent"] == {
        "prefect.resource.id": f"prefect.block-document.{BLOCK_ID}",
        "prefect.resource.role": "agent",
        "prefect.resource.name": "etl-agent-block",
        "prefect-governance.agent-id": "etl-agent",
        "prefect-governance.agent-version": "1",
    }
    assert roles["work-pool"] == {
        "prefect.resource.id": f"prefect.work-pool.{POOL_ID}",
        "prefect.resource.role": "work-pool",
        "prefect.resource.name": "etl",
    }
    assert roles["policy"]["prefect.resource.name"] == "prefect/governance/decision"
    assert roles["policy"]["prefect-governance.policy-revision"] == "sha256:abc"
    assert roles["worker"]["prefect.resource.id"] == WORKER["prefect.resource.id"]
    tags = [
        r["prefect.resource.id"] for r in event["related"] if r["prefect.resource.role"] == "tag"
    ]
    assert "prefect.tag.nightly" in tags
    payload = event["payload"]
    assert payload["reasons"] == [
        {
            "kind": "deny",
            "message": "capability delete:warehouse is not granted",
            "rule": "prefect.governance.rules.capabilities.deny",
        }
    ]
    assert (payload["decision_id"], payload["engine"], payload["latency_ms"]) == (
        "decision-1",
        "embedded",
        1.5,
    )
    assert payload["lineage"] == {"recorded": True, "seconds": 0.004, "error": None}


def test_no_secret_reaches_an_event() -> None:
    """A deny that quotes a secret-shaped tag, an engine error and a lineage failure that
    quote a database URL with its password: none reaches the event."""
    url = "postgresql://governance:s3cr3t-pw@127.0.0.1/lineage"
    assessment = _assessment(
        deny=[f"tag {TOKEN} is not allowed", "api_token ***REDACTED*** is not allowed"],
        error=f"the store at {url} failed",
    )
    seen = Decided(assessment, "run-1", "etl", None, lineage_error=f"OperationalError({url!r})")
    event = decision_event(seen, PATTERNS, worker=WORKER)
    text = json.dumps(event)
    for secret in (TOKEN, "s3cr3t-pw"):
        assert secret not in text
    assert event["payload"]["deny"] == [REDACTED, "api_token ***REDACTED*** is not allowed"]
    assert event["payload"]["reasons"][0] == {"kind": "deny", "message": REDACTED, "rule": None}
    assert event["payload"]["error"] == REDACTED
    assert event["payload"]["lineage"] == {"recorded": False, "seconds": None, "error": REDACTED}
    settled = Settled(assessment, "run-1", "CANCELLED", False, "reconciler", None, repr(url))
    assert "s3cr3t-pw" not in json.dumps(settled_event(settled, PATTERNS, worker=WORKER))


def test_any_verdict_names_its_event_and_an_outcome_is_settled() -> None:
    emitted: list[dict[str, Any]] = []

    class Worker:
        _work_pool = type("Pool", (), {"name": "gov", "id": POOL_ID})()  # the envelope's

        def _event_resource(self) -> dict[str, str]:
            return dict(WORKER)

    observers = Observers()
    observers.add(PrefectEvents(Worker(), PATTERNS, emit=lambda **e: emitted.append(e)))
    observers.decided(Decided(_assessment("awaiting_approval"), "run-1", "gov", 0.01))
    observers.settled(Settled(_assessment("allowed"), "run-1", "COMPLETED", True, "worker", 0.02))
    assert [e["event"] for e in emitted] == [
        "prefect-governance.decision.awaiting_approval",
        "prefect-governance.run.settled",
    ]
    settled = emitted[1]
    assert settled["resource"]["prefect.resource.id"] == "prefect-governance.decision.decision-1"
    assert settled["resource"]["prefect-governance.state"] == "COMPLETED"
    assert {k: settled["payload"][k] for k in ("state", "recorded", "by")} == {
        "state": "COMPLETED",
        "recorded": True,
        "by": "worker",
    }
    for event in emitted:
        assert _roles(event)["work-pool"]["prefect.resource.id"] == f"prefect.work-pool.{POOL_ID}"


def test_a_refusal_before_any_envelope_still_names_its_run_pool_and_policy() -> None:
    from prefect_governance.core.controls import Controls

    assessment = Assessment.refusal(Controls(None, []), "the lineage store is unavailable")
    event = decision_event(Decided(assessment, "run-9", "etl", None, "boom"), PATTERNS)
    assert event["event"] == "prefect-governance.decision.refused"
    assert set(_roles(event)) == {"flow-run", "work-pool", "policy"}
    assert event["payload"]["reasons"][0]["message"] == "the lineage store is unavailable"


@pytest.mark.parametrize(
    "needle",
    [
        "read_events",
        "events/filter",
        "get_events_subscriber",
        "PrefectEventSubscriber",
        "EventsClient",
    ],
)
def test_nothing_in_the_product_reads_prefect_events(needle: str) -> None:
    """Events are information: any API client may emit one of any name, so no decision,
    settlement or guard of the product may rest on them."""
    package = Path(__file__).parents[1] / "prefect_governance"
    readers = [
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if re.search(re.escape(needle), path.read_text())
    ]
    assert readers == []


def test_a_notification_document_is_checked_and_scoped() -> None:
    from prefect_governance.cli.apply import DocumentError, parse_document
    from prefect_governance.cli.automations import Notification, notification_automation

    where = Path("notify.yaml")
    with pytest.raises(DocumentError, match=r"spec\.verdicts"):
        parse_document(
            {
                "kind": "notification",
                "name": "n",
                "spec": {"block": "slack/x", "verdicts": ["a b"]},
            },
            where,
        )
    with pytest.raises(DocumentError, match=r"spec\.block"):
        parse_document({"kind": "notification", "name": "n", "spec": {"block": "x"}}, where)
    document = parse_document(
        {"kind": "notification", "name": "n", "spec": {"block": "custom-webhook/x"}}, where
    )
    assert isinstance(document.block, Notification)
    everywhere = notification_automation("n", document.block, str(BLOCK_ID)).trigger
    assert everywhere.expect == {"prefect-governance.decision.refused"}  # type: ignore[union-attr]
    related = everywhere.match_related  # type: ignore[union-attr]
    assert all(r.root == {} for r in (related if isinstance(related, list) else [related]))
    spec = Notification(block="custom-webhook/x", pools=["b", "a"], verdicts=["audited", "refused"])
    scoped = notification_automation("n", spec, str(BLOCK_ID)).trigger
    assert scoped.expect == {  # type: ignore[union-attr]
        "prefect-governance.decision.audited",
        "prefect-governance.decision.refused",
    }
    related = scoped.match_related  # type: ignore[union-attr]
    related = related[0] if isinstance(related, list) else related
    assert related.root == {
        "prefect.resource.role": "work-pool",
        "prefect.resource.name": ["a", "b"],
    }
