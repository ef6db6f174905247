"""The per-task posture as pure logic, on the run's side and in the worker's walk (issue 19)."""

from __future__ import annotations

from typing import Any

import pytest

from prefect_governance.core.canonical import sha256_of
from prefect_governance.core.models import GrantPosture, MemorySnapshot, TaskRef, TrustState
from prefect_governance.core.posture import after_task, apply_proposal, start_posture, task_events
from prefect_governance.core.reports import CapabilityUseReport, TaskEndReport
from prefect_governance.core.trust import TrustWeights
from prefect_governance.runtime.posture import RunPosture, TaskState
from prefect_governance.worker.posture import PostureWalk
from tests.grants import example_grant

WEIGHTS = TrustWeights().effective()
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}


def _start(score: float = 0.8, window: list[float] | None = None, memory: Any = None):
    return start_posture(
        TrustState(score=score, window=window or []),
        MemorySnapshot(version=2, content=memory or {"n": 1}),
        schema_hash="sha256:s",
        k=3,
    )


def test_the_posture_continues_the_agents_window_and_moves_per_task():
    posture = _start(0.8, [0.9, 0.85, 0.8, 0.8])
    assert posture.window == [0.85, 0.8, 0.8] and posture.tasks == 0
    assert posture.memory_version == 2 and posture.memory_hash == sha256_of({"n": 1})
    failed = after_task(posture, task_events("failed", blocked=True), WEIGHTS)
    assert failed.score == 0.6  # failed -0.10, capability_blocked -0.10
    assert failed.window == [0.8, 0.8, 0.6] and failed.slope < 0 and failed.tasks == 1
    assert failed.memory_version == 2, "no proposal applied: the memory did not move"
    wrote = after_task(failed, ["completed"], WEIGHTS, memory={"n": 5}, applied=True)
    assert wrote.memory_version == 3 and wrote.memory_hash == sha256_of({"n": 5})


def test_task_events_know_only_task_outcomes():
    assert task_events("memory_rejected", blocked=False) == ["memory_rejected"]
    with pytest.raises(ValueError):
        task_events("warned", blocked=False)


def test_a_proposal_applies_only_under_the_schema():
    assert apply_proposal({"n": 1}, {"n": 2}, SCHEMA) == ({"n": 2}, [])
    kept, errors = apply_proposal({"n": 1}, {"n": -1}, SCHEMA)
    assert errors and "minimum" in errors[0] and kept == {"n": -1}
    assert apply_proposal({}, ["not", "a", "patch"], SCHEMA)[1]


def test_an_unsigned_new_weight_keeps_its_default():
    assert TrustWeights().of("capability_blocked") == -0.10
    assert TrustWeights(capability_blocked=-0.3).of("capability_blocked") == -0.3


# --- the run's side ----------------------------------------------------------------


def _grant(memory: dict[str, Any] | None = None):
    start = _start(0.8, [], memory)
    posture = GrantPosture(start=start, weights=WEIGHTS, memory_schema=SCHEMA)
    grant = example_grant("run-1", decision_id="d-posture", posture=posture)
    return grant.model_copy(
        update={"memory": MemorySnapshot(version=2, content=memory or {"n": 1})}
    )


def test_the_run_applies_accepted_proposals_and_rejects_the_rest(monkeypatch):
    sent: list[tuple[str, dict[str, Any]]] = []

    class Log:
        def add(self, kind: str, event: dict[str, Any], **_: Any) -> int:
            sent.append((kind, event))
            return len(sent)

    monkeypatch.setattr("prefect_governance.runtime.posture.run_log", lambda *_: Log())
    run = RunPosture(_grant())
    ref = TaskRef(name="t", run_id="r1")
    assert run.end(ref, "completed", TaskState(proposals=[{"n": 7}]), ["n"]) == []
    assert run.memory() == {"n": 7} and run.now().memory_version == 3
    errors = run.end(ref, "completed", TaskState(proposals=[{"n": -3}]), ["n"])
    assert errors and run.memory() == {"n": 7}, "a rejected proposal leaves the memory as it was"
    assert [e["outcome"] for _, e in sent] == ["completed", "memory_rejected"]
    assert sent[1][1]["accepted"] is False and sent[1][1]["errors"] == errors
    assert sent[1][1]["posture"]["score"] == pytest.approx(0.82 - 0.15)
    assert run.now().tasks == 2


# --- the worker's walk ---------------------------------------------------------------


def _end(run_id: str, outcome: str, posture, **fields: Any) -> TaskEndReport:
    return TaskEndReport.model_validate(
        {
            "task": {"name": run_id, "run_id": run_id, "attempt": 1},
            "outcome": outcome,
            "blocked": False,
            "posture": posture.model_dump(mode="json"),
            **fields,
        }
    )


def _walk(states: dict[str, str] | None = None) -> PostureWalk:
    start = GrantPosture(start=_start(), weights=WEIGHTS, memory_schema=SCHEMA)
    return PostureWalk(start, {"n": 1}, states or {})


def test_an_honest_report_is_verified():
    walk = _walk({"a": "COMPLETED"})
    walk.commit_decided({"run_id": "a", "attempt": 1}, runs=True, fields=["n"])
    after = after_task(_start(), ["completed"], WEIGHTS, memory={"n": 2}, applied=True)
    end = walk.ended(_end("a", "completed", after, proposals=[{"n": 2}], accepted=True), last=True)
    assert end.check == {"verified": True}
    assert end.patches == [{"n": 2}] and end.memory == {"status": "accepted", "fields": ["n"]}
    assert walk.inherited(after.model_dump(mode="json")) == (after, None)


