"""An OpenTelemetry span for each decision, in the flow run's trace when it has one.

Prefect traces through ``opentelemetry-api`` (one of its dependencies), which does nothing
until the process has an SDK tracer provider (``opentelemetry-instrument prefect worker
start ...``, or a provider the worker's own code sets): without one, a decision's span
is a no-op. With one, each decision is a span ``prefect-governance decision`` (as long as
the policy's evaluation took) with the decision's id, verdict, engine and policy, a child
of the trace context in the run's ``__OTEL_TRACEPARENT`` label where the run has one
(Prefect's ``run_deployment`` gives a run started inside a traced flow its parent's), else
a root span that names the run (``prefect.run.id``). Reasons stay out: they are in the
lineage and, redacted, in the decision's Prefect event.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate, trace

from prefect_governance.worker.observe import Decided, Settled

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

# Prefect's flow-run label holding the W3C traceparent of the run's trace
# (prefect.telemetry.run_telemetry.LABELS_TRACEPARENT_KEY).
TRACEPARENT_LABEL = "__OTEL_TRACEPARENT"
SPAN_NAME = "prefect-governance decision"


def decision_attributes(seen: Decided) -> dict[str, Any]:
    """A decision's span attributes (no reasons, no parameters)."""
    assessment = seen.assessment
    decision = assessment.decision
    attributes: dict[str, Any] = {
        "prefect.run.id": seen.flow_run_id,
        "prefect.run.type": "flow",
        "prefect.work-pool.name": seen.pool,
        "prefect-governance.decision.id": decision.id,
        "prefect-governance.verdict": decision.verdict,
        "prefect-governance.mode": decision.mode,
        "prefect-governance.engine": decision.engine,
        "prefect-governance.policy.path": decision.policy_path,
        "prefect-governance.deny.count": len(decision.deny),
        "prefect-governance.warn.count": len(decision.warn),
    }
    if decision.policy_revision:
        attributes["prefect-governance.policy.revision"] = decision.policy_revision
    if assessment.agent_id:
        attributes["prefect-governance.agent.id"] = assessment.agent_id
    if seen.lineage_seconds is not None:
        attributes["prefect-governance.lineage.seconds"] = seen.lineage_seconds
    return attributes


class DecisionSpans:
    """The observer that records a span for each decision (a no-op without an SDK)."""

    def __init__(self, tracer: Tracer | None = None):
        self._tracer = tracer or trace.get_tracer("prefect_governance")

    def decided(self, seen: Decided) -> None:
        envelope = seen.assessment.envelope
        parent = envelope.flow_run.labels.get(TRACEPARENT_LABEL) if envelope else None
        context = propagate.extract({"traceparent": parent}) if isinstance(parent, str) else None
        end = time.time_ns()
        span = self._tracer.start_span(
            SPAN_NAME,
            context=context,
            kind=trace.SpanKind.INTERNAL,
            attributes=decision_attributes(seen),
            start_time=end - int(seen.assessment.decision.latency_ms * 1_000_000),
        )
        span.end(end_time=end)

    def settled(self, seen: Settled) -> None:
        """Outcomes are the run's own spans (Prefect's), not the worker's."""
