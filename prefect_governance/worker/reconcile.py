"""Settle runs whose decision the lineage holds but whose outcome it lacks.

A worker killed between a decision and the run's end leaves such runs behind:
one that never started sits PENDING, one that ran to its end (the flow process
outlives its worker) holds a final state in Prefect that nobody recorded. The
governed worker reconciles them from Prefect's own state: a final state is
recorded as the run's outcome (with its memory proposals and trust update); a
run still PENDING with no process long after its decision is marked CRASHED,
never started again, so no run executes twice or without a decision. Only runs
of the worker's own pool are settled, and only those whose deciding worker is
gone: neither a run this worker is still handling nor one of another online
worker.

Each pass also records, in the agent's chain, every start of the pool's runs
that the gate refused (by whatever worker made it: a stock worker on the pool,
a replayed grant), once per refusal.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import anyio
from prefect.client.schemas.objects import WorkerStatus
from prefect.exceptions import ObjectNotFound
from prefect.states import Crashed

from prefect_governance.core.models import MemorySnapshot
from prefect_governance.lineage.events import LineageEvent, decision_from_event, gate_refusal_event
from prefect_governance.lineage.store import as_utc
from prefect_governance.worker.governor import AgentUnavailable, Assessment, load_agent

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient

    from prefect_governance.lineage.store import LineageStore
    from prefect_governance.worker.governor import Governor

Action = Literal["record", "crash", "wait"]

NEVER_STARTED = (
    "the governed worker stopped between the decision and the start; the run never started"
)


def settle_action(
    *,
    state_type: str | None,
    is_final: bool,
    has_process: bool,
    decided_at: datetime,
    ended_at: datetime | None,
    now: datetime,
    grace: timedelta,
) -> Action:
    """What to do with a run whose outcome the lineage lacks (pure)."""
    if is_final:
        # The worker that ran it records its outcome as it ends: give it the grace.
        return "record" if ended_at is None or now - ended_at >= grace else "wait"
    if state_type == "PENDING" and not has_process and now - decided_at >= grace:
        return "crash"
    return "wait"


def is_orphan(
    payload: dict[str, Any], *, pool: str, worker: str, in_flight: set[str], online: set[str]
) -> bool:
    """Whether a decision of this pool was left by a worker that no longer handles it (pure).

    A run this worker is still handling, or one decided by another worker that is
    online, is that worker's to settle.
    """
    envelope = payload.get("envelope") or {}
    if (envelope.get("work_pool") or {}).get("name") != pool:
        return False
    decided_by = payload.get("worker")
    if decided_by == worker:
        return (envelope.get("flow_run") or {}).get("id") not in in_flight
    return decided_by not in online


async def reconcile(
    governor: Governor,
    client: PrefectClient,
    store: LineageStore,
    *,
    pool: str,
    worker: str,
    in_flight: set[str],
) -> list[str]:
    """One pass over the pool's unsettled runs; a line for each run settled."""
    grace = timedelta(seconds=governor.settings.reconcile_grace)
    online = {
        w.name
        for w in await client.read_workers_for_work_pool(pool)
        if w.status == WorkerStatus.ONLINE and w.name != worker
    }
    settled: list[str] = []
    for event in await anyio.to_thread.run_sync(store.unsettled):
        payload = event.payload or {}
        if not is_orphan(payload, pool=pool, worker=worker, in_flight=in_flight, online=online):
            continue
        line = await _settle(governor, client, store, event, grace)
        if line:
            settled.append(line)
    return settled


async def _settle(
    governor: Governor,
    client: PrefectClient,
    store: LineageStore,
    event: LineageEvent,
    grace: timedelta,
) -> str | None:
    flow_run_id = event.flow_run_id
    try:
        # Typed UUID; Prefect puts any id string in the URL (a missing one is not found).
        flow_run = await client.read_flow_run(flow_run_id)  # type: ignore[arg-type]
    except ObjectNotFound:
        flow_run = None
    now = datetime.now(timezone.utc)
    message: str | None
    if flow_run is None:
        state, message = "UNKNOWN", "the flow run no longer exists in Prefect"
    else:
        current = flow_run.state
        action = settle_action(
            state_type=current.type.value if current else None,
            is_final=bool(current and current.is_final()),
            has_process=bool(flow_run.infrastructure_pid),
            decided_at=as_utc(event.created_at),
            ended_at=flow_run.end_time or (current.timestamp if current else None),
            now=now,
            grace=grace,
        )
        if action == "wait":
            return None
        if action == "crash":
            await client.set_flow_run_state(flow_run.id, Crashed(message=NEVER_STARTED))
            state, message = "CRASHED", NEVER_STARTED
        else:
            state, message = current.type.value, current.message  # type: ignore[union-attr]
    assessment = await _assessment_of(client, event, governor.settings.agent_keys)
    proposals: list[dict[str, Any]] = []
    reported: list[dict[str, Any]] = []
    task_states: dict[str, str] = {}
    if flow_run is not None:  # only what verifies with the run's report secret
        proposals, reported, task_states = await governor.run_reports(
            client, flow_run.id, assessment
        )
    recorded = await governor.record_run_end(
        store,
        assessment,
        str(flow_run_id),
        state,
        message=message,
        proposals=proposals,
        reported=reported,
        task_states=task_states,
    )
    return f"flow run {flow_run_id}: {state} ({message})" if recorded else None


