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

A ``notification`` document (``prefect-governance apply``) ships one more: on a
decision of its verdicts (``refused`` unless told) in its pools (every pool unless
told), the governed worker's ``prefect-governance.decision.<verdict>`` event (see
prefect_governance.worker.events), send the decision and its redacted reasons
through a notification block. Any API client can emit such an event, so the
automation only tells; it changes no run.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import TYPE_CHECKING

from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState, SendNotification
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from pydantic import BaseModel, ConfigDict, Field, field_validator

from prefect_governance.core.errors import GovernanceError

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


NOTIFY = "prefect-governance-notify-"  # the automation of notification document NAME: NOTIFY+NAME
NOTIFY_SUBJECT = (
    "prefect-governance: flow run {{ flow_run.name }} {{ event.payload.verdict }} "
    "in pool {{ event.payload.work_pool }}"
)
NOTIFY_BODY = """Flow run {{ flow_run.name }} ({{ event.payload.flow_run_id }}) in work pool \
{{ event.payload.work_pool }} was {{ event.payload.verdict }} by governance.
decision: {{ event.payload.decision_id }} (engine {{ event.payload.engine }}, policy \
{{ event.payload.policy.path }}, mode {{ event.payload.mode }})
agent: {{ event.payload.agent }}
{% for reason in event.payload.reasons %}- {{ reason.kind }}: {{ reason.message }}\
{% if reason.rule %} ({{ reason.rule }}){% endif %}
{% endfor %}"""
_VERDICT = re.compile(r"^[a-z][a-z0-9_]*$")


class Notification(BaseModel):
    """A ``notification`` document's spec: which decisions to tell which block of."""

    model_config = ConfigDict(extra="forbid")

    block: str = Field(
        pattern=r"^[a-z0-9][a-z0-9-]*/[^/]+$",
        description="The notification block: <block type slug>/<block name>, e.g. "
        "custom-webhook/on-call or slack-webhook/security.",
    )
    pools: list[str] = Field(
        default_factory=list, description="The work pools whose decisions notify; empty: all."
    )
    verdicts: list[str] = Field(
        default_factory=lambda: ["refused"],
        min_length=1,
        description="The verdicts that notify (refused, audited, allowed, ungoverned, ...).",
    )
    subject: str = Field(NOTIFY_SUBJECT, description="A Jinja template, as Prefect's.")
    body: str = Field(NOTIFY_BODY, description="A Jinja template, as Prefect's.")

    @field_validator("verdicts")
    @classmethod
    def _verdicts(cls, verdicts: list[str]) -> list[str]:
        bad = [v for v in verdicts if not _VERDICT.match(v)]
        if bad:
            raise ValueError(f"not a verdict: {', '.join(bad)}")
        return verdicts


def notification_automation(
    name: str, spec: Notification, block_document_id: str
) -> AutomationCore:
    """The automation of notification document ``name``, telling block ``block_document_id``."""
    from prefect_governance.worker.events import DECISION_EVENT, DECISION_RESOURCE

    pools = sorted(set(spec.pools))
    return AutomationCore(
        name=NOTIFY + name,
        description="prefect-governance: notify "
        f"{spec.block} of {', '.join(sorted(set(spec.verdicts)))} decisions in "
        f"{'pools ' + ', '.join(pools) if pools else 'every pool'} (information only).",
        trigger=EventTrigger(
            match={"prefect.resource.id": DECISION_RESOURCE.format(id="*")},
            match_related=(
                {"prefect.resource.role": "work-pool", "prefect.resource.name": pools}
                if pools
                else {}
            ),
            expect={DECISION_EVENT.format(verdict=v) for v in spec.verdicts},
            for_each={"prefect.resource.id"},
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=[
            SendNotification(
                block_document_id=block_document_id, subject=spec.subject, body=spec.body
            )
        ],
    )


async def _put(client: PrefectClient, wanted: AutomationCore) -> str:
    """Create ``wanted``, or replace the automations of its name if they differ."""
    existing = await client.read_automations_by_name(wanted.name)
    same = [a for a in existing if _definition(a) == _definition(wanted)]
    if same and len(existing) == 1:
        return "unchanged"
    for automation in existing:
        await client.delete_automation(automation.id)
    await client.create_automation(wanted)
    return "updated" if existing else "created"


class NotificationBlockMissing(GovernanceError, LookupError):
    """A notification document names a block that does not exist."""


async def apply_notification(client: PrefectClient, name: str, spec: Notification) -> str:
    """Create or update the automation of a notification document; created, updated or
    unchanged. Raises NotificationBlockMissing when its block does not exist."""
    from prefect.exceptions import ObjectNotFound

    slug, _, block_name = spec.block.partition("/")
    try:
        block = await client.read_block_document_by_name(block_name, block_type_slug=slug)
    except ObjectNotFound:
        raise NotificationBlockMissing(
            f"notification block {spec.block!r} does not exist (save it first: "
            "Prefect's UI, or Block.save)"
        ) from None
    return await _put(client, notification_automation(name, spec, str(block.id)))


async def remove_notification(client: PrefectClient, name: str) -> int:
    """Delete the automation of notification document ``name``; how many were deleted."""
    removed = 0
    for automation in await client.read_automations_by_name(NOTIFY + name):
        await client.delete_automation(automation.id)
        removed += 1
    return removed


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
        applied.append((wanted.name, await _put(client, wanted)))
    return applied


async def remove_guards(client: PrefectClient) -> int:
    """Delete every guard this module ships; how many automations were deleted."""
    removed = 0
    for name in (REFUSED_STAYS_REFUSED, FOREIGN_WORKERS_START_NOTHING):
        for automation in await client.read_automations_by_name(name):
            await client.delete_automation(automation.id)
            removed += 1
    return removed