def test_a_reported_outcome_prefect_contradicts_is_replaced():
    walk = _walk({"a": "FAILED"})
    lie = after_task(_start(), ["completed"], WEIGHTS)
    end = walk.ended(_end("a", "completed", lie), last=True)
    assert end.outcome == "failed" and end.events == ["failed"]
    assert end.check["verified"] is False
    assert "Prefect holds the task run FAILED" in end.check["why"]
    assert end.posture.score == 0.7
    # The next task's input claimed the lie's posture: the worker gives it its own.
    expected, why = walk.inherited(lie.model_copy(update={"tasks": 1}).model_dump(mode="json"))
    assert expected == end.posture and why is not None


def test_a_hidden_blocked_use_and_a_claimed_acceptance_are_caught():
    walk = _walk()
    walk.commit_decided({"run_id": "a", "attempt": 1}, runs=True, fields=["n"])
    walk.used(
        CapabilityUseReport.model_validate(
            {"capability": "x", "granted": False, "task": {"run_id": "a", "attempt": 1}}
        )
    )
    said = after_task(_start(), ["completed"], WEIGHTS, memory={"n": -1}, applied=True)
    end = walk.ended(_end("a", "completed", said, proposals=[{"n": -1}], accepted=True), last=True)
    assert end.outcome == "memory_rejected"
    assert end.events == ["memory_rejected", "capability_blocked"]
    assert end.patches is None and end.memory["status"] == "rejected"
    assert "blocked" in end.check["why"] and "accepted" in end.check["why"]
    assert walk.memory == {"n": 1}


def test_a_refused_commit_is_not_applied():
    walk = _walk()
    walk.commit_decided({"run_id": "a", "attempt": 1}, runs=False, fields=["n"])
    said = after_task(_start(), ["memory_rejected"], WEIGHTS)
    end = walk.ended(
        _end("a", "memory_rejected", said, proposals=[{"n": 3}], accepted=False), last=True
    )
    assert end.check == {"verified": True}
    assert end.memory == {
        "status": "rejected",
        "fields": ["n"],
        "errors": ["the task policy refused the commit"],
    }


@pytest.mark.parametrize(
    ("commit", "why"),
    [
        (None, "no commit decision was reported for them"),
        ((True, []), "its commit decision was asked for fields []; they write ['n']"),
    ],
)
def test_proposals_the_commit_decision_did_not_cover_are_rejected(commit, why):
    walk = _walk()
    if commit is not None:
        walk.commit_decided({"run_id": "a", "attempt": 1}, runs=commit[0], fields=commit[1])
    said = after_task(_start(), ["completed"], WEIGHTS, memory={"n": 2}, applied=True)
    end = walk.ended(_end("a", "completed", said, proposals=[{"n": 2}], accepted=True), last=True)
    assert end.outcome == "memory_rejected" and end.patches is None
    assert end.memory["errors"] == [why]
    assert end.check["verified"] is False


def test_an_admitted_task_the_run_reports_no_end_for_ends_as_prefect_says():
    """Attack: the run hides a failed task's end, so that it costs no trust."""
    import asyncio

    from prefect_governance.core.models import Decision
    from prefect_governance.core.settings import GovernanceSettings
    from prefect_governance.worker.blocks import GovernanceAgent
    from prefect_governance.worker.governor import Assessment, Governor

    grant = _grant()
    agent = GovernanceAgent(id=grant.agent.id, owner="o", trust_scope=["p"], trust_baseline=0.8)
    assessment = Assessment(
        Decision(id="d-posture", verdict="allowed", allow=True, engine="embedded", policy_path="p"),
        agent=agent,
        envelope=grant.envelope,
        policy_input={"agent": grant.agent.model_dump(mode="json")},
    )
    task = {"name": "hidden", "run_id": "t-hidden", "attempt": 1}
    decided = {"seq": 1, "kind": "task_decision", "purpose": "admit", "task": task}
    decided |= {"envelope": {"task": task}, "decision": {"verdict": "allowed"}}
    events, ends = asyncio.run(
        Governor(GovernanceSettings())._inside_events(
            assessment,
            "run-1",
            [{"decision_id": "d-posture", "events": [decided]}],
            {"t-hidden": "FAILED"},
        )
    )
    assert [e.kind for e in events] == ["task_decision", "task_end"]
    end = events[1]
    assert end.verdict == "failed" and end.payload["events"] == ["failed"]
    assert end.payload["check"] == {
        "verified": False,
        "why": "the run reported no end for this task",
    }
    assert len(ends) == 1 and ends[0][1].outcome == "failed"


def test_a_decision_input_without_the_posture_it_should_carry_is_flagged():
    """Attack: the run's code asks the task policy with no posture, or a made-up one."""
    walk = _walk()
    assert walk.inherited(None) == (walk.now, "its input carries no posture")
    made_up = walk.now.model_copy(update={"score": 1.0}).model_dump(mode="json")
    expected, why = walk.inherited(made_up)
    assert expected == walk.now and why == "the posture in its input differs from the worker's"
    ahead = walk.now.model_copy(update={"tasks": 3}).model_dump(mode="json")
    assert "claims 3 task ends" in str(walk.inherited(ahead)[1])