async def _assessment_of(
    client: PrefectClient, event: LineageEvent, keys: Mapping[str, str]
) -> Assessment:
    """The decision as recorded, with the agent (as its block reads now, verified against
    the pinned keys like the worker's) and memory base."""
    payload = event.payload or {}
    block = payload.get("agent_block")
    agent = None
    if block:
        try:
            agent = await load_agent(client, block, keys)
        except AgentUnavailable:
            agent = None  # unusable or unsigned: the outcome is still recorded, without
            # memory or trust
    if agent is not None and agent.id != event.agent_id:
        agent = None  # the block now holds another agent: do not charge it
    version = ((payload.get("envelope") or {}).get("memory") or {}).get("version", 0)
    return Assessment(
        decision_from_event(event),
        agent=agent,
        memory=MemorySnapshot(version=version),
        agent_block=block,
    )


# --- attempts the gate refused -------------------------------------------------------

GATE_PREFIX = "prefect-governance gate:"
GATE_PAGE = 200  # the newest crashed runs of the pool looked at per pass


def foreign_start(flow_run: Any, governed_type: str) -> str | None:
    """Why a crashed run of a governed pool was a start by another kind of worker (pure).

    Such a worker cannot start the pool's command (see prefect_governance.gate), so
    Prefect records only that the run could not start; this says why.
    """
    labels = flow_run.labels or {}
    worker_type = labels.get("prefect.worker.type")
    if not worker_type or worker_type == governed_type or labels.get("governance.decision"):
        return None
    return (
        f"{GATE_PREFIX} refused: a worker of type {worker_type!r} "
        f"({labels.get('prefect.worker.name')}) took this run of a governed pool; its runs "
        f"start only through a {governed_type} worker (the pool's command cannot start "
        "elsewhere), so nothing ran"
    )


async def _agent_of(client: PrefectClient, flow_run: Any, keys: Mapping[str, str]) -> str | None:
    """The agent a run acts as: as decided, else as its deployment names it."""
    labels = flow_run.labels or {}
    if labels.get("governance.agent"):
        return labels["governance.agent"]
    if flow_run.deployment_id is None:
        return None
    try:
        deployment = await client.read_deployment(flow_run.deployment_id)
        name = (deployment.job_variables or {}).get("agent")
        return (await load_agent(client, name, keys)).id if name else None
    except (ObjectNotFound, AgentUnavailable):
        return None


async def record_gate_refusals(
    client: PrefectClient,
    store: LineageStore,
    *,
    pool: str,
    known: set[str],
    governed_type: str,
    agent_keys: Mapping[str, str],
) -> list[str]:
    """Record in the agents' chains each start of the pool's runs the gate refused, once.

    A start by another kind of worker (which cannot start the pool's command) is
    first restated as the gate's refusal, so the run's state says why.
    ``known`` holds the refusals (Prefect state ids) this worker already found in the
    lineage: later passes skip them without asking the lineage again.
    """
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    runs = await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CRASHED]))
        ),
        work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
        sort=FlowRunSort.EXPECTED_START_TIME_DESC,
        limit=GATE_PAGE,
    )
    recorded = []
    for flow_run in runs:
        state = flow_run.state
        if state is None:
            continue
        if not (state.message or "").startswith(GATE_PREFIX):
            reason = foreign_start(flow_run, governed_type)
            if reason is None:
                continue
            await client.set_flow_run_state(flow_run.id, Crashed(message=reason), force=True)
            flow_run = await client.read_flow_run(flow_run.id)
            state = flow_run.state
            if state is None:
                continue
        if str(state.id) in known:
            continue
        seen = await anyio.to_thread.run_sync(
            partial(store.recent, 200, flow_run_id=str(flow_run.id))
        )
        if not any(
            e.kind == "gate_refusal" and e.payload.get("state_id") == str(state.id) for e in seen
        ):
            event = gate_refusal_event(flow_run, await _agent_of(client, flow_run, agent_keys))
            await anyio.to_thread.run_sync(store.append, event)
            recorded.append(
                f"flow run {flow_run.id}: a start refused by the gate ({state.message})"
            )
        known.add(str(state.id))
    return recorded
