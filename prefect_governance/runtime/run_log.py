"""What happened inside a governed run, on its way to the lineage.

The run's process holds no lineage credentials. Its task decisions and
capability uses are numbered in order and travel back through Prefect, as
artifacts of the flow run (like memory proposals); after the run the worker
reads them, checks them and appends them to the agent's chain, between the
run's decision and its outcome.

Each batch is authenticated with the run's report secret (see
``prefect_governance.core.reports``): the worker believes only batches whose MAC
verifies for this run, decision, kind and sequence numbers.

Events are sent in batches (a refusal or a blocked use at once; otherwise
every ``batch`` events or ``interval`` seconds, and when the flow or the
process ends), so a governed task does not pay for an API call.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from prefect.context import SettingsContext

from prefect_governance.core.handoff import REPORT_SECRET_ENV, RUN_EVENTS_KEY
from prefect_governance.core.reports import Report, RunEvent, RunEventsReport, run_event, seal

logger = logging.getLogger("prefect_governance.runtime.run_log")


class RunLog:
    """One flow run's events, numbered in order, sent to Prefect in batches."""

    def __init__(
        self, flow_run_id: str, decision_id: str, *, batch: int = 100, interval: float = 2.0
    ):
        self.flow_run_id = flow_run_id
        self.decision_id = decision_id
        self.batch = batch
        self.interval = interval
        self._pending: list[RunEvent] = []
        self._seq = 0
        self._lock = threading.Lock()  # numbering and the pending list
        self._sending = threading.Lock()  # one batch on its way at a time, in order
        self._wake = threading.Event()
        self._closed = False
        # Prefect's settings (the API to send to) as where the log was made, for every thread.
        self._settings = SettingsContext.get()
        self._thread = threading.Thread(target=self._loop, name="governance-run-log", daemon=True)
        self._thread.start()

    def add(self, kind: str, event: Mapping[str, Any], *, urgent: bool = False) -> int:
        """Number an event (of one of ``handoff.EVENT_KINDS``) and queue it as its report
        model; an urgent one (a refusal) is sent at once."""
        with self._lock:
            self._seq += 1
            seq = self._seq
            fields = {"seq": seq, "time": datetime.now(timezone.utc).isoformat(), **event}
            self._pending.append(run_event(kind, fields))
            full = len(self._pending) >= self.batch
        if urgent:
            self.flush()
        elif full:
            self._wake.set()
        return seq

    def flush(self) -> bool:
        """Send what is queued; False (and kept for the next try) if Prefect did not take it."""
        with self._sending:
            with self._lock:
                events, self._pending = self._pending, []
            if not events:
                return True
            try:
                if self._settings is None:
                    _send(self.flow_run_id, self.decision_id, events)
                else:
                    with self._settings.model_copy():
                        _send(self.flow_run_id, self.decision_id, events)
            except Exception as exc:
                with self._lock:
                    self._pending[:0] = events
                logger.warning("Governance events of this run not sent yet (%r); will retry", exc)
                return False
            return True

    def _loop(self) -> None:
        while not self._closed:
            self._wake.wait(self.interval)
            self._wake.clear()
            self.flush()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        if not self.flush():
            self.flush()  # one more try before the process ends


_unsealed_said: list[bool] = []


def sealed(
    secret: str | None,
    flow_run_id: str,
    decision_id: str,
    key: str,
    body: Report | dict[str, Any],
) -> dict[str, Any]:
    """A report's data as sent: authenticated with the run's secret (without one, as it
    is, and the worker will not believe it)."""
    body = {"decision_id": decision_id, **(body.report() if isinstance(body, Report) else body)}
    if not secret:
        if not _unsealed_said:  # once per process (not a failed send: the send goes on)
            _unsealed_said.append(True)
            logging.getLogger("prefect_governance.core.reports").warning(
                "This run has no report secret (%s): the worker will not believe its reports",
                REPORT_SECRET_ENV,
            )
        return body
    return seal(secret, flow_run_id=flow_run_id, kind=key, body=body)


def events_report(
    secret: str | None,
    flow_run_id: str,
    decision_id: str,
    events: Sequence[RunEvent | dict[str, Any]],
) -> dict[str, Any]:
    """One batch of events as sent: its decision, the range of its numbers, the events."""
    sent = [e.report() if isinstance(e, Report) else e for e in events]
    body = RunEventsReport(seq=[sent[0]["seq"], sent[-1]["seq"]], events=sent)
    return sealed(secret, flow_run_id, decision_id, RUN_EVENTS_KEY, body)


def _send(flow_run_id: str, decision_id: str, events: list[RunEvent]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate

    data = events_report(os.environ.get(REPORT_SECRET_ENV), flow_run_id, decision_id, events)

    with get_client(sync_client=True) as client:
        client.create_artifact(
            ArtifactCreate(
                key=RUN_EVENTS_KEY,
                type="json",
                description=f"Governance events {events[0].seq}-{events[-1].seq} "
                f"of decision {decision_id}",
                data=data,
                flow_run_id=flow_run_id,
            )
        )


_logs: dict[str, RunLog] = {}
_logs_lock = threading.Lock()


def run_log(flow_run_id: str, decision_id: str) -> RunLog:
    """The log of this flow run (one per run in this process, flushed at exit)."""
    with _logs_lock:
        log = _logs.get(flow_run_id)
        if log is None:
            log = _logs[flow_run_id] = RunLog(flow_run_id, decision_id)
            atexit.register(log.close)
        return log


def flush_run_log(flow_run_id: str | None) -> None:
    """Send this run's queued events now (at the end of a governed flow)."""
    log = _logs.get(str(flow_run_id)) if flow_run_id else None
    if log is not None:
        log.flush()
