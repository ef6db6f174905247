"""The governed worker's Prometheus metrics: what it decided, how fast, and what failed.

``WorkerMetrics`` watches the worker's governor (``worker/observe.py``) and keeps its
counters in a registry of its own, not prometheus_client's global one: several workers
in one process (tests, an embedding application) never share or collide on a counter,
and Prefect's client metrics (its own server, ``PREFECT_CLIENT_METRICS_*``) stay apart.

The registry is served as ``GET /metrics``:

- on Prefect's worker webserver (``prefect worker start --with-healthcheck``, bound to
  ``PREFECT_WORKER_WEBSERVER_HOST``/``PORT``), when it runs in the worker's process;
- on a port of its own when ``PREFECT_GOVERNANCE_METRICS_PORT`` is set.

Prefect builds its webserver (``prefect.workers.server``, the same in 3.8.8 and 3.9.1)
with no hook to extend it, and, under ``prefect worker start``, before it imports this
package: the route is added to the running app, found as the target of the thread Prefect
runs it in. Starlette reads its routes on each request, so a route added late is served.

Labels stay bounded: no flow run ids. ``agent`` is the id of a verified agent (signed by
the pool owner; empty when the run was refused before one verified), so a deployment
author cannot mint label values; the other labels come from the pool's template, the
policy engine and Prefect's state types.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from prefect_governance import __version__
from prefect_governance.core.engines.breaker import Breaker
from prefect_governance.worker.observe import Decided, Settled

if TYPE_CHECKING:
    from prefect_governance.core.engines.base import PolicyEngine

_logger = logging.getLogger("prefect_governance.worker.metrics")

PREFIX = "prefect_governance"
# Seconds: an embedded decision takes a fraction of a millisecond, OPA over HTTP a few,
# a decision deadline is 5 s by default.
DECISION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
# Seconds: a lineage append waits up to 15 s for its locks by default.
APPEND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15)
BREAKER_STATES = ("closed", "open", "half-open")
RECORDS = ("decision", "outcome")  # the lineage appends timed and counted
# The thread ``prefect.workers.server._run_healthcheck_server`` serves the webserver in.
PREFECT_WEBSERVER_THREAD = "healthcheck-server-thread"


class _Scraped(Collector):
    """What is read at scrape time: runs in flight and each engine's circuit breaker."""

    def __init__(
        self,
        in_flight: Callable[[], int],
        engines: Callable[[], Mapping[str | None, PolicyEngine]],
        info: Mapping[str, str],
    ):
        self._in_flight = in_flight
        self._engines = engines
        self._info = info

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            f"{PREFIX}_worker_info", "The governed worker (always 1).", labels=list(self._info)
        )
        info.add_metric(list(self._info.values()), 1)
        yield info
        yield GaugeMetricFamily(
            f"{PREFIX}_runs_in_flight",
            "Flow runs the worker is deciding, starting or watching now.",
            value=self._in_flight(),
        )
        state = GaugeMetricFamily(
            f"{PREFIX}_engine_breaker_state",
            "The OPA circuit breaker of each engine: 1 for its current state, 0 for the others.",
            labels=["engine", "block", "state"],
        )
        failures = GaugeMetricFamily(
            f"{PREFIX}_engine_breaker_consecutive_failures",
            "Consecutive failed requests counted by each engine's circuit breaker.",
            labels=["engine", "block"],
        )
        for block, engine in self._engines().items():
            breaker = getattr(engine, "breaker", None)
            if not isinstance(breaker, Breaker):
                continue  # an in-process engine: nothing to break
            labels = [engine.name, block or ""]
            current = breaker.state
            for each in BREAKER_STATES:
                state.add_metric([*labels, each], 1 if each == current else 0)
            failures.add_metric(labels, breaker.consecutive_failures)
        yield state
        yield failures


