"""What a governed worker tells those who watch it: each decision and each settled run,
after the lineage has (or could not have) recorded it.

Watchers (the worker's metrics, Prefect events, traces) subscribe to a ``Governor``'s
``observers``. A watcher sees what was decided; it cannot change it, and one that fails is
logged and skipped: watching never refuses, delays or un-refuses a run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from prefect_governance.worker.governor import Assessment

_logger = logging.getLogger("prefect_governance.worker.observe")


@dataclass(frozen=True)
class Decided:
    """One run's decision, as ``Governor.admit`` returns it."""

    assessment: Assessment
    flow_run_id: str
    pool: str
    # Seconds the lineage took to append the decision; None when it was not appended.
    lineage_seconds: float | None
    # Why the lineage could not take the decision (the run was refused for it), else None.
    lineage_error: str | None = None


@dataclass(frozen=True)
class Settled:
    """One run's outcome, once ``Governor.record_run_end`` has written (or found) it."""

    assessment: Assessment
    flow_run_id: str
    state: str
    # False: another worker had recorded this run's outcome already; nothing was appended.
    recorded: bool
    by: Literal["worker", "reconciler"]
    lineage_seconds: float | None
    lineage_error: str | None = None


class Observer(Protocol):
    """A watcher of decisions and outcomes; called in the worker's event loop, so quick."""

    def decided(self, seen: Decided) -> None: ...

    def settled(self, seen: Settled) -> None: ...


class Observers:
    """The watchers of one governor, each called in turn, none able to fail the call."""

    def __init__(self) -> None:
        self._watchers: list[Observer] = []

    def add(self, watcher: Observer) -> None:
        self._watchers.append(watcher)

    def decided(self, seen: Decided) -> None:
        for watcher in self._watchers:
            try:
                watcher.decided(seen)
            except Exception:
                _logger.exception("A watcher of decisions failed (%r); skipped", watcher)

    def settled(self, seen: Settled) -> None:
        for watcher in self._watchers:
            try:
                watcher.settled(seen)
            except Exception:
                _logger.exception("A watcher of outcomes failed (%r); skipped", watcher)
