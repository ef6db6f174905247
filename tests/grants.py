"""A grant as a governed worker signs it, for tests that hand one to a run themselves."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

from prefect_governance.core.models import Grant
from tests.conftest import POLICIES


def example_grant(
    flow_run_id: str,
    *,
    decision_id: str,
    expires_in: timedelta = timedelta(minutes=10),
    constraints: dict[str, Any] | None = None,
    **fields: Any,
) -> Grant:
    """The `allowed` example's agent and envelope, issued for this flow run and decision.

    ``constraints`` are added to the agent's; ``fields`` are the grant's other fields
    (grants, engine, ...).
    """
    policy_input = json.loads((POLICIES / "examples" / "allowed" / "input.json").read_text())
    envelope = policy_input["envelope"]
    now = datetime.now(timezone.utc)
    envelope.update(
        issued_at=(now - timedelta(minutes=20)).isoformat(),
        expires_at=(now + expires_in).isoformat(),
    )
    envelope["flow_run"]["id"] = flow_run_id
    envelope["id"] = f"envelope-{flow_run_id}-{decision_id}"  # one per run and decision
    policy_input["agent"]["constraints"].update(constraints or {})
    return Grant(
        decision_id=decision_id,
        verdict="allowed",
        envelope=envelope,
        agent=policy_input["agent"],
        memory={},
        **fields,
    )
