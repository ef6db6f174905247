"""The realistic records the lineage and scale benchmarks write.

One run of an agent leaves what the worker leaves: a decision (with its envelope
of 20 parameters), an outcome and a trust update.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

from common import ROOT

from prefect_governance.core.models import Decision
from prefect_governance.core.signing import SigningKey
from prefect_governance.lineage.events import LineageEvent, decision_event, outcome_event

EXAMPLE = ROOT / "policies/examples/allowed/input.json"


def policy_input(parameters: int = 20) -> dict[str, Any]:
    """The packaged `allowed` example, its envelope padded to ``parameters`` parameters."""
    document = json.loads(EXAMPLE.read_text())
    params = document["envelope"]["parameters"]
    for i in range(parameters - len(params)):
        params[f"option_{i}"] = f"value-{i}"
    return document


_ENVELOPE = policy_input()["envelope"]


# The lineage key the benchmarks sign with, as a governed worker does.
KEY = SigningKey.from_seed("bench-lineage", "YmVuY2gtbGluZWFnZS1rZXktc2VlZC0wMDAwMDAwMDA")


def decision_record(agent_id: str, run: int) -> LineageEvent:
    """The decision record of one allowed run."""
    decision = Decision(
        id=str(uuid.uuid4()),
        verdict="allowed",
        allow=True,
        annotations={"governance.agent": agent_id},
        engine="embedded",
        policy_path="prefect/governance/decision",
        policy_revision="sha256:" + "0" * 64,
        latency_ms=0.25,
    )
    envelope = {**_ENVELOPE, "id": str(uuid.uuid4())}
    return decision_event(
        decision, agent_id=agent_id, flow_run_id=f"run-{run}", envelope=envelope, worker="bench"
    )


def run_records(agent_id: str, run: int, score: float) -> list[LineageEvent]:
    """What one completed run leaves: decision, outcome, trust update."""
    decision = decision_record(agent_id, run)
    return [
        decision,
        outcome_event(
            agent_id=agent_id,
            flow_run_id=decision.flow_run_id or "",
            decision_id=decision.decision_id,
            state="COMPLETED",
        ),
        LineageEvent(
            kind="trust",
            agent_id=agent_id,
            flow_run_id=decision.flow_run_id,
            decision_id=decision.decision_id,
            payload={"score": score, "previous": score, "events": ["completed"]},
        ),
    ]


def history(agent_id: str, events: int, *, batch: int = 1000) -> Iterator[list[LineageEvent]]:
    """``events`` prior records of an agent (whole runs), in batches for one transaction each."""
    pending: list[LineageEvent] = []
    run = 0
    while run * 3 < events:
        pending.extend(run_records(agent_id, run, 0.9 + (run % 10) / 100))
        run += 1
        if len(pending) >= batch:
            yield pending
            pending = []
    if pending:
        yield pending
