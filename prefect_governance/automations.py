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


def refused_stays_refused() -> AutomationCore:
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


GUARDS = (refused_stays_refused,)
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


async def apply_guards(client: PrefectClient) -> list[tuple[str, str]]:
    """Create each guard, or replace one whose definition differs; (name, action) for each."""
    applied = []
    for build in GUARDS:
        wanted = build()
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
