"""One typed payload per kind of lineage record (issue 17, 3): every kind the package
writes is in ``EventKind``, and what each factory stores is its model's fields exactly."""

from __future__ import annotations

from datetime import datetime, timezone
from types import SimpleNamespace
from typing import get_args

from prefect_governance.core.models import Decision
from prefect_governance.lineage import events
from prefect_governance.lineage.events import LineageEvent
from prefect_governance.lineage.memory import CommitResult


def _written() -> list[LineageEvent]:
    decision = Decision(id="d", verdict="allowed", allow=True, engine="e", policy_path="p")
    common = {"agent_id": "a", "flow_run_id": "f"}
    mine = {**common, "decision_id": "d"}
    state = SimpleNamespace(id="s", timestamp=datetime.now(timezone.utc), message="refused")
    flow_run = SimpleNamespace(id="f", labels={"prefect.worker.type": "process"}, state=state)
    use = {"seq": 2, "capability": "c", "granted": True}
    return [
        events.decision_event(decision, envelope={"id": "env"}, **common),
        events.outcome_event(decision_id="d", state="COMPLETED", **common),
        events.task_decision_event(
            {"seq": 1, "decision": {"verdict": "allowed"}},
            parent_decision_id="d",
            check={"verified": True},
            **common,
        ),
        events.capability_use_event(use, parent_decision_id="d", **common),
        events.capability_use_event(
            use, parent_decision_id="d", check={"verified": True}, **common
        ),
        events.report_problem_event(["missing"], parent_decision_id="d", **common),
        events.task_end_event(
            {"seq": 3, "task": {"name": "t", "run_id": "r"}, "outcome": "completed"},
            parent_decision_id="d",
            outcome="completed",
            events=["completed"],
            posture={"score": 0.9},
            check={"verified": True},
            **common,
        ),
        events.memory_commit_event(
            CommitResult(True, version=1, content_hash="h"),
            schema_hash="s",
            base_version=0,
            **mine,
        ),
        events.memory_rejected_event(["bad"], base_version=0, **mine),
        events.memory_discarded_event("failed", base_version=0, **mine),
        events.trust_event(score=0.9, previous=1.0, events=["completed"], **mine),
        events.gate_refusal_event(flow_run, "a"),
        events.unvouched_event("a", 1, 2, "unsigned"),
    ]


def test_every_kind_written_is_a_kind_with_a_payload_model():
    written = _written()
    assert {e.kind for e in written} == set(events.EVENT_KINDS) == set(events.PAYLOADS)
    assert get_args(events.EventKind) == events.EVENT_KINDS
    for e in written:
        model = events.PAYLOADS[e.kind]
        assert model.model_validate(e.payload).stored() == e.payload, e.kind


def test_a_blocked_use_stores_no_check():
    blocked = events.capability_use_event(
        {"seq": 1, "capability": "c", "granted": False, "reason": "no"},
        agent_id="a",
        flow_run_id="f",
        parent_decision_id="d",
    )
    assert "check" not in blocked.payload and blocked.verdict == "blocked"