class WorkerMetrics:
    """One governed worker's metrics: an observer of its governor, and a registry."""

    def __init__(
        self,
        *,
        worker: str,
        pool: str,
        worker_type: str,
        in_flight: Callable[[], int] = lambda: 0,
        engines: Callable[[], Mapping[str | None, PolicyEngine]] = dict,
    ):
        self.pool = pool
        self.registry = CollectorRegistry()
        registry = self.registry
        self.decisions = Counter(
            f"{PREFIX}_decisions_total",
            "Decisions on flow runs, by verdict (allowed, refused, audited, ungoverned).",
            ["verdict", "pool", "policy_path", "engine", "agent"],
            registry=registry,
        )
        self.decision_seconds = Histogram(
            f"{PREFIX}_decision_duration_seconds",
            "Seconds a policy engine took to decide (refusals the worker made before asking "
            "one are not in it).",
            ["engine"],
            buckets=DECISION_BUCKETS,
            registry=registry,
        )
        self.engine_failures = Counter(
            f"{PREFIX}_engine_failures_total",
            "Decisions for which the engine gave no usable answer, by the failure's kind.",
            ["engine", "kind"],
            registry=registry,
        )
        self.append_seconds = Histogram(
            f"{PREFIX}_lineage_append_duration_seconds",
            "Seconds a lineage append took, by record (decision, outcome).",
            ["record"],
            buckets=APPEND_BUCKETS,
            registry=registry,
        )
        self.append_failures = Counter(
            f"{PREFIX}_lineage_append_failures_total",
            "Lineage appends that failed, by record (a decision that fails refuses its run).",
            ["record"],
            registry=registry,
        )
        self.outcomes = Counter(
            f"{PREFIX}_outcomes_total",
            "Run outcomes recorded in the lineage, by Prefect state type and who settled "
            "them (worker, reconciler).",
            ["state", "pool", "agent", "settled_by"],
            registry=registry,
        )
        self.reconciled = Counter(
            f"{PREFIX}_reconciled_runs_total",
            "Runs whose outcome the reconciler recorded (the worker that decided them did not).",
            ["state"],
            registry=registry,
        )
        self.gate_refusals = Counter(
            f"{PREFIX}_gate_refusals_total",
            "Starts of the pool's runs the gate refused, found and recorded by the reconciler.",
            registry=registry,
        )
        self.reconcile_failures = Counter(
            f"{PREFIX}_reconcile_failures_total",
            "Reconcile passes that failed (tried again the next interval).",
            registry=registry,
        )
        for record in RECORDS:  # both series exist from the start, at 0 (for rate())
            self.append_seconds.labels(record)
            self.append_failures.labels(record)
        info = {"worker": worker, "pool": pool, "type": worker_type, "version": __version__}
        registry.register(_Scraped(in_flight, engines, info))
        self._server: tuple[Any, threading.Thread] | None = None
        self._exposition: _Exposition | None = None

    # --- the observer --------------------------------------------------------

    def decided(self, seen: Decided) -> None:
        decision = seen.assessment.decision
        agent = seen.assessment.agent_id or ""
        self.decisions.labels(
            decision.verdict, seen.pool, decision.policy_path, decision.engine, agent
        ).inc()
        if decision.engine != "worker":  # an engine was asked (or could not be set up)
            self.decision_seconds.labels(decision.engine).observe(decision.latency_ms / 1000)
        if decision.error is not None:
            self.engine_failures.labels(decision.engine, decision.error_kind or "unknown").inc()
        self._appended("decision", seen.lineage_seconds, seen.lineage_error)

    def settled(self, seen: Settled) -> None:
        self._appended("outcome", seen.lineage_seconds, seen.lineage_error)
        if not seen.recorded:  # another worker's, or the append failed
            return
        agent = seen.assessment.agent_id or ""
        self.outcomes.labels(seen.state, self.pool, agent, seen.by).inc()
        if seen.by == "reconciler":
            self.reconciled.labels(seen.state).inc()

    def _appended(self, record: str, seconds: float | None, error: str | None) -> None:
        if error is not None:
            self.append_failures.labels(record).inc()
        elif seconds is not None:
            self.append_seconds.labels(record).observe(seconds)

    # --- what the worker's reconcile pass found --------------------------------

    def gate_refusals_found(self, count: int) -> None:
        if count:
            self.gate_refusals.inc(count)

    def reconcile_failed(self) -> None:
        self.reconcile_failures.inc()

    # --- serving -------------------------------------------------------------

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)

    def serve(self, port: int | None, host: str) -> None:
        """Serve ``/metrics``: on Prefect's worker webserver if it runs in this process,
        and on ``port`` of its own when one is given. Never raises: a worker whose metrics
        cannot be served still governs its runs."""
        try:
            app = prefect_webserver_app()
            if app is not None:
                self._exposition = _Exposition.on(app)
                self._exposition.attach(self)
                _logger.info("Serving metrics at /metrics of Prefect's worker webserver")
        except Exception:
            _logger.exception("Cannot serve metrics on Prefect's worker webserver")
        if port is not None:
            try:
                self._server = start_http_server(port, host, registry=self.registry)
            except OSError as exc:
                _logger.error("Cannot serve metrics on %s:%s: %s", host, port, exc)
            else:
                _logger.info("Serving metrics at http://%s:%s/metrics", host, self.port)

    def stop(self) -> None:
        """Stop serving (the port of its own; Prefect's webserver answers 503 instead)."""
        if self._exposition is not None:
            self._exposition.detach(self)
            self._exposition = None
        if self._server is not None:
            server, thread = self._server
            self._server = None
            try:
                server.shutdown()
                server.server_close()
                thread.join(timeout=5)
            except Exception:
                _logger.exception("Stopping the metrics server failed")

    @property
    def port(self) -> int | None:
        """The port of its own it serves on (the one bound when 0 was asked)."""
        return None if self._server is None else int(self._server[0].server_port)


