"""Decision latency and throughput, end to end from the policy input to the Decision.

Each decision is ``prefect_governance.decision.decide``, the call the worker
makes, with the default policy library (policies/) and the `allowed` example
input widened to 20 parameters. Engines: embedded (regorus, in-process) and an
OPA sidecar on loopback (started here from OPA_BIN).

Latency: one decision at a time, p50/p95/p99 over N decisions after a warm-up.
Throughput: decisions per second from this one process with 1, 8 and 64
decisions in flight (asyncio tasks calling decide() concurrently, as a worker
with many runs would).

    python benchmarks/decision_latency.py            # 2,000 decisions per figure
    python benchmarks/decision_latency.py --quick    # 200, for a smoke test

Prints a table and writes benchmarks/results/decision_latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from common import (
    ROOT,
    describe,
    machine,
    opa_sidecar,
    opa_version,
    percentiles,
    write_result,
)
from workload import policy_input

from prefect_governance.decision import decide
from prefect_governance.engines import EmbeddedEngine, OpaEngine, PolicyEngine
from prefect_governance.models import DEFAULT_POLICY_PATH

PARAMETERS = 20
CONCURRENCY = (1, 8, 64)
GOALS = {"embedded": (0.25, 1.0), "opa": (1.0, 3.0)}  # p50, p99 in ms

Decide = Callable[[], Awaitable[Any]]


def decider(engine: PolicyEngine, document: dict[str, Any]) -> Decide:
    """One decision, checked: a benchmark of refusals would measure the wrong thing."""

    async def one() -> None:
        decision = await decide(engine, DEFAULT_POLICY_PATH, document)
        if decision.verdict != "allowed":
            raise SystemExit(f"{engine.name}: expected an allowed run, got {decision}")

    return one


async def latency(one: Decide, n: int, warmup: int) -> dict[str, float]:
    """Percentiles of ``n`` sequential decisions after ``warmup`` unmeasured ones."""
    for _ in range(warmup):
        await one()
    samples: list[float] = []
    for _ in range(n):
        started = time.perf_counter()
        await one()
        samples.append((time.perf_counter() - started) * 1000)
    return percentiles(samples)


async def in_flight(one: Decide, n: int, concurrency: int) -> None:
    """``n`` decisions, ``concurrency`` at a time (tasks that each take the next one)."""
    remaining = n

    async def runner() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await one()

    await asyncio.gather(*(runner() for _ in range(concurrency)))


async def throughput(one: Decide, n: int, concurrency: int) -> float:
    """Decisions per second for ``n`` decisions with ``concurrency`` in flight."""
    await in_flight(one, 2 * concurrency, concurrency)  # OPA: open the connections first
    started = time.perf_counter()
    await in_flight(one, n, concurrency)
    return round(n / (time.perf_counter() - started), 1)


async def measure(engine: PolicyEngine, n: int, warmup: int) -> dict[str, Any]:
    """Latency percentiles and throughput at each concurrency for one engine."""
    one = decider(engine, policy_input(PARAMETERS))
    gc.collect()
    figures: dict[str, Any] = {"latency": await latency(one, n, warmup)}
    figures["throughput"] = {str(c): await throughput(one, n, c) for c in CONCURRENCY}
    return figures


def table(figures: dict[str, Any], n: int, warmup: int, info: dict[str, Any]) -> str:
    """The figures against the goals, as text."""
    lines = [
        f"decision latency over {n} decisions after {warmup} warm-up ({describe(info)})",
        f"{'engine':10} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}   goal p50/p99 ms",
    ]
    for name, (p50_goal, p99_goal) in GOALS.items():
        if name not in figures:
            continue
        row = figures[name]
        met = "met" if row["p50_ms"] <= p50_goal and row["p99_ms"] <= p99_goal else "MISSED"
        lines.append(
            f"{name:10} {row['p50_ms']:8.3f} {row['p95_ms']:8.3f} {row['p99_ms']:8.3f}"
            f"   {p50_goal:g}/{p99_goal:g} {met}"
        )
    lines.append("")
    lines.append(f"decisions/s from one process ({n} decisions per cell)")
    lines.append(f"{'engine':10} " + " ".join(f"{f'{c} in flight':>12}" for c in CONCURRENCY))
    for name, row in figures["throughput"].items():
        lines.append(f"{name:10} " + " ".join(f"{row[str(c)]:12,.0f}" for c in CONCURRENCY))
    return "\n".join(lines)


async def run(n: int, warmup: int) -> dict[str, Any]:
    """Both engines: embedded in-process, then OPA as a loopback sidecar."""
    figures: dict[str, Any] = {"throughput": {}}
    embedded = await measure(EmbeddedEngine(ROOT / "policies"), n, warmup)
    figures["embedded"] = embedded["latency"]
    figures["throughput"]["embedded"] = embedded["throughput"]
    with opa_sidecar() as url:
        engine = OpaEngine(url)
        try:
            opa = await measure(engine, n, warmup)
        finally:
            await engine.aclose()
    figures["opa"] = opa["latency"]
    figures["throughput"]["opa"] = opa["throughput"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="200 decisions, 20 warm-up")
    parser.add_argument("-n", type=int, help="decisions per figure (default 2000)")
    parser.add_argument("--warmup", type=int, help="unmeasured decisions first (default 200)")
    args = parser.parse_args()
    n = args.n or (200 if args.quick else 2000)
    warmup = args.warmup if args.warmup is not None else (20 if args.quick else 200)
    load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    figures = asyncio.run(run(n, warmup))
    load_after = os.getloadavg()[0]
    print(table(figures, n, warmup, machine()))
    print(f"load average (1 min) before {load_before:.2f}, after {load_after:.2f}")
    write_result(
        "decision_latency",
        figures,
        decisions=n,
        warmup=warmup,
        parameters=PARAMETERS,
        concurrency=list(CONCURRENCY),
        policy_path=DEFAULT_POLICY_PATH,
        opa=opa_version(),
        load_average=[round(load_before, 2), round(load_after, 2)],
    )


if __name__ == "__main__":
    main()
