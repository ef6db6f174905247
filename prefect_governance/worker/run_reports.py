"""The worker's side of run reports: reading what a run left as artifacts.

What a run reports (task decisions, capability uses, memory proposals) is only
read here; ``prefect_governance.core.reports`` says which of it to believe.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
)

from prefect_governance.core.handoff import EVENT_KINDS
from prefect_governance.core.reports import RunEvent, run_event

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient

PAGE = 200  # artifacts per read (the server's default limit)


async def read_artifacts(
    client: PrefectClient, flow_run_id: Any, key: str
) -> list[tuple[str, dict[str, Any]]]:
    """(artifact id, JSON data) of a run's artifacts with this key, oldest first (all pages)."""
    import json

    artifacts: list[Any] = []
    while True:
        page = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            limit=PAGE,
            offset=len(artifacts),
        )
        artifacts.extend(page)
        if len(page) < PAGE:
            break
    data = []
    for artifact in sorted(artifacts, key=lambda a: str(a.created)):
        value = artifact.data
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = None
        data.append((str(artifact.id), value if isinstance(value, dict) else {}))
    return data


async def read_artifact_data(
    client: PrefectClient, flow_run_id: Any, key: str
) -> list[dict[str, Any]]:
    """The JSON data of a run's artifacts with this key, oldest first (all pages), as any
    API client left them: not authenticated (the worker reads them through
    ``Governor.run_reports``)."""
    return [data for _, data in await read_artifacts(client, flow_run_id, key)]


FINAL_TASK_STATES = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})


async def read_ended_task_states(
    client: PrefectClient, flow_run_id: Any, *, attempts: int = 10, pause: float = 0.5
) -> dict[str, str]:
    """The run's task run states, read again (``attempts`` times, ``pause`` s apart) while
    some are not final: Prefect records task states from events, a little after the run."""
    import anyio

    states = await read_task_states(client, flow_run_id)
    for _ in range(attempts):
        if all(state in FINAL_TASK_STATES for state in states.values()):
            break
        await anyio.sleep(pause)
        states = await read_task_states(client, flow_run_id)
    return states


async def read_task_states(client: PrefectClient, flow_run_id: Any) -> dict[str, str]:
    """The state type of each of a run's task runs, as Prefect holds it (all pages)."""
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    states: dict[str, str] = {}
    offset = 0
    while True:
        page = await client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id])),
            limit=PAGE,
            offset=offset,
        )
        for task_run in page:
            if task_run.state is not None:
                states[str(task_run.id)] = task_run.state.type.value
        offset += len(page)
        if len(page) < PAGE:
            return states


def reported_events(
    batches: Iterable[dict[str, Any]], decision_id: str
) -> tuple[list[RunEvent], list[str]]:
    """The run's events in order (each once), and what is wrong with what was reported.

    A ``{"rejected": [...]}`` item carries what the worker rejected before (artifacts
    whose MAC did not verify: see ``Governor.run_reports``), reported with the rest.
    """
    by_seq: dict[int, RunEvent] = {}
    problems: list[str] = []
    for batch in batches:
        if "rejected" in batch:
            problems.extend(str(p) for p in batch["rejected"] or [])
            continue
        if batch.get("decision_id") != decision_id:
            problems.append(
                f"a batch of events names another decision ({batch.get('decision_id')!r})"
            )
            continue
        for event in batch.get("events") or []:
            seq = event.get("seq") if isinstance(event, dict) else None
            if not isinstance(seq, int) or event.get("kind") not in EVENT_KINDS:
                problems.append(f"an event that is not a governance event: {str(event)[:200]}")
                continue
            if seq not in by_seq:  # a batch sent twice (a retried send) counts once
                by_seq[seq] = run_event(event["kind"], event)
    if by_seq:
        missing = sorted(set(range(1, max(by_seq) + 1)) - set(by_seq))
        if missing:
            problems.append(f"events missing from the run's report: seq {_ranges(missing)}")
    return [by_seq[seq] for seq in sorted(by_seq)], problems


def _ranges(numbers: list[int]) -> str:
    spans: list[str] = []
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        spans.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(spans)