def prefect_webserver_app() -> Any | None:
    """The app of Prefect's worker webserver running in this process, if one runs."""
    for thread in threading.enumerate():
        if thread.name != PREFECT_WEBSERVER_THREAD:
            continue
        server = getattr(getattr(thread, "_target", None), "__self__", None)
        app = getattr(getattr(server, "config", None), "app", None)
        if app is not None and callable(getattr(app, "add_route", None)):
            return app
    return None


class _Exposition:
    """``GET /metrics`` on a Starlette app: the metrics of the governed worker that entered
    last and has not exited (one per process, as the webserver is), or 503 while none has."""

    STATE_KEY = "prefect_governance_metrics"

    def __init__(self) -> None:
        self._attached: list[WorkerMetrics] = []
        self._lock = threading.Lock()

    @classmethod
    def on(cls, app: Any) -> _Exposition:
        """The route on this app, added the first time."""
        exposition = getattr(app.state, cls.STATE_KEY, None)
        if isinstance(exposition, _Exposition):
            return exposition
        exposition = cls()
        setattr(app.state, cls.STATE_KEY, exposition)
        app.add_route("/metrics", exposition.endpoint, methods=["GET"], include_in_schema=False)
        return exposition

    def attach(self, metrics: WorkerMetrics) -> None:
        with self._lock:
            if self._attached:
                _logger.warning(
                    "Another governed worker runs in this process: Prefect's worker "
                    "webserver serves the metrics of the one that started last"
                )
            self._attached.append(metrics)

    def detach(self, metrics: WorkerMetrics) -> None:
        with self._lock:
            if metrics in self._attached:
                self._attached.remove(metrics)

    async def endpoint(self, request: Any) -> Any:
        from starlette.responses import Response

        with self._lock:
            metrics = self._attached[-1] if self._attached else None
        if metrics is None:
            return Response("no governed worker runs in this process\n", status_code=503)
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
