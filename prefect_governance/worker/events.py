"""Prefect events for every decision and every settled run, for automations and the feed.

=====================================  ===========================================
event                                  resource
=====================================  ===========================================
``prefect-governance.decision.<v>``    ``prefect-governance.decision.<decision id>``
``prefect-governance.run.settled``     ``prefect-governance.decision.<decision id>``
=====================================  ===========================================

``<v>`` is the verdict (``allowed``, ``refused``, ``audited``, ``ungoverned``, or any
verdict a later policy contract adds). Like ``prefect.docker.container.<status>`` on the
container, the resource is the thing decided; related resources name the flow run,
deployment, flow, agent (its block), work pool, policy and worker by
``prefect.resource.role``, and the run's tags, so an automation can match any of them and
Prefect's actions and notification templates find the flow run (``{{ flow_run.name }}``).

Events are information, never authority: any API client may emit an event of any name,
so nothing in this package reads them (the lineage is the record). Their payload is
redacted with ``core.envelope.redact`` (secret-named members and secret-shaped strings),
emission is a queue put on Prefect's events worker, and a failure is the observers' to
log: an event never delays or changes a decision.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from prefect.events import emit_event
from prefect.events.related import tags_as_related_resources

from prefect_governance.core.envelope import redact
from prefect_governance.worker.governor import Assessment
from prefect_governance.worker.observe import Decided, Settled

PREFIX = "prefect-governance"
DECISION_EVENT = PREFIX + ".decision.{verdict}"
SETTLED_EVENT = PREFIX + ".run.settled"
DECISION_RESOURCE = PREFIX + ".decision.{id}"
POLICY_RESOURCE = PREFIX + ".policy.{path}"


class EventSource(Protocol):
    """What the events need of the worker that emits them (Prefect's ``BaseWorker``)."""

    _work_pool: Any

    def _event_resource(self) -> dict[str, str]: ...


Emit = Callable[..., Any]


def _resource(kind: str, id: Any, role: str, name: str | None, **labels: str) -> dict[str, str]:
    resource = {"prefect.resource.id": f"{kind}.{id}", "prefect.resource.role": role}
    if name:
        resource["prefect.resource.name"] = name
    resource.update({f"{PREFIX}.{k.replace('_', '-')}": v for k, v in labels.items() if v})
    return resource


def related_resources(
    assessment: Assessment,
    flow_run_id: str,
    pool: str,
    *,
    pool_id: str | None = None,
    worker: Mapping[str, str] | None = None,
) -> list[dict[str, str]]:
    """The flow run, deployment, flow, agent, work pool, policy and worker of a decision
    (those known: a refusal before the envelope was built names fewer), and the tags."""
    decision, envelope, agent = assessment.decision, assessment.envelope, assessment.agent
    run_name = envelope.flow_run.name if envelope else None
    related = [_resource("prefect.flow-run", flow_run_id, "flow-run", run_name)]
    tags: list[str] = []
    if envelope is not None:
        tags += envelope.flow_run.tags
        if envelope.deployment is not None:
            deployment = envelope.deployment
            related.append(
                _resource("prefect.deployment", deployment.id, "deployment", deployment.name)
            )
            tags += deployment.tags
        related.append(_resource("prefect.flow", envelope.flow.id, "flow", envelope.flow.name))
    if agent is not None:
        block_id = getattr(agent, "_block_document_id", None)
        kind, id = (
            ("prefect.block-document", block_id) if block_id else (f"{PREFIX}.agent", agent.id)
        )
        related.append(
            _resource(
                kind,
                id,
                "agent",
                assessment.agent_block,
                agent_id=agent.id,
                agent_version=str(agent.version),
            )
        )
    if pool_id:
        related.append(_resource("prefect.work-pool", pool_id, "work-pool", pool))
    else:  # matched by name, as Prefect's own guards here do
        related.append(
            {
                "prefect.resource.id": f"{PREFIX}.work-pool.{pool}",
                "prefect.resource.role": "work-pool",
                "prefect.resource.name": pool,
            }
        )
    related.append(
        _resource(
            PREFIX + ".policy",
            decision.policy_path,
            "policy",
            decision.policy_path,
            policy_revision=decision.policy_revision or "",
        )
    )
    if worker:
        related.append({**worker, "prefect.resource.role": "worker"})
    return related + [dict(tag.root) for tag in tags_as_related_resources(set(tags))]


def decision_resource(assessment: Assessment, **labels: str) -> dict[str, str]:
    """The decision as the events' resource, with its verdict, mode and engine as labels."""
    decision = assessment.decision
    resource = {
        "prefect.resource.id": DECISION_RESOURCE.format(id=decision.id),
        "prefect.resource.name": decision.id,
        f"{PREFIX}.verdict": decision.verdict,
        f"{PREFIX}.mode": decision.mode,
        f"{PREFIX}.engine": decision.engine,
    }
    resource.update({f"{PREFIX}.{k}": v for k, v in labels.items()})
    return resource


def reasons(assessment: Assessment) -> list[dict[str, Any]]:
    """Each deny and warn message, with its rule when the policy named it."""
    decision = assessment.decision
    if decision.reasons:
        return [reason.model_dump() for reason in decision.reasons]
    return [{"kind": "deny", "message": m, "rule": None} for m in decision.deny] + [
        {"kind": "warn", "message": m, "rule": None} for m in decision.warn
    ]


def decision_event(
    seen: Decided,
    patterns: Sequence[str],
    *,
    pool_id: str | None = None,
    worker: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The keyword arguments of ``emit_event`` for one decision, redacted."""
    assessment = seen.assessment
    decision = assessment.decision
    payload = {
        "decision_id": decision.id,
        "verdict": decision.verdict,
        "allow": decision.allow,
        "mode": decision.mode,
        "fail_mode": decision.fail_mode,
        "engine": decision.engine,
        "policy": {"path": decision.policy_path, "revision": decision.policy_revision},
        "latency_ms": decision.latency_ms,
        "flow_run_id": seen.flow_run_id,
        "work_pool": seen.pool,
        "agent": assessment.agent_id,
        "reasons": reasons(assessment),
        "deny": list(decision.deny),
        "warn": list(decision.warn),
        "error": decision.error,
        # The denies exceptions waived (which exception, which rule), and who may approve
        # a run that waits: what a notification to the security team or approvers needs.
        "waived": [waiver.model_dump() for waiver in decision.waived],
        "approval": [request.model_dump() for request in decision.approval],
        "lineage": {
            "recorded": seen.lineage_error is None and seen.lineage_seconds is not None,
            "seconds": seen.lineage_seconds,
            "error": seen.lineage_error,
        },
    }
    return _redacted(
        DECISION_EVENT.format(verdict=decision.verdict),
        decision_resource(assessment),
        related_resources(assessment, seen.flow_run_id, seen.pool, pool_id=pool_id, worker=worker),
        payload,
        patterns,
    )


def settled_event(
    seen: Settled,
    patterns: Sequence[str],
    *,
    pool: str | None = None,
    pool_id: str | None = None,
    worker: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The keyword arguments of ``emit_event`` for one settled run, redacted."""
    assessment = seen.assessment
    decision = assessment.decision
    pool = pool or (assessment.envelope.work_pool.name if assessment.envelope else "")
    payload = {
        "decision_id": decision.id,
        "verdict": decision.verdict,
        "flow_run_id": seen.flow_run_id,
        "state": seen.state,
        "recorded": seen.recorded,
        "by": seen.by,
        "agent": assessment.agent_id,
        "lineage": {"seconds": seen.lineage_seconds, "error": seen.lineage_error},
    }
    return _redacted(
        SETTLED_EVENT,
        decision_resource(assessment, state=seen.state),
        related_resources(assessment, seen.flow_run_id, pool, pool_id=pool_id, worker=worker),
        payload,
        patterns,
    )


def _redacted(
    event: str,
    resource: dict[str, str],
    related: list[dict[str, str]],
    payload: dict[str, Any],
    patterns: Sequence[str],
) -> dict[str, Any]:
    """The event with the project's redaction over its resources and payload."""
    (resource, related, payload), _ = redact([resource, related, payload], patterns)
    return {"event": event, "resource": resource, "related": related, "payload": payload}


class PrefectEvents:
    """The observer that emits a Prefect event for each decision and settled run."""

    def __init__(self, source: EventSource, patterns: Sequence[str], emit: Emit = emit_event):
        self._source, self._patterns, self._emit = source, list(patterns), emit

    def _pool(self, name: str | None) -> tuple[str | None, str | None]:
        pool = getattr(self._source, "_work_pool", None)
        if pool is not None and (name is None or pool.name == name):
            return pool.name, str(pool.id)
        return name, None

    def decided(self, seen: Decided) -> None:
        _, pool_id = self._pool(seen.pool)
        worker = self._source._event_resource()
        self._emit(**decision_event(seen, self._patterns, pool_id=pool_id, worker=worker))

    def settled(self, seen: Settled) -> None:
        envelope = seen.assessment.envelope
        pool, pool_id = self._pool(envelope.work_pool.name if envelope else None)
        worker = self._source._event_resource()
        self._emit(**settled_event(seen, self._patterns, pool=pool, pool_id=pool_id, worker=worker))
