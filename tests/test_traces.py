"""A span per decision (worker/traces.py), in the flow run's trace when its labels carry
one; nothing at all without an OpenTelemetry SDK."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import propagate, trace

from prefect_governance.worker.observe import Decided
from prefect_governance.worker.traces import SPAN_NAME, TRACEPARENT_LABEL, DecisionSpans
from tests.conftest import missing
from tests.test_events import _assessment


@pytest.fixture
def traced() -> tuple[trace.Tracer, Any]:
    """A tracer of an SDK provider whose spans end in memory, and that memory."""
    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )
    except ImportError:
        missing("opentelemetry-sdk (the test extra)")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


def test_a_decision_is_a_span_in_the_run_s_trace(traced: tuple[trace.Tracer, Any]) -> None:
    tracer, exporter = traced
    with tracer.start_as_current_span("the flow that started the run") as parent:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
    assessment = _assessment(deny=["no"], latency_ms=2.0)
    assert assessment.envelope is not None
    assessment.envelope.flow_run.labels[TRACEPARENT_LABEL] = carrier["traceparent"]
    DecisionSpans(tracer).decided(Decided(assessment, "run-1", "etl", 0.003))
    span = next(s for s in exporter.get_finished_spans() if s.name == SPAN_NAME)
    assert span.context.trace_id == parent.get_span_context().trace_id
    assert span.parent is not None and span.parent.span_id == parent.get_span_context().span_id
    assert span.attributes["prefect-governance.decision.id"] == "decision-1"
    assert span.attributes["prefect-governance.verdict"] == "refused"
    assert span.attributes["prefect.run.id"] == "run-1"
    assert span.end_time - span.start_time == 2_000_000  # the policy's 2 ms


def test_a_run_without_a_trace_gets_a_root_span(traced: tuple[trace.Tracer, Any]) -> None:
    tracer, exporter = traced
    DecisionSpans(tracer).decided(Decided(_assessment("allowed"), "run-2", "etl", 0.001))
    (span,) = exporter.get_finished_spans()
    assert span.parent is None and span.attributes["prefect.run.id"] == "run-2"


def test_without_a_tracer_provider_a_decision_records_nothing() -> None:
    """The default (no SDK provider set in this process): a no-op span, no error."""
    DecisionSpans().decided(Decided(_assessment("allowed"), "run-3", "etl", 0.001))
    assert not trace.get_tracer("x").start_span("probe").is_recording()
