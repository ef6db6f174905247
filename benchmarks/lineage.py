"""Lineage throughput: committed appends per second, and chain verification per second.

Appends: each writer is its own process (as each worker is) with its own agent
chain, appending one decision event per transaction (chained, hashed and
committed durably: SQLite in WAL with synchronous=FULL, PostgreSQL with fsync and
synchronous_commit on), on SQLite and on PostgreSQL, with 1 and 4 writers.
Every record is signed with a lineage key, as a governed worker signs it.
Verification: ``LineageStore.verify()`` and ``unvouched`` (what ``lineage verify``
runs) over a chain of 100,000 events.
Writes benchmarks/results/lineage.json.
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common import write_result
from workload import KEY, decision_record, history

from prefect_governance.lineage.store import LineageStore

WRITERS = (1, 4)


def _writer(url: str, chain: str, count: int, barrier: Any, out: Any) -> None:
    store = LineageStore(url, signer=KEY)
    barrier.wait()
    started = time.monotonic()
    for i in range(count):
        store.append(decision_record(chain, i))
    out.put((started, time.monotonic()))
    store.dispose()


def append_rate(url: str, writers: int, per_writer: int) -> float:
    """Committed single-event appends per second, all writers together."""
    LineageStore(url).dispose()  # migrate once, outside the measurement
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(writers), ctx.Queue()
    processes = [
        ctx.Process(target=_writer, args=(url, f"writer-{writers}-{w}", per_writer, barrier, out))
        for w in range(writers)
    ]
    for p in processes:
        p.start()
    spans = [out.get(timeout=600) for _ in processes]
    for p in processes:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"a writer exited with {p.exitcode}")
    elapsed = max(end for _, end in spans) - min(start for start, _ in spans)
    return writers * per_writer / elapsed


def verify_rate(url: str, events: int) -> tuple[float, float]:
    """Events verified per second on one chain of ``events`` records (and seed rate)."""
    store = LineageStore(url, signer=KEY)
    started = time.monotonic()
    seeded = 0
    for batch in history("verify-agent", events, batch=1000):
        store.append(*batch)
        seeded += len(batch)
    seed_rate = seeded / (time.monotonic() - started)
    started = time.monotonic()
    problems = store.verify()
    unvouched = store.unvouched_chains()
    elapsed = time.monotonic() - started
    store.dispose()
    if problems:
        raise RuntimeError(f"the seeded chain does not verify: {problems[0].message}")
    if unvouched:
        raise RuntimeError(f"the seeded chain is not vouched for: {unvouched}")
    return seeded / elapsed, seed_rate


@contextmanager
def databases(postgres: bool) -> Iterator[dict[str, str]]:
    """A fresh SQLite file and, unless skipped, a throwaway PostgreSQL cluster."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-lineage-"))
    urls = {"sqlite": f"sqlite:///{workdir}/lineage.db"}
    if not postgres:
        yield urls
        return
    from tests.conftest import own_postgres

    with own_postgres("bench-pg-") as server:
        urls["postgresql"] = server.url
        yield urls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    per_writer = 200 if args.quick else 2000
    verify_events = 5000 if args.quick else 100_000

    figures: dict[str, Any] = {"append_per_s": {}, "verify_per_s": {}, "seed_per_s": {}}
    with databases(not args.no_postgres) as urls:
        for name, url in urls.items():
            for writers in WRITERS:
                rate = append_rate(url, writers, per_writer)
                figures["append_per_s"].setdefault(name, {})[str(writers)] = round(rate)
                print(f"{name:10} append, {writers} writer(s): {rate:8.0f} events/s")
            verified, seeded = verify_rate(url, verify_events)
            figures["verify_per_s"][name] = round(verified)
            figures["seed_per_s"][name] = round(seeded)
            print(f"{name:10} verify {verify_events} events: {verified:8.0f} events/s")
            print(f"{name:10} append in batches of 1000: {seeded:8.0f} events/s")
    write_result(
        "lineage",
        figures,
        appends_per_writer=per_writer,
        verify_events=verify_events,
        durability="SQLite WAL synchronous=FULL; PostgreSQL fsync=on synchronous_commit=on",
    )


if __name__ == "__main__":
    main()
