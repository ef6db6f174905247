"""The worker's own account of a run's per-task posture, from the run's reports.

The run reports each governed task's end with the posture it computed (``task_end``).
The worker does not take its word for it: walking the authenticated reports in order,
it recomputes the posture from the grant's start with the same pure functions
(``core.posture``), takes each task's outcome from Prefect's task run state where the
run's word differs, checks each memory proposal against the agent's schema itself, and
gives each task decision's check the posture the task should have inherited. Where the
run's account differs, the task's record says so (``check`` false, with why); the
worker's computation is what the lineage keeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prefect_governance.core.models import GrantPosture, TaskPosture
from prefect_governance.core.posture import (
    OUTCOMES,
    after_task,
    apply_proposal,
    proposed_fields,
    task_events,
)
from prefect_governance.core.reports import CapabilityUseReport, TaskEndReport

# Prefect's final task run states, and the run's outcomes each is consistent with.
_CONSISTENT = {
    "COMPLETED": ("completed",),
    "FAILED": ("failed", "refused", "memory_rejected"),
    "CRASHED": ("crashed",),
    "CANCELLED": ("crashed",),
}
_FROM_PREFECT = {"COMPLETED": "completed", "FAILED": "failed", "CRASHED": "crashed"}


@dataclass
class TaskEnd:
    """One task's end as the worker holds it: what the lineage records and commits."""

    report: TaskEndReport
    outcome: str
    events: list[str]
    posture: TaskPosture
    patches: list[dict[str, Any]] | None  # the proposals to commit (None: none accepted)
    memory: dict[str, Any] | None  # the memory change, before the commit (None: none)
    check: dict[str, Any]


@dataclass
class PostureWalk:
    """The posture through a run's reported events, in their order."""

    start: GrantPosture
    memory: Any
    task_states: dict[str, str] = field(default_factory=dict)  # task run id -> state type
    postures: list[TaskPosture] = field(default_factory=list)  # after 0, 1, ... task ends
    ends: list[TaskEnd] = field(default_factory=list)
    _blocked: set[tuple[str, Any]] = field(default_factory=set)  # (task run id, attempt)
    _commits: dict[tuple[str, Any], tuple[bool, Any]] = field(default_factory=dict)
    _last_end: dict[str, int] = field(default_factory=dict)  # task run id -> its last end

    def __post_init__(self) -> None:
        self.postures = [self.start.start]

    @property
    def now(self) -> TaskPosture:
        return self.postures[-1]

    def inherited(self, claimed: Any) -> tuple[TaskPosture | None, str | None]:
        """The posture a task decision should have seen (after as many task ends as its
        input claims), and why the input's posture differs from it (None: the same)."""
        tasks = claimed.get("tasks") if isinstance(claimed, dict) else None
        if not isinstance(tasks, int) or isinstance(tasks, bool) or tasks < 0:
            return self.now, "its input carries no posture"
        if tasks >= len(self.postures):
            return (
                self.now,
                f"its input claims {tasks} task ends before it; there were {len(self.ends)}",
            )
        expected = self.postures[tasks]
        if claimed != expected.model_dump(mode="json"):
            return expected, "the posture in its input differs from the worker's"
        return expected, None

    def used(self, item: CapabilityUseReport) -> None:
        """A capability use: a blocked one costs its task trust at its end."""
        task = item.task if isinstance(item.task, dict) else None
        if item.granted is not True and task is not None:
            self._blocked.add((str(task.get("run_id")), task.get("attempt")))

    def commit_decided(self, task: Any, runs: bool, fields: Any) -> None:
        """A task's commit decision as the worker holds it, and the fields it was asked for."""
        if isinstance(task, dict):
            self._commits[(str(task.get("run_id")), task.get("attempt"))] = (runs, fields)

    def ended(self, item: TaskEndReport, *, last: bool) -> TaskEnd:
        """One task's end, recomputed; ``last``: no later end of the same task run."""
        task = item.task if isinstance(item.task, dict) else {}
        key = (str(task.get("run_id")), task.get("attempt"))
        why: list[str] = []
        outcome = item.outcome if item.outcome in OUTCOMES else "crashed"
        if item.outcome not in OUTCOMES:
            why.append(f"it reports no known outcome ({item.outcome!r})")
        prefect = self.task_states.get(key[0]) if last else None
        unsure = None
        if prefect in _CONSISTENT and outcome not in _CONSISTENT[prefect]:
            why.append(f"it reports {outcome}; Prefect holds the task run {prefect}")
            outcome = _FROM_PREFECT.get(prefect, "crashed")
        elif prefect is not None and prefect not in _CONSISTENT:
            unsure = (
                f"Prefect holds the task run {prefect} (not ended): its outcome is the run's word"
            )
        blocked = key in self._blocked
        if bool(item.blocked) != blocked:
            why.append(f"it reports blocked={item.blocked!r}; its capability uses say {blocked}")
        patches, memory, content = self._proposals(item, outcome, key, why)
        if memory is not None and memory["status"] == "rejected":
            outcome = "memory_rejected"
        events = task_events(outcome, blocked=blocked)
        posture = after_task(
            self.now, events, self.start.weights, memory=content, applied=patches is not None
        )
        if patches is not None:
            self.memory = content
        if item.posture != posture.model_dump(mode="json"):
            why.append("the posture it reports after the task differs from the worker's")
        self.postures.append(posture)
        check: dict[str, Any] = {"verified": True}
        if unsure is not None:
            check = {"verified": None, "why": unsure}
        if why:
            check = {"verified": False, "why": "; ".join(why), "reported_outcome": item.outcome}
        end = TaskEnd(item, outcome, events, posture, patches, memory, check)
        self.ends.append(end)
        return end

    def _proposals(
        self, item: TaskEndReport, outcome: str, key: tuple[str, Any], why: list[str]
    ) -> tuple[list[dict[str, Any]] | None, dict[str, Any] | None, Any]:
        """The proposals to commit, the memory change record, and the memory after."""
        proposals = item.proposals if isinstance(item.proposals, list) else []
        if not proposals:
            return None, None, self.memory
        fields = sorted({f for p in proposals for f in proposed_fields(p)})
        if outcome != "completed" and outcome != "memory_rejected":
            return (
                None,
                {"status": "discarded", "fields": fields, "reason": f"the task ended {outcome}"},
                self.memory,
            )
        errors: list[str] = []
        content = self.memory
        runs, asked = self._commits.get(key, (False, None))
        if key not in self._commits:
            errors = ["no commit decision was reported for them"]
        elif not runs:
            errors = ["the task policy refused the commit"]
        elif asked != fields:
            errors = [f"its commit decision was asked for fields {asked!r}; they write {fields}"]
        else:
            for patch in proposals:
                content, errors = apply_proposal(content, patch, self.start.memory_schema)
                if errors:
                    break
        accepted = not errors
        if item.accepted is not accepted:
            why.append(f"it reports accepted={item.accepted!r}; the worker finds {accepted}")
        if not accepted:
            return None, {"status": "rejected", "fields": fields, "errors": errors}, self.memory
        return (
            [p for p in proposals if isinstance(p, dict)],
            {"status": "accepted", "fields": fields},
            content,
        )
