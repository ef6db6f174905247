"""Attack: the per-task posture, from the flow's own code (issue 19).

The flow's code holds the run's report secret, so every batch it sends verifies: it can
report any task decision and any task end it likes, in any order. What the worker
keeps is its own walk over those reports (``Governor._inside_events``), with Prefect's
task run states (``read_task_states``) as the only outside word. Each test feeds the
worker reports such a run could send, with the real walk and the real governor, and
asserts that the lineage does not keep trust higher, or memory other, than happened.

Tests marked ``xfail(strict=True, reason="HOLE: ...")`` are doors that are open today.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from prefect_governance.core.models import Decision, TaskPosture
from prefect_governance.core.posture import after_task
from prefect_governance.core.settings import GovernanceSettings
from prefect_governance.lineage.events import LineageEvent
from prefect_governance.worker.blocks import GovernanceAgent
from prefect_governance.worker.governor import Assessment, Governor
from prefect_governance.worker.posture import TaskEnd
from tests.test_governed_tasks import rising, run_governed, signed_env
from tests.test_task_posture import SCHEMA, _grant

__all__ = ["signed_env"]  # the fixture that hands the run its signed grant

GRANT = _grant()
AGENT = GovernanceAgent(
    id=GRANT.agent.id, owner="o", trust_scope=["p"], trust_baseline=0.8, memory_schema=SCHEMA
)
ASSESSMENT = Assessment(
    Decision(id="d-posture", verdict="allowed", allow=True, engine="embedded", policy_path="p"),
    agent=AGENT,
    envelope=GRANT.envelope,
    policy_input={"agent": GRANT.agent.model_dump(mode="json")},
    memory=GRANT.memory,
)
_POSTURE = ASSESSMENT.posture()
assert _POSTURE is not None
START, WEIGHTS = _POSTURE.start, _POSTURE.weights  # the worker's start, as it computes it


class Run:
    """The reports one run sends, numbered in order, and the posture it claims."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.posture: TaskPosture = START

    def _add(self, kind: str, **fields: Any) -> None:
        self.events.append({"seq": len(self.events) + 1, "kind": kind, **fields})

    def admit(self, run_id: str, attempt: int = 1) -> None:
        task = {"name": run_id, "run_id": run_id, "attempt": attempt}
        self._add(
            "task_decision",
            purpose="admit",
            task=task,
            envelope={"task": task},
            decision={"verdict": "allowed"},
            posture=self.posture.model_dump(mode="json"),
        )

    def commit(self, run_id: str, fields: list[str], attempt: int = 1) -> None:
        task = {"name": run_id, "run_id": run_id, "attempt": attempt}
        self._add(
            "task_decision",
            purpose="commit",
            task=task,
            envelope={"task": task, "memory": {"proposed": fields}},
            decision={"verdict": "allowed"},
            posture=self.posture.model_dump(mode="json"),
        )

    def end(
        self,
        run_id: str,
        outcome: str,
        attempt: int = 1,
        proposals: list[Any] | None = None,
        memory: Any = None,
    ) -> None:
        """A task end whose posture is the one the worker computes for it, so that only
        the walk's own checks can catch the lie."""
        self.posture = after_task(
            self.posture, [outcome], WEIGHTS, memory=memory, applied=memory is not None
        )
        extra: dict[str, Any] = {}
        if proposals is not None:
            extra = {"proposals": proposals, "accepted": memory is not None}
        self._add(
            "task_end",
            task={"name": run_id, "run_id": run_id, "attempt": attempt},
            outcome=outcome,
            blocked=False,
            posture=self.posture.model_dump(mode="json"),
            **extra,
        )


def worker(
    run: Run, states: dict[str, str]
) -> tuple[list[LineageEvent], list[tuple[LineageEvent, TaskEnd]]]:
    """What the worker keeps of the run's reports, with Prefect's task run states."""
    batch = {"decision_id": "d-posture", "events": run.events}
    return asyncio.run(
        Governor(GovernanceSettings())._inside_events(ASSESSMENT, "run-1", [batch], states)
    )


def flagged(events: list[LineageEvent]) -> list[str]:
    """Every doubt the lineage records: unverified checks and report problems."""
    found = [
        str(e.payload["check"].get("why"))
        for e in events
        if isinstance(e.payload.get("check"), dict) and e.payload["check"].get("verified") is False
    ]
    return found + [str(e.payload) for e in events if e.kind == "report_problem"]


def final_score(ends: list[tuple[LineageEvent, TaskEnd]]) -> float:
    return ends[-1][1].posture.score if ends else START.score


# --- doors that hold --------------------------------------------------------------


def test_a_failed_task_reported_completed_costs_its_trust():
    run = Run()
    run.admit("t1")
    run.end("t1", "completed")
    events, ends = worker(run, {"t1": "FAILED"})
    assert [end.outcome for _, end in ends] == ["failed"]
    assert final_score(ends) == pytest.approx(START.score - 0.10)
    assert any("Prefect holds the task run FAILED" in why for why in flagged(events))


def test_a_hidden_end_after_three_failures_still_costs_trust():
    """The run admits a fourth task after trust fell three times and reports no end."""
    run = Run()
    for name in ("a", "b", "c"):
        run.admit(name)
        run.end(name, "failed")
    run.admit("d")
    events, ends = worker(run, {"a": "FAILED", "b": "FAILED", "c": "FAILED", "d": "FAILED"})
    assert [end.outcome for _, end in ends] == ["failed"] * 4
    assert final_score(ends) == pytest.approx(START.score - 0.40)
    assert "the run reported no end for this task" in flagged(events)


