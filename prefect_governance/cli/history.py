"""The per-task history: how the ``task_end`` records of an agent's runs read to people.

Each governed task's end is one ``task_end`` record (``lineage.events.TaskEndPayload``):
its outcome, the trust before and after it, the memory change it committed, and whether
the run's word about it agreed with the worker's recomputation (``check``). A run's
history is its decision, its tasks' ends in the order of the chain, and its outcome.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from prefect_governance.lineage.events import LineageEvent
from prefect_governance.lineage.store import LineageStore
from prefect_governance.worker.blocks import GovernanceAgent
from prefect_governance.worker.report import (
    _dict,
    check_cell,
    format_table,
    memory_cell,
    outcome_cell,
    task_label,
    trust_cell,
)

TASK_END = "task_end"


@dataclass
class RunHistory:
    """One flow run's decision, the ends of its governed tasks (in order) and its outcome."""

    flow_run_id: str
    decision: LineageEvent | None = None
    outcome: LineageEvent | None = None
    tasks: list[LineageEvent] = field(default_factory=list)


def run_histories(rows: Iterable[LineageEvent]) -> list[RunHistory]:
    """The runs among a chain's records (in chain order) that have a governed task's end,
    oldest first."""
    runs: dict[str, RunHistory] = {}
    for row in rows:
        if not row.flow_run_id:
            continue
        run = runs.setdefault(row.flow_run_id, RunHistory(row.flow_run_id))
        if row.kind == "decision":
            run.decision = row
        elif row.kind == "outcome":
            run.outcome = row
        elif row.kind == TASK_END:
            run.tasks.append(row)
    return [run for run in runs.values() if run.tasks]


def _run_line(run: RunHistory) -> str:
    decision = run.decision
    decided = f"decided {decision.verdict} ({decision.decision_id})" if decision else "no decision"
    ended = f"ended {run.outcome.state}" if run.outcome else "no outcome yet"
    return f"run {run.flow_run_id[:8]}  {decided}; {ended}"


def history_report(runs: Sequence[RunHistory]) -> str:
    """Each run's governed tasks in order: seq (in the chain), task, outcome, trust before
    -> after, memory change, and where the worker's check disagreed with the run."""
    lines = ["per-task history (oldest run first)"]
    if not runs:
        return f"{lines[0]}: no governed task has ended"
    for run in runs:
        rows = [("seq", "task", "outcome", "trust", "memory", "check")]
        for end in run.tasks:
            payload = _dict(end.payload)
            rows.append(
                (
                    str(end.seq),
                    task_label(payload),
                    outcome_cell(payload),
                    trust_cell(payload),
                    memory_cell(payload),
                    check_cell(payload),
                )
            )
        lines += ["", _run_line(run)]
        lines += ["  " + line for line in format_table(rows).splitlines()]
    return "\n".join(lines)


def agent_text(store: LineageStore, agent: GovernanceAgent, runs: int = 5) -> str:
    """What ``agent show`` prints: identity, memory, trust and its history, then the
    governed tasks of the agent's newest ``runs`` runs that had any."""
    from prefect_governance.worker.governor import agent_state, trust_history
    from prefect_governance.worker.report import agent_report

    trust, memory = agent_state(store, store.memory, agent)
    shown = agent_report(agent, memory, trust, trust_history(store, agent.id, 10_000))
    tasks = history_report(run_histories(store.last_runs_with(agent.id, TASK_END, runs)))
    return f"{shown}\n\n{tasks}"
