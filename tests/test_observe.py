"""The observers of a governor: each sees every decision and outcome; one that fails is
skipped and changes nothing."""

from __future__ import annotations

from typing import Any

from prefect_governance.worker.observe import Decided, Observers, Settled


class Broken:
    def decided(self, seen: Decided) -> None:
        raise RuntimeError("a watcher bug")

    def settled(self, seen: Settled) -> None:
        raise RuntimeError("a watcher bug")


class Seen:
    def __init__(self) -> None:
        self.items: list[Any] = []

    def decided(self, seen: Decided) -> None:
        self.items.append(seen)

    def settled(self, seen: Settled) -> None:
        self.items.append(seen)


def test_a_failing_watcher_is_skipped_and_the_next_still_sees_it(caplog: Any) -> None:
    observers, seen = Observers(), Seen()
    observers.add(Broken())
    observers.add(seen)
    decided = Decided(assessment=None, flow_run_id="r", pool="p", lineage_seconds=0.01)  # type: ignore[arg-type]
    settled = Settled(None, "r", "COMPLETED", True, "worker", 0.02)  # type: ignore[arg-type]
    observers.decided(decided)
    observers.settled(settled)
    assert seen.items == [decided, settled]
    assert [r.message.split(" (")[0] for r in caplog.records] == [
        "A watcher of decisions failed",
        "A watcher of outcomes failed",
    ]
