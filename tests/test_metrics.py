"""The worker's metrics as an observer of its governor, and how they are served.

Engine failures are produced for real (a real HTTP server plays a faulty OPA), the
circuit breaker is a real OPA engine's, the metrics are read back through Prometheus'
own text format, and Prefect's worker webserver is Prefect's own code serving on a port.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from typing import Any

import pytest
from prefect.settings import (
    PREFECT_WORKER_WEBSERVER_HOST,
    PREFECT_WORKER_WEBSERVER_PORT,
    temporary_settings,
)
from prometheus_client.parser import text_string_to_metric_families

from prefect_governance.cli.local import free_port, wait_http
from prefect_governance.core.decision import decide, decision_for, worker_refusal
from prefect_governance.core.engines.base import EngineAnswer, EngineError
from prefect_governance.core.engines.opa import OpaEngine
from prefect_governance.core.models import Decision
from prefect_governance.lineage.events import decision_event
from prefect_governance.worker.governor import Assessment
from prefect_governance.worker.metrics import WorkerMetrics
from prefect_governance.worker.observe import Decided, Observers, Settled
from tests.faults_support import ALLOW, FAULTS, FaultyOpa

PATH = "prefect/governance/decision"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus' text format as {(sample name, labels): value}."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: WorkerMetrics, name: str, **labels: str) -> float | None:
    """One sample, read back from the exposition (None if it is not there)."""
    return samples(metrics.exposition().decode()).get((name, frozenset(labels.items())))


def metrics_for(**kwargs: Any) -> WorkerMetrics:
    return WorkerMetrics(worker="w", pool="gov", worker_type="governed-process", **kwargs)


def allowed(engine: str = "embedded", latency_ms: float = 0.4) -> Decision:
    return decision_for(
        EngineAnswer({"allow": True}),
        engine=engine,
        policy_path=PATH,
        mode="enforce",
        fail_mode="closed",
        latency_ms=latency_ms,
    )


def decided(decision: Decision, **kwargs: Any) -> Decided:
    return Decided(Assessment(decision), "run-1", "gov", **{"lineage_seconds": 0.003, **kwargs})


# --- decisions ----------------------------------------------------------------------


def test_a_decision_is_counted_with_its_verdict_pool_policy_and_engine():
    metrics = metrics_for()
    metrics.decided(decided(allowed(latency_ms=0.4)))
    labels = dict(verdict="allowed", pool="gov", policy_path=PATH, engine="embedded", agent="")
    assert value(metrics, "prefect_governance_decisions_total", **labels) == 1
    count = "prefect_governance_decision_duration_seconds_count"
    assert value(metrics, count, engine="embedded") == 1
    total = value(metrics, "prefect_governance_decision_duration_seconds_sum", engine="embedded")
    assert total == pytest.approx(0.0004)
    bucket = "prefect_governance_decision_duration_seconds_bucket"
    assert value(metrics, bucket, engine="embedded", le="0.0005") == 1
    assert value(metrics, bucket, engine="embedded", le="0.0001") is None  # not a bucket
    appended = "prefect_governance_lineage_append_duration_seconds_count"
    assert value(metrics, appended, record="decision") == 1


def test_a_refusal_the_worker_made_before_any_engine_is_not_an_engine_latency():
    metrics = metrics_for()
    refusal = worker_refusal("no agent", policy_path=PATH, mode="enforce", fail_mode="closed")
    metrics.decided(decided(refusal))
    labels = dict(verdict="refused", pool="gov", policy_path=PATH, engine="worker", agent="")
    assert value(metrics, "prefect_governance_decisions_total", **labels) == 1
    count = "prefect_governance_decision_duration_seconds_count"
    assert value(metrics, count, engine="worker") is None


def test_two_workers_in_one_process_count_apart():
    one, two = metrics_for(), metrics_for()
    one.decided(decided(allowed()))
    labels = dict(verdict="allowed", pool="gov", policy_path=PATH, engine="embedded", agent="")
    assert value(one, "prefect_governance_decisions_total", **labels) == 1
    assert value(two, "prefect_governance_decisions_total", **labels) is None


# --- engine failures, each of a real faulty OPA ---------------------------------------

FAULT_KINDS = [
    ("slow", "timeout"),
    ("http-503", "http"),
    ("internal-error", "evaluation"),
    ("result-string", "shape"),
    ("undefined", "undefined"),
]


@pytest.fixture(scope="module")
def faulty():
    with FaultyOpa() as server:
        yield server


@pytest.mark.parametrize("fail_mode", ["closed", "open"])
@pytest.mark.parametrize(("fault", "kind"), FAULT_KINDS, ids=[f for f, _ in FAULT_KINDS])
def test_an_engine_failure_is_counted_by_its_kind(faulty, fault, kind, fail_mode):
    faulty.fault = FAULTS[fault]
    engine = OpaEngine(faulty.url, timeout=0.5, retries=0)

    async def go() -> Decision:
        try:
            return await decide(engine, PATH, {}, fail_mode=fail_mode, deadline=5)
        finally:
            await engine.aclose()

    decision = asyncio.run(go())
    assert decision.error_kind == kind, decision.error
    assert decision.error.startswith(f"policy engine failed ({kind}):")
    metrics = metrics_for()
    metrics.decided(decided(decision))
    assert value(metrics, "prefect_governance_engine_failures_total", engine="opa", kind=kind) == 1
    verdict = "refused" if fail_mode == "closed" else "ungoverned"
    labels = dict(verdict=verdict, pool="gov", policy_path=PATH, engine="opa", agent="")
    assert value(metrics, "prefect_governance_decisions_total", **labels) == 1


def test_an_unreachable_engine_is_a_failure_of_its_kind():
    decision = decision_for(
        EngineError("unreachable", "connection refused"),
        engine="opa",
        policy_path=PATH,
        mode="enforce",
        fail_mode="closed",
    )
    metrics = metrics_for()
    metrics.decided(decided(decision))
    assert decision.error_kind == "unreachable"
    failures = "prefect_governance_engine_failures_total"
    assert value(metrics, failures, engine="opa", kind="unreachable") == 1


def test_an_answer_is_no_engine_failure_and_the_kind_stays_out_of_the_lineage():
    decision = allowed()
    assert decision.error_kind is None
    metrics = metrics_for()
    metrics.decided(decided(decision))
    text = metrics.exposition().decode()
    assert "prefect_governance_engine_failures_total{" not in text
    failed = decision_for(
        EngineError("timeout", "late"), engine="opa", policy_path=PATH, mode="enforce",
        fail_mode="closed",
    )  # fmt: skip
    event = decision_event(failed, agent_id=None, flow_run_id="r", envelope=None)
    assert "error_kind" not in event.model_dump_json(), "the lineage record is as before"


# --- the lineage ----------------------------------------------------------------------


def test_a_failed_lineage_append_is_counted_by_record_and_not_timed():
    metrics = metrics_for()
    refusal = worker_refusal(
        "the decision could not be recorded", policy_path=PATH, mode="enforce", fail_mode="closed"
    )
    metrics.decided(decided(refusal, lineage_seconds=None, lineage_error="OperationalError()"))
    assessment = Assessment(allowed())
    metrics.settled(Settled(assessment, "run-1", "COMPLETED", False, "worker", None, "Timeout()"))
    failures = "prefect_governance_lineage_append_failures_total"
    assert value(metrics, failures, record="decision") == 1
    assert value(metrics, failures, record="outcome") == 1
    timed = "prefect_governance_lineage_append_duration_seconds_count"
    assert value(metrics, timed, record="decision") == 0
    assert value(metrics, timed, record="outcome") == 0
    outcomes = "prefect_governance_outcomes_total"
    assert not [k for k in samples(metrics.exposition().decode()) if k[0] == outcomes]


def test_outcomes_are_counted_by_state_and_who_settled_them():
    metrics = metrics_for()
    assessment = Assessment(allowed())
    metrics.settled(Settled(assessment, "r1", "COMPLETED", True, "worker", 0.01))
    metrics.settled(Settled(assessment, "r2", "CRASHED", True, "reconciler", 0.02))
    metrics.settled(Settled(assessment, "r3", "FAILED", False, "reconciler", 0.01))  # not ours
    outcomes = "prefect_governance_outcomes_total"
    labels = dict(pool="gov", agent="")
    assert value(metrics, outcomes, state="COMPLETED", settled_by="worker", **labels) == 1
    assert value(metrics, outcomes, state="CRASHED", settled_by="reconciler", **labels) == 1
    assert value(metrics, outcomes, state="FAILED", settled_by="reconciler", **labels) is None
    assert value(metrics, "prefect_governance_reconciled_runs_total", state="CRASHED") == 1
    timed = "prefect_governance_lineage_append_duration_seconds_count"
    assert value(metrics, timed, record="outcome") == 3


def test_gate_refusals_and_failed_reconcile_passes_are_counted():
    metrics = metrics_for()
    metrics.gate_refusals_found(0)
    metrics.gate_refusals_found(2)
    metrics.reconcile_failed()
    assert value(metrics, "prefect_governance_gate_refusals_total") == 2
    assert value(metrics, "prefect_governance_reconcile_failures_total") == 1


def test_the_metrics_watch_a_governor_through_its_observers():
    observers, metrics = Observers(), metrics_for()
    observers.add(metrics)
    observers.decided(decided(allowed()))
    labels = dict(verdict="allowed", pool="gov", policy_path=PATH, engine="embedded", agent="")
    assert value(metrics, "prefect_governance_decisions_total", **labels) == 1


# --- read at scrape time ---------------------------------------------------------------


def test_runs_in_flight_are_read_when_scraped():
    in_flight = {"a", "b"}
    metrics = metrics_for(in_flight=lambda: len(in_flight))
    assert value(metrics, "prefect_governance_runs_in_flight") == 2
    in_flight.clear()
    assert value(metrics, "prefect_governance_runs_in_flight") == 0
    info = dict(worker="w", pool="gov", type="governed-process")
    found = [k for k in samples(metrics.exposition().decode()) if k[0].endswith("worker_info")]
    assert len(found) == 1 and info.items() <= dict(found[0][1]).items()


def test_the_breaker_gauge_follows_a_real_opa_engines_breaker(faulty):
    now = [0.0]
    engine = OpaEngine(
        faulty.url, timeout=0.5, retries=0, breaker_failures=2, breaker_reset_seconds=30,
        clock=lambda: now[0],
    )  # fmt: skip
    metrics = metrics_for(engines=lambda: {"e2e-opa": engine, None: object()})
    labels = dict(engine="opa", block="e2e-opa")
    state = "prefect_governance_engine_breaker_state"
    consecutive = "prefect_governance_engine_breaker_consecutive_failures"

    def states() -> dict[str, float | None]:
        return {
            s: value(metrics, state, state=s, **labels) for s in ("closed", "open", "half-open")
        }

    async def decide_once() -> Decision:
        return await decide(engine, PATH, {}, deadline=5)

    async def go() -> None:
        try:
            assert states() == {"closed": 1, "open": 0, "half-open": 0}
            faulty.fault = FAULTS["http-503"]
            await decide_once()
            assert states()["closed"] == 1 and value(metrics, consecutive, **labels) == 1
            await decide_once()
            assert states() == {"closed": 0, "open": 1, "half-open": 0}
            assert value(metrics, consecutive, **labels) == 2
            requests = faulty.requests
            refused = await decide_once()  # the circuit is open: no request goes out
            assert faulty.requests == requests and "circuit open" in refused.error
            now[0] += 31
            assert engine.breaker.admit() is None  # the one trial request is let through
            assert states() == {"closed": 0, "open": 0, "half-open": 1}
            engine.breaker.abandon()
            faulty.fault = ALLOW
            assert (await decide_once()).verdict == "allowed"  # a trial that succeeds closes
            assert states() == {"closed": 1, "open": 0, "half-open": 0}
            assert value(metrics, consecutive, **labels) == 0
        finally:
            await engine.aclose()

    asyncio.run(go())
    # An engine without a breaker (in-process) has no breaker samples.
    assert [k for k in samples(metrics.exposition().decode()) if k[0] == state]
    assert all(dict(k[1])["block"] == "e2e-opa" for k in samples(metrics.exposition().decode())
               if k[0] == state)  # fmt: skip


# --- serving ----------------------------------------------------------------------------


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_on_a_port_of_their_own():
    metrics = metrics_for()
    metrics.decided(decided(allowed()))
    metrics.serve(0, "127.0.0.1")
    port = metrics.port
    assert port
    try:
        status, text = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        labels = dict(verdict="allowed", pool="gov", policy_path=PATH, engine="embedded", agent="")
        assert samples(text)[("prefect_governance_decisions_total", frozenset(labels.items()))] == 1
    finally:
        metrics.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_a_port_taken_leaves_the_worker_governing(caplog):
    first = metrics_for()
    first.serve(0, "127.0.0.1")
    try:
        second = metrics_for()
        second.serve(first.port, "127.0.0.1")  # no exception: logged
        assert second.port is None
        assert "Cannot serve metrics" in caplog.text
    finally:
        first.stop()


def test_metrics_on_prefects_worker_webserver():
    """Prefect's own webserver (as ``--with-healthcheck`` starts it, before any worker
    exists) gets ``/metrics`` from the governed worker that enters, keeps ``/health``, and
    answers 503 on ``/metrics`` once that worker is gone."""
    from prefect.workers.server import _run_healthcheck_server

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    settings = {PREFECT_WORKER_WEBSERVER_HOST: "127.0.0.1", PREFECT_WORKER_WEBSERVER_PORT: port}
    with temporary_settings(settings), _run_healthcheck_server(lambda: True):
        wait_http(f"{base}/health", 15)
        assert _get(f"{base}/metrics")[0] == 404  # Prefect's app alone has no /metrics
        metrics = metrics_for()
        metrics.decided(decided(allowed()))
        metrics.serve(None, "0.0.0.0")
        try:
            status, text = _get(f"{base}/metrics")
            assert status == 200
            labels = dict(
                verdict="allowed", pool="gov", policy_path=PATH, engine="embedded", agent=""
            )
            key = ("prefect_governance_decisions_total", frozenset(labels.items()))
            assert samples(text)[key] == 1
            assert _get(f"{base}/health") == (200, '{"message":"OK"}')
            other = WorkerMetrics(worker="w2", pool="gov2", worker_type="governed-process")
            other.serve(None, "0.0.0.0")  # the next worker of the process takes the route over
            assert 'pool="gov2"' in _get(f"{base}/metrics")[1]
            other.stop()  # and hands it back when it exits
            assert 'pool="gov"' in _get(f"{base}/metrics")[1]
        finally:
            metrics.stop()
        assert _get(f"{base}/metrics")[0] == 503
