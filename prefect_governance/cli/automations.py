"""Server-side guards, shipped as Prefect automations by ``prefect-governance apply``.

A refused run stays refused: Prefect's server lets anyone with API access move
a CANCELLED run back to PENDING or RUNNING. The automation below answers a flow
run that enters either after it was refused (state name ``Refused``, an event
``prefect.flow-run.Refused``) by putting it back to CANCELLED/Refused, within a
second or so, whatever worker or client moved it, for as long as the trigger's
window (a year; Prefect sweeps an armed trigger's bucket once its window has
passed, about a minute after the refusal for a window of zero). Each time it
fires, the run's new Refused state arms it again. The run-side gate already
stops its code from running; this puts the record right and makes the attempt
visible in Prefect's event feed.

A run of a governed pool taken by another kind of worker starts nothing (the
pool's command cannot start outside a governed worker, see
``prefect_governance.gate``); the second automation answers the worker's
``prefect.worker.submitted-flow-run`` event, when the worker's type is not a
governed one and the related work pool is one of the governed pools that existed
when the guards were applied (Prefect's events name a work pool, not its type), by
marking the run Crashed with why, within a second or so (the worker's own report
of the failed start may land after it: the run's history holds both). The governed
worker's reconciler restates such runs, also of pools created since, each pass.

(Prefect 3.8's flow-run events carry no flow-run labels, so an automation cannot
tell a run without a ``governance.decision`` label apart; ``prefect-governance
audit`` finds those.)
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient

REFUSED_STAYS_REFUSED = "prefect-governance-refused-stays-refused"
REFUSED_AGAIN = "prefect-governance: this flow run was refused by governance and may not run"
REFUSED_GUARD_WINDOW = timedelta(days=365)


FOREIGN_WORKERS_START_NOTHING = "prefect-governance-foreign-workers-start-nothing"
FOREIGN_WORKER = (
    "prefect-governance gate: refused: a worker that is not a governed worker took this run "
    "of a governed pool; its runs start only through a governed worker (the pool's command "
    "cannot start elsewhere), so nothing ran"
)


def refused_stays_refused(pools: list[str]) -> AutomationCore:
    """A refused run that enters Pending or Running is put back to CANCELLED/Refused."""
    return AutomationCore(
        name=REFUSED_STAYS_REFUSED,
        description="prefect-governance: a flow run refused by governance stays refused.",
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            after={"prefect.flow-run.Refused"},
            expect={"prefect.flow-run.Pending", "prefect.flow-run.Running"},
            for_each={"prefect.resource.id"},
            posture=Posture.Reactive,
            threshold=1,
            within=REFUSED_GUARD_WINDOW,
        ),
        actions=[
            ChangeFlowRunState(state=StateType.CANCELLED, name="Refused", message=REFUSED_AGAIN)
        ],
    )


def foreign_workers_start_nothing(pools: list[str]) -> AutomationCore:
    """A run of these governed pools submitted by a worker of another type: Crashed, why."""
    return AutomationCore(
        name=FOREIGN_WORKERS_START_NOTHING,
        description="prefect-governance: only a governed worker starts a governed pool's runs "
        f"(pools: {', '.join(pools) or 'none yet'}).",
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.worker.*", "prefect.worker-type": "!governed-*"},
            match_related={"prefect.resource.role": "work-pool", "prefect.resource.name": pools},
            expect={"prefect.worker.submitted-flow-run"},
            for_each={"prefect.resource.id"},
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=FOREIGN_WORKER)],
    )


GUARDS = (refused_stays_refused, foreign_workers_start_nothing)
_COMPARED = ("name", "description", "enabled", "trigger", "actions")


def _definition(automation: object) -> dict:
    """What an automation does (ids and bookkeeping left out), to compare two."""
    core = AutomationCore.model_validate(automation, from_attributes=True)
    dumped = core.model_dump(mode="json")
    trigger = dumped["trigger"]
    trigger.pop("id", None)
    for key in ("after", "expect", "for_each"):  # sets: their order is per process
        trigger[key] = sorted(trigger.get(key) or [])
    return {key: dumped.get(key) for key in _COMPARED}


async def governed_pools(client: PrefectClient) -> list[str]:
    """The names of the governed work pools on the server, sorted."""
    from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterType

    from prefect_governance.cli.audit import GOVERNED_POOL_TYPE

    pools = await client.read_work_pools(
        work_pool_filter=WorkPoolFilter(type=WorkPoolFilterType(any_=[GOVERNED_POOL_TYPE]))
    )
    return sorted(pool.name for pool in pools)


async def apply_guards(client: PrefectClient) -> list[tuple[str, str]]:
    """Create each guard, or replace one whose definition differs; (name, action) for each."""
    applied = []
    pools = await governed_pools(client)
    for build in GUARDS:
        wanted = build(pools)
        existing = await client.read_automations_by_name(wanted.name)
        same = [a for a in existing if _definition(a) == _definition(wanted)]
        if same and len(existing) == 1:
            applied.append((wanted.name, "unchanged"))
            continue
        for automation in existing:
            await client.delete_automation(automation.id)
        await client.create_automation(wanted)
        applied.append((wanted.name, "updated" if existing else "created"))
    return applied


async def remove_guards(client: PrefectClient) -> int:
    """Delete every guard this module ships; how many automations were deleted."""
    removed = 0
    for name in (REFUSED_STAYS_REFUSED, FOREIGN_WORKERS_START_NOTHING):
        for automation in await client.read_automations_by_name(name):
            await client.delete_automation(automation.id)
            removed += 1
    return removed
