"""One governed run with four governed tasks, as its lineage records (built by the
factories): the decision, then each task's decision and end, then the outcome.

Its tasks: ``load`` completes and commits memory v2; ``transform`` fails, and the run
said it completed (the worker's check disagrees); ``write`` has its memory proposal
rejected; ``publish`` is refused because trust fell across the last three tasks.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from prefect_governance.core.models import Decision, TaskPosture
from prefect_governance.lineage.events import (
    LineageEvent,
    decision_event,
    memory_commit_event,
    outcome_event,
    settle_task_end,
    task_decision_event,
    task_end_event,
    trust_event,
)
from prefect_governance.lineage.memory import CommitResult

REJECTED = "notes: 3 is not of type 'string'"
FELL = "trust fell across the last three tasks"
LIED = "the run reported the task completed; its task run ended Failed"


def task_runs(flow_run_id: str) -> dict[str, str]:
    """The task run ids of the run's four tasks (UUIDs that share the flow run's prefix)."""
    return {
        name: f"{flow_run_id[:-2]}{index:02d}"
        for index, name in enumerate(("load", "transform", "write", "publish"), start=11)
    }


def governed_run(agent_id: str, flow_run_id: str, t0: datetime) -> list[LineageEvent]:
    """The run's records, in the order the worker appends them."""
    decision_id = f"dec-{flow_run_id[:8]}"
    common = {"agent_id": agent_id, "flow_run_id": flow_run_id, "parent_decision_id": decision_id}
    runs = task_runs(flow_run_id)
    seq = iter(range(1, 100))

    def at(n: int) -> str:
        return (t0 + timedelta(seconds=n)).isoformat()

    def ref(name: str) -> dict[str, Any]:
        return {"name": name, "run_id": runs[name], "key": f"{name}-0", "attempt": 1}

    def decided(name: str, verdict: str = "allowed", deny: tuple[str, ...] = ()) -> LineageEvent:
        n = next(seq)
        decision = Decision(
            id=f"tdec-{flow_run_id[:4]}-{n}",
            verdict=verdict,
            allow=verdict != "refused",
            deny=list(deny),
            engine="embedded",
            policy_path="prefect/governance/task",
        )
        reported = {
            "seq": n,
            "time": at(n),
            "purpose": "admit",
            "task": ref(name),
            "envelope": {"id": f"tenv-{n}", "task": ref(name)},
            "context": {"time": at(n), "mode": "enforce"},
            "decision": decision.model_dump(mode="json"),
        }
        return task_decision_event(reported, check={"verified": True}, **common)

    def ended(
        name: str,
        outcome: str,
        trust: tuple[float, float],
        window: list[float],
        *,
        memory: dict[str, Any] | None = None,
        said: str | None = None,
    ) -> LineageEvent:
        n = next(seq)
        posture = TaskPosture(
            score=trust[1],
            slope=window[-1] - window[0],
            window=window,
            k=3,
            tasks=n // 2,
            memory_version=2,
            memory_hash="sha256:m2",
            schema_hash="sha256:s",
        ).model_dump(mode="json")
        reported = {"seq": n, "time": at(n), "task": ref(name), "outcome": said or outcome}
        check = {"verified": False, "why": LIED} if said else {"verified": True}
        event = task_end_event(
            reported, outcome=outcome, events=[outcome], posture=posture, check=check, **common
        )
        settle_task_end(event, previous=trust[0], score=trust[1], memory=memory)
        return event

    allowed = Decision(
        id=decision_id, verdict="allowed", allow=True, engine="embedded", policy_path="p"
    )
    records = [
        decision_event(allowed, agent_id=agent_id, flow_run_id=flow_run_id, envelope=None),
        decided("load"),
        ended(
            "load",
            "completed",
            (0.80, 0.82),
            [0.78, 0.80, 0.82],
            memory={
                "status": "committed",
                "version": 2,
                "content_hash": "sha256:m2",
                "fields": ["notes"],
                "errors": [],
                "rebased": False,
            },
        ),
        decided("transform"),
        ended("transform", "failed", (0.82, 0.70), [0.80, 0.82, 0.70], said="completed"),
        decided("write"),
        ended(
            "write",
            "memory_rejected",
            (0.70, 0.62),
            [0.82, 0.70, 0.62],
            memory={
                "status": "rejected",
                "version": None,
                "content_hash": None,
                "fields": ["notes"],
                "errors": [REJECTED],
                "rebased": False,
            },
        ),
        decided("publish", "refused", (FELL,)),
        ended("publish", "refused", (0.62, 0.57), [0.70, 0.62, 0.57]),
        outcome_event(
            agent_id=agent_id, flow_run_id=flow_run_id, decision_id=decision_id, state="FAILED"
        ),
        memory_commit_event(
            CommitResult(committed=True, version=2, content_hash="sha256:m2"),
            agent_id=agent_id,
            flow_run_id=flow_run_id,
            decision_id=decision_id,
            schema_hash="sha256:s",
            base_version=1,
        ),
        trust_event(
            agent_id=agent_id,
            flow_run_id=flow_run_id,
            decision_id=decision_id,
            score=0.57,
            previous=0.80,
            events=["failed", "memory_rejected", "refused"],
        ),
    ]
    for index, record in enumerate(records):
        record.created_at = t0 + timedelta(seconds=index)
    return records
