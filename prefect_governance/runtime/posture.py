"""The run's posture: trust and memory moved by each governed task as it ends.

It starts from the grant's posture (the agent's at decision time). Each governed task's
end moves it with the agent's trust weights (``core.posture``) and is reported to the
worker (a ``task_end`` event with the posture after it), so the next task's policy input
inherits it. A task's memory proposals are checked against the agent's memory schema when
the task ends: accepted ones apply to the run's memory, which later tasks read with
:func:`current_memory`; a rejected one fails the task (:class:`MemoryRejected`) and costs
trust. After the run the worker recomputes all of it from the reports and keeps its own.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prefect_governance.core.errors import GovernanceError
from prefect_governance.core.models import Grant, TaskPosture, TaskRef
from prefect_governance.core.posture import (
    after_task,
    apply_proposal,
    start_posture,
    task_events,
)
from prefect_governance.core.trust import TrustWeights
from prefect_governance.runtime import current_verified
from prefect_governance.runtime.run_log import run_log


class MemoryRejected(GovernanceError, RuntimeError):
    """A governed task's memory proposal was rejected when the task ended."""

    def __init__(self, task: str, errors: Sequence[str]):
        self.task = task
        self.errors = list(errors)
        super().__init__(
            f"governance rejected the memory proposal of task {task!r}: " + "; ".join(errors)
        )


@dataclass
class TaskState:
    """What one governed task run did that its end reports: proposals, blocked uses."""

    proposals: list[dict[str, Any]] = field(default_factory=list)
    blocked: bool = False


class RunPosture:
    """One flow run's posture, moved by its governed tasks in the order they end."""

    def __init__(self, grant: Grant):
        self.flow_run_id = grant.envelope.flow_run.id
        self.decision_id = grant.decision_id
        if grant.posture is not None:
            start, self.weights = grant.posture.start, dict(grant.posture.weights)
            self.schema = grant.posture.memory_schema
        else:  # a grant without one (an ungoverned run): the defaults
            start = start_posture(
                grant.agent.trust, grant.memory, schema_hash=grant.agent.memory_schema_hash, k=3
            )
            self.weights, self.schema = TrustWeights().effective(), {"type": "object"}
        self._posture = start
        self._memory = copy.deepcopy(grant.memory.content)
        self._lock = threading.Lock()  # the posture, the memory and the order of the ends

    def now(self) -> TaskPosture:
        """The posture the next task inherits."""
        with self._lock:
            return self._posture

    def memory(self) -> dict[str, Any]:
        """The run's memory now: as granted, with every accepted proposal applied."""
        with self._lock:
            return copy.deepcopy(self._memory)

    def end(self, ref: TaskRef, outcome: str, state: TaskState, writes: Sequence[str]) -> list[str]:
        """Move the posture by one task's end and report it; a completed task's proposals
        apply when the memory they make satisfies the schema. Returns why they did not
        (the task then ends ``memory_rejected``)."""
        with self._lock:
            errors: list[str] = []
            memory = self._memory
            if outcome == "completed" and state.proposals:
                for patch in state.proposals:
                    memory, errors = apply_proposal(memory, patch, self.schema)
                    if errors:
                        break
                if errors:
                    outcome, memory = "memory_rejected", self._memory
            applied = outcome == "completed" and bool(state.proposals)
            events = task_events(outcome, blocked=state.blocked)
            self._posture = after_task(
                self._posture, events, self.weights, memory=memory, applied=applied
            )
            self._memory = memory
            run_log(self.flow_run_id, self.decision_id).add(
                "task_end",
                {
                    "task": ref.model_dump(mode="json"),
                    "outcome": outcome,
                    "blocked": state.blocked,
                    "writes": list(writes),
                    "proposals": state.proposals or None,
                    "accepted": applied if state.proposals else None,
                    "errors": errors or None,
                    "posture": self._posture.model_dump(mode="json"),
                },
                urgent=outcome != "completed",
            )
            return errors


_postures: dict[tuple[str, str], RunPosture] = {}  # by flow run and decision
_postures_lock = threading.Lock()


def run_posture(grant: Grant) -> RunPosture:
    """The posture of this grant's flow run (one per run in this process)."""
    with _postures_lock:
        key = (grant.envelope.flow_run.id, grant.decision_id)
        posture = _postures.get(key)
        if posture is None:
            posture = _postures[key] = RunPosture(grant)
        return posture


def current_posture() -> TaskPosture:
    """The posture the next governed task of this run inherits (trust and memory version)."""
    return run_posture(current_verified().grant).now()


def current_memory() -> dict[str, Any]:
    """The agent's memory as this run sees it now: as granted, with the proposals of its
    governed tasks that were accepted so far (committed by the worker after the run)."""
    return run_posture(current_verified().grant).memory()
