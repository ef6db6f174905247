"""Scale: the cost of governing a run must not grow with the agent's history.

For 10, 1,000 and 100,000 prior events of one agent (whole runs: decision, outcome,
trust update; and a memory version per run), on SQLite and on PostgreSQL:

- the decision path the worker takes per run that touches history: the agent's
  trust and memory read from the lineage (``agent_state``), the policy decision
  (embedded engine) and the decision record appended (chained and committed);
- the lineage append rate (single-event transactions, one writer).

The histories are measured side by side, in rounds that alternate between them.

Prints each figure and its growth from 10 to 100,000 prior events; writes
benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from common import ROOT, percentiles, write_result
from sqlalchemy import insert
from workload import KEY, decision_record, history, policy_input

from prefect_governance.core.canonical import sha256_of
from prefect_governance.core.decision import decide
from prefect_governance.core.engines import EmbeddedEngine
from prefect_governance.core.models import DEFAULT_POLICY_PATH
from prefect_governance.lineage.memory import AgentMemory, MemoryStore
from prefect_governance.lineage.store import LineageStore
from prefect_governance.worker.blocks import GovernanceAgent
from prefect_governance.worker.governor import agent_state

AGENT = "scale-agent"
HISTORIES = (10, 1_000, 100_000)
ROUNDS = 5


def agent() -> GovernanceAgent:
    document = policy_input()["agent"]
    return GovernanceAgent(
        id=AGENT,
        owner=document["owner"],
        trust_scope=document["trust_scope"],
        capabilities=document["capabilities"],
        constraints=document["constraints"],
        trust_baseline=0.9,
    )


def seed(store: LineageStore, events: int) -> None:
    """``events`` prior records of the agent, and one memory version per run."""
    runs = 0
    for batch in history(AGENT, events):
        store.append(*batch)
        runs += len(batch) // 3
    schema_hash = sha256_of({"type": "object"})
    rows = [
        {
            "agent_id": AGENT,
            "version": v,
            "content": {"total_rows": v},
            "content_hash": sha256_of({"total_rows": v}),
            "schema_hash": schema_hash,
        }
        for v in range(1, runs + 1)
    ]
    MemoryStore(store.engine)  # migrated
    with store.engine.begin() as connection:
        for start in range(0, len(rows), 5000):
            connection.execute(insert(AgentMemory.__table__), rows[start : start + 5000])


class History:
    """One agent with some prior events in a database of its own, ready to be governed."""

    def __init__(self, url: str, events: int):
        self.events = events
        self.store = LineageStore(url, signer=KEY)  # as a governed worker signs
        seed(self.store, events)
        self.engine, self.agent = EmbeddedEngine(ROOT / "policies"), agent()
        self.memory, self.input = MemoryStore(self.store.engine), policy_input()
        self.runs = 0

    async def decide(self, count: int) -> list[float]:
        """Milliseconds per run for: agent state from the lineage, decision, decision record."""
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            trust, _snapshot = agent_state(self.store, self.memory, self.agent)
            self.input["agent"]["trust"] = trust.model_dump(mode="json")
            decision = await decide(self.engine, DEFAULT_POLICY_PATH, self.input)
            self.store.append(decision_record(AGENT, self.runs))
            samples.append((time.perf_counter() - started) * 1000)
            assert decision.verdict == "allowed", decision
            self.runs += 1
        return samples

    def append_rate(self, count: int) -> float:
        started = time.perf_counter()
        for _ in range(count):
            self.store.append(decision_record(AGENT, self.runs))
            self.runs += 1
        return count / (time.perf_counter() - started)


def measure(histories: list[History], decisions: int, appends: int) -> dict[str, Any]:
    """Each history's figures, measured in rounds that alternate between the histories (the
    machine's speed drifts: only figures taken side by side compare)."""
    samples: dict[int, list[float]] = {h.events: [] for h in histories}
    rates: dict[int, list[float]] = {h.events: [] for h in histories}
    for h in histories:
        asyncio.run(h.decide(20))  # warm-up
    for round_ in range(ROUNDS):
        order = histories[round_ % len(histories) :] + histories[: round_ % len(histories)]
        for h in order:
            samples[h.events] += asyncio.run(h.decide(decisions // ROUNDS))
            rates[h.events].append(h.append_rate(appends // ROUNDS))
    return {
        str(events): {
            "decision_path": percentiles(samples[events]),
            "append_per_s": round(statistics.median(rates[events])),
        }
        for events in samples
    }


@contextmanager
def database(kind: str, server_url: str | None) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{Path(tempfile.mkdtemp(prefix='bench-scale-')) / 'lineage.db'}"
        return
    from tests.pg_support import scratch_database

    with scratch_database(server_url, "scale") as url:
        yield url


@contextmanager
def postgres(enabled: bool) -> Iterator[str | None]:
    if not enabled:
        yield None
        return
    from tests.conftest import own_postgres

    with own_postgres("bench-pg-") as server:
        yield server.url


def growth(first: float, last: float) -> float:
    """How much a cost grew, as a fraction (0.1 = 10 % more)."""
    return round(last / first - 1, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller counts, for a smoke run")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    histories = (10, 100, 1_000) if args.quick else HISTORIES
    decisions, appends = (50, 100) if args.quick else (500, 1000)

    figures: dict[str, Any] = {}
    kinds = ["sqlite"] if args.no_postgres else ["sqlite", "postgresql"]
    with postgres(not args.no_postgres) as server_url:
        for kind in kinds:
            with ExitStack() as stack:
                urls = [stack.enter_context(database(kind, server_url)) for _ in histories]
                seeded = [History(url, events) for url, events in zip(urls, histories, strict=True)]
                rows = measure(seeded, decisions, appends)
                for h in seeded:
                    h.store.dispose()
            for events, row in rows.items():
                path = row["decision_path"]
                print(
                    f"{kind:10} {events:>7} prior events: decision path p50 "
                    f"{path['p50_ms']:.3f} ms p99 {path['p99_ms']:.3f} ms, "
                    f"append {row['append_per_s']} events/s"
                )
            first, last = rows[str(histories[0])], rows[str(histories[-1])]
            rows["growth"] = {
                "decision_path_p50": growth(
                    first["decision_path"]["p50_ms"], last["decision_path"]["p50_ms"]
                ),
                "append_time": growth(1 / first["append_per_s"], 1 / last["append_per_s"]),
            }
            print(f"{kind:10} growth {histories[0]} -> {histories[-1]}: {rows['growth']}")
            figures[kind] = rows
    write_result(
        "scale",
        figures,
        histories=list(histories),
        rounds=ROUNDS,
        decisions_per_history=decisions,
        appends_per_history=appends,
    )


if __name__ == "__main__":
    main()