def test_a_proposal_outside_the_schema_is_never_committed():
    run = Run()
    run.admit("t1")
    run.commit("t1", ["n"])
    run.end("t1", "completed", proposals=[{"n": -7}], memory={"n": -7})
    events, ends = worker(run, {"t1": "COMPLETED"})
    (_, end) = ends[0]
    assert end.patches is None and end.outcome == "memory_rejected"
    assert any("accepted" in why for why in flagged(events))


def test_a_proposal_beyond_the_fields_its_commit_was_asked_for_is_never_committed():
    run = Run()
    run.admit("t1")
    run.commit("t1", ["n"])
    run.end(
        "t1", "completed", proposals=[{"n": 2}, {"admin": True}], memory={"n": 2, "admin": True}
    )
    events, ends = worker(run, {"t1": "COMPLETED"})
    (_, end) = ends[0]
    assert end.patches is None and end.memory is not None and end.memory["status"] == "rejected"
    assert flagged(events)


def test_a_commit_of_a_task_that_failed_is_discarded():
    """The run commits memory for a task Prefect holds failed, claiming it completed."""
    run = Run()
    run.admit("t1")
    run.commit("t1", ["n"])
    run.end("t1", "completed", proposals=[{"n": 9}], memory={"n": 9})
    _, ends = worker(run, {"t1": "FAILED"})
    (_, end) = ends[0]
    assert end.patches is None and end.memory is not None and end.memory["status"] == "discarded"


# --- doors the first attack found open, now closed: an end (and a commit) counts only
# for a task run and attempt the worker saw admitted, once ---------------------------


def test_an_end_for_a_task_that_never_existed_raises_no_trust():
    run = Run()
    for i in range(10):
        run.end(f"phantom-{i}", "completed")
    events, ends = worker(run, {})
    assert final_score(ends) <= START.score or len(flagged(events)) >= 10


@pytest.mark.parametrize("attempts", [[1, 1, 1, 1], [1, 2, 3, 4]])
def test_one_task_run_ends_once_per_admitted_attempt(attempts: list[int]):
    run = Run()
    run.admit("t1")
    for attempt in attempts[:-1]:
        run.end("t1", "completed", attempt=attempt)
    run.end("t1", "failed", attempt=attempts[-1])
    events, ends = worker(run, {"t1": "FAILED"})
    assert final_score(ends) <= START.score - 0.10 + 1e-9 or flagged(events)


def test_a_task_the_policy_would_refuse_cannot_end_unflagged_without_its_admission():
    run = Run()
    for name in ("a", "b", "c"):
        run.admit(name)
        run.end(name, "failed")
    run.end("d", "completed")  # ran without asking: no task_decision reported for it
    states = {"a": "FAILED", "b": "FAILED", "c": "FAILED", "d": "COMPLETED"}
    events, ends = worker(run, states)
    fell = ends[2][1].posture.window
    assert fell[0] > fell[1] > fell[2], "the posture d inherited fell across three tasks"
    assert [e.kind for e in events].count("task_decision") == 3
    assert len(flagged(events)) >= 1, "an end without an admission should be flagged"


@pytest.mark.xfail(
    strict=True,
    reason=(
        "HOLE: a Prefect state that is still not final (RUNNING, PENDING, ...) when the "
        "worker settles (it reads again for 5 s) does not contradict a reported 'completed' "
        "end: it is recorded unverified (check verified None), and trust moves as the run says"
    ),
)
@pytest.mark.parametrize("state", ["RUNNING", "PENDING", "SCHEDULED", "PAUSED"])
def test_a_task_prefect_never_saw_finish_is_not_verified_completed(state: str):
    run = Run()
    run.admit("t1")
    run.end("t1", "completed")
    events, ends = worker(run, {"t1": state})
    assert ends[0][1].outcome != "completed" or flagged(events)


def test_memory_cannot_be_committed_by_a_task_that_never_ran():
    run = Run()
    run.commit("ghost", ["n"])
    run.end("ghost", "completed", proposals=[{"n": 42}], memory={"n": 42})
    events, ends = worker(run, {})
    assert all(end.patches is None for _, end in ends) or flagged(events)


# --- against a real Prefect server --------------------------------------------------


@pytest.mark.xfail(
    strict=True,
    reason=(
        "HOLE: Prefect's task run state, the worker's only outside word on a task's outcome, "
        "is writable by the run's own code: a forced Completed over a failed governed task "
        "is what read_task_states returns, so a 'completed' end for it is recorded verified"
    ),
)
def test_the_run_cannot_rewrite_the_prefect_state_the_worker_checks_against(
    prefect_server, signed_env
):
    from prefect import flow, get_client, task
    from prefect.states import Completed, State

    from prefect_governance import govern, governed
    from prefect_governance.worker.run_reports import read_task_states

    @governed
    @task
    def breaks() -> None:
        raise RuntimeError("the task really failed")

    @govern
    @flow
    def rewrites() -> str:
        failed: State = breaks(return_state=True)  # type: ignore[assignment]
        assert failed.state_details.task_run_id is not None
        task_run_id = failed.state_details.task_run_id
        with get_client(sync_client=True) as client:  # the flow's own API access
            client.set_task_run_state(task_run_id, Completed(), force=True)
        return str(task_run_id)

    state, events, _ = run_governed(rewrites, {}, signed_env, grants=[], posture=rising())
    task_run_id = state.result()
    ends = [e for e in events if e.kind == "task_end"]
    assert [e.outcome for e in ends] == ["failed"], "the run's own wrapper reported it failed"

    async def prefect_says() -> dict[str, str]:
        async with get_client() as client:
            return await read_task_states(client, state.state_details.flow_run_id)

    states = asyncio.run(prefect_says())
    # An insider who holds the report secret now reports the end 'completed': the worker
    # finds it consistent with what Prefect holds, unless Prefect still holds it failed.
    assert states[task_run_id] == "FAILED"
