"""What happened inside a governed run, on its way to the lineage.

The run's process holds no lineage credentials. Its task decisions and
capability uses are numbered in order and travel back through Prefect, as
artifacts of the flow run (like memory proposals); after the run the worker
reads them, checks them and appends them to the agent's chain, between the
run's decision and its outcome.

Each batch is authenticated with the run's report secret (see
``prefect_governance.reports``): the worker believes only batches whose MAC
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
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.context import SettingsContext

from prefect_governance.reports import REPORT_SECRET_ENV, seal

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient

RUN_EVENTS_KEY = "governance-run-events"
EVENT_KINDS = ("task_decision", "capability_use")
PAGE = 200  # artifacts per read (the server's default limit)

logger = logging.getLogger("prefect_governance.run_log")


class RunLog:
    """One flow run's events, numbered in order, sent to Prefect in batches."""

    def __init__(
        self, flow_run_id: str, decision_id: str, *, batch: int = 100, interval: float = 2.0
    ):
        self.flow_run_id = flow_run_id
        self.decision_id = decision_id
        self.batch = batch
        self.interval = interval
        self._pending: list[dict[str, Any]] = []
        self._seq = 0
        self._lock = threading.Lock()  # numbering and the pending list
        self._sending = threading.Lock()  # one batch on its way at a time, in order
        self._wake = threading.Event()
        self._closed = False
        # Prefect's settings (the API to send to) as where the log was made, for every thread.
        self._settings = SettingsContext.get()
        self._thread = threading.Thread(target=self._loop, name="governance-run-log", daemon=True)
        self._thread.start()

    def add(self, kind: str, event: dict[str, Any], *, urgent: bool = False) -> int:
        """Number an event and queue it; an urgent one (a refusal) is sent at once."""
        with self._lock:
            self._seq += 1
            seq = self._seq
            self._pending.append(
                {"seq": seq, "kind": kind, "time": datetime.now(timezone.utc).isoformat(), **event}
            )
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
    secret: str | None, flow_run_id: str, decision_id: str, key: str, body: dict[str, Any]
) -> dict[str, Any]:
    """A report's data as sent: authenticated with the run's secret (without one, as it
    is, and the worker will not believe it)."""
    body = {"decision_id": decision_id, **body}
    if not secret:
        if not _unsealed_said:  # once per process (not a failed send: the send goes on)
            _unsealed_said.append(True)
            logging.getLogger("prefect_governance.reports").warning(
                "This run has no report secret (%s): the worker will not believe its reports",
                REPORT_SECRET_ENV,
            )
        return body
    return seal(secret, flow_run_id=flow_run_id, kind=key, body=body)


def events_report(
    secret: str | None, flow_run_id: str, decision_id: str, events: list[dict[str, Any]]
) -> dict[str, Any]:
    """One batch of events as sent: its decision, the range of its numbers, the events."""
    body = {"seq": [events[0]["seq"], events[-1]["seq"]], "events": events}
    return sealed(secret, flow_run_id, decision_id, RUN_EVENTS_KEY, body)


def _send(flow_run_id: str, decision_id: str, events: list[dict[str, Any]]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate

    data = events_report(os.environ.get(REPORT_SECRET_ENV), flow_run_id, decision_id, events)

    with get_client(sync_client=True) as client:
        client.create_artifact(
            ArtifactCreate(
                key=RUN_EVENTS_KEY,
                type="json",
                description=f"Governance events {events[0]['seq']}-{events[-1]['seq']} "
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


# --- the worker's side -------------------------------------------------------


async def read_artifacts(
    client: PrefectClient, flow_run_id: Any, key: str
) -> list[tuple[str, dict[str, Any]]]:
    """(artifact id, JSON data) of a run's artifacts with this key, oldest first (all pages)."""
    import json

    artifacts: list[Any] = []
    while True:
        page = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            limit=PAGE,
            offset=len(artifacts),
        )
        artifacts.extend(page)
        if len(page) < PAGE:
            break
    data = []
    for artifact in sorted(artifacts, key=lambda a: str(a.created)):
        value = artifact.data
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = None
        data.append((str(artifact.id), value if isinstance(value, dict) else {}))
    return data


async def read_artifact_data(
    client: PrefectClient, flow_run_id: Any, key: str
) -> list[dict[str, Any]]:
    """The JSON data of a run's artifacts with this key, oldest first (all pages), as any
    API client left them: not authenticated (the worker reads them through
    ``Governor.run_reports``)."""
    return [data for _, data in await read_artifacts(client, flow_run_id, key)]


def reported_events(
    batches: Iterable[dict[str, Any]], decision_id: str
) -> tuple[list[dict[str, Any]], list[str]]:
    """The run's events in order (each once), and what is wrong with what was reported.

    A ``{"rejected": [...]}`` item carries what the worker rejected before (artifacts
    whose MAC did not verify: see ``Governor.run_reports``), reported with the rest.
    """
    by_seq: dict[int, dict[str, Any]] = {}
    problems: list[str] = []
    for batch in batches:
        if "rejected" in batch:
            problems.extend(str(p) for p in batch["rejected"] or [])
            continue
        if batch.get("decision_id") != decision_id:
            problems.append(
                f"a batch of events names another decision ({batch.get('decision_id')!r})"
            )
            continue
        for event in batch.get("events") or []:
            seq = event.get("seq") if isinstance(event, dict) else None
            if not isinstance(seq, int) or event.get("kind") not in EVENT_KINDS:
                problems.append(f"an event that is not a governance event: {str(event)[:200]}")
                continue
            by_seq.setdefault(seq, event)  # a batch sent twice (a retried send) counts once
    if by_seq:
        missing = sorted(set(range(1, max(by_seq) + 1)) - set(by_seq))
        if missing:
            problems.append(f"events missing from the run's report: seq {_ranges(missing)}")
    return [by_seq[seq] for seq in sorted(by_seq)], problems


def _ranges(numbers: list[int]) -> str:
    spans: list[str] = []
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        spans.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(spans)
