"""Decision latency and throughput, end to end from the policy input to the Decision.

Each decision is ``prefect_governance.core.decision.decide`` (or ``decide_sync``, as
a governed task's run engine calls it), with the default policy library
(policies/) and the `allowed` example input widened to 20 parameters. Engines,
measured side by side in one run, in interleaved rounds (the machines here are
shared and noisy: compare ratios within one run):

- ``embedded``: OPA's Go SDK in-process (the product's engine, ``EmbeddedEngine``);
- ``regorus``: the regorus build it replaced (``benchmarks/regorus_engine.py``;
  only if ``regorus``, the `bench` extra, is installed);
- ``opa``: an OPA sidecar on loopback, started here from OPA_BIN.

Latency: one decision at a time, p50/p95/p99 after a warm-up.
Throughput: decisions per second from this one process with 1, 8 and 64
decisions in flight. The in-process engines are synchronous: the worker's gate
calls them on its event loop (so its decisions never overlap: 1 in flight), a
governed task's run engine from the task's own thread; so in flight here means
threads calling ``decide_sync`` (the native library releases the GIL; regorus
holds it, one engine per thread). The sidecar: asyncio tasks calling ``decide``.

Then where an embedded decision's time goes (``--no-breakdown`` skips it): its
Python parts timed here, its Go parts by ``native/bench_test.go`` (``go test
-bench``, needs Go), and the decision's latency under GOGC=100/400/off (each in
a subprocess, rounds interleaved).

    python benchmarks/decision_latency.py            # 2,000 decisions per figure
    python benchmarks/decision_latency.py --quick    # 200, for a smoke test

Prints a table and writes benchmarks/results/decision_latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.metadata
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
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
from regorus_engine import RegorusEngine, available
from workload import policy_input

from prefect_governance.core.decision import decide, decide_sync, decision_for
from prefect_governance.core.engines import EmbeddedEngine, OpaEngine, PolicyEngine
from prefect_governance.core.engines import native as native_lib
from prefect_governance.core.engines.base import EngineAnswer, encode_input
from prefect_governance.core.engines.embedded import first_value, rego_ref
from prefect_governance.core.models import DEFAULT_POLICY_PATH

PARAMETERS = 20
CONCURRENCY = (1, 8, 64)
ROUNDS = 10
# Issue 16's goals for the embedded engine; the sidecar's are issue 6's.
LATENCY_GOALS = {"embedded": (0.15, 0.5), "opa": (1.0, 3.0)}  # p50, p99 in ms
THROUGHPUT_GOALS = {"embedded": 3500.0}  # decisions/s at each concurrency
# Go's collector settings compared (environment of a subprocess each): the default,
# the library's (400), none, and none until the heap reaches a limit.
GC_SETTINGS = {
    "100": {"GOGC": "100"},
    "400": {"GOGC": "400"},
    "off": {"GOGC": "off"},
    "off, GOMEMLIMIT=256MiB": {"GOGC": "off", "GOMEMLIMIT": "256MiB"},
}
NATIVE = ROOT / "native"


# -- the engines and one decision ------------------------------------------------


class Bench:
    """One engine under test: its async and (in-process) sync decision, checked."""

    def __init__(self, engine: PolicyEngine, document: dict[str, Any]):
        self.engine = engine
        self.name = engine.name
        self.document = document
        self.in_process = getattr(engine, "evaluate_sync", None) is not None

    @staticmethod
    def _check(engine: PolicyEngine, decision: Any) -> None:
        # A benchmark of refusals would measure the wrong thing.
        if decision.verdict != "allowed":
            raise SystemExit(f"{engine.name}: expected an allowed run, got {decision}")

    async def one(self) -> None:
        self._check(self.engine, await decide(self.engine, DEFAULT_POLICY_PATH, self.document))

    def one_sync(self) -> None:
        self._check(self.engine, decide_sync(self.engine, DEFAULT_POLICY_PATH, self.document))


# -- latency and throughput ---------------------------------------------------------


async def latency_round(bench: Bench, n: int, samples: list[float]) -> None:
    for _ in range(n):
        started = time.perf_counter()
        await bench.one()
        samples.append((time.perf_counter() - started) * 1000)


async def in_flight(bench: Bench, n: int, concurrency: int) -> None:
    """``n`` decisions, ``concurrency`` at a time (asyncio tasks taking the next one)."""
    remaining = n

    async def runner() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await bench.one()

    await asyncio.gather(*(runner() for _ in range(concurrency)))


def threads_in_flight(bench: Bench, pool: ThreadPoolExecutor, n: int, concurrency: int) -> None:
    """``n`` decisions, ``concurrency`` threads at a time (each taking the next one)."""
    counter = itertools.count()  # next() is atomic under the GIL

    def runner() -> None:
        while next(counter) < n:
            bench.one_sync()

    for future in [pool.submit(runner) for _ in range(concurrency)]:
        future.result()


async def throughput_round(
    bench: Bench, pools: dict[int, ThreadPoolExecutor], n: int, concurrency: int
) -> float:
    """Seconds for ``n`` decisions with ``concurrency`` in flight."""
    if bench.in_process:
        started = time.perf_counter()
        threads_in_flight(bench, pools[concurrency], n, concurrency)
    else:
        started = time.perf_counter()
        await in_flight(bench, n, concurrency)
    return time.perf_counter() - started


async def measure(benches: list[Bench], n: int, warmup: int, rounds: int) -> dict[str, Any]:
    """Every engine's latency and throughput, in rounds that rotate the engines' order."""
    pools = {c: ThreadPoolExecutor(max_workers=c) for c in CONCURRENCY}
    try:
        for bench in benches:  # warm up, each thread of each pool too (regorus compiles)
            for _ in range(warmup):
                await bench.one()
            for c in CONCURRENCY:
                if bench.in_process:
                    threads_in_flight(bench, pools[c], max(warmup, 2 * c), c)
                else:
                    await in_flight(bench, 2 * c, c)  # OPA: open the connections first
        samples: dict[str, list[float]] = {b.name: [] for b in benches}
        seconds = {b.name: dict.fromkeys(CONCURRENCY, 0.0) for b in benches}
        per_round = max(1, n // rounds)
        gc.collect()
        for r in range(rounds):
            order = benches[r % len(benches) :] + benches[: r % len(benches)]
            for bench in order:
                await latency_round(bench, per_round, samples[bench.name])
            for c in CONCURRENCY:
                for bench in order:
                    seconds[bench.name][c] += await throughput_round(bench, pools, per_round, c)
        figures: dict[str, Any] = {"throughput": {}}
        for bench in benches:
            figures[bench.name] = percentiles(samples[bench.name])
            figures["throughput"][bench.name] = {
                str(c): round(per_round * rounds / seconds[bench.name][c], 1) for c in CONCURRENCY
            }
        return figures
    finally:
        for pool in pools.values():
            pool.shutdown()


# -- where the embedded decision's time goes ------------------------------------------


def python_parts(engine: EmbeddedEngine, document: dict[str, Any], n: int) -> dict[str, Any]:
    """The Python side of one embedded decision and the ctypes calls, each part timed
    in the same iteration as the others (so their shares hold on a noisy machine)."""
    policy, revision = engine._current
    query = rego_ref(DEFAULT_POLICY_PATH)
    lib = native_lib.library()
    clock = time.perf_counter_ns
    names = (
        "decide_sync (the whole decision)",
        "encode_input (orjson)",
        "Policy.query (ctypes call into Go and back)",
        "first_value (orjson.loads of the result)",
        "decision_for (PolicyResult + Decision, pydantic)",
        "ctypes: empty call into Go (rg_open_handles)",
        "ctypes: trivial query, no input (Policy.query 'true')",
    )
    samples: dict[str, list[float]] = {name: [] for name in names}
    raw = b""
    for i in range(n + max(20, n // 10)):
        t0 = clock()
        decide_sync(engine, DEFAULT_POLICY_PATH, document)
        t1 = clock()
        encoded = encode_input(document)
        t2 = clock()
        raw = policy.query(query, encoded, timeout=5.0)
        t3 = clock()
        result = first_value(raw)
        t4 = clock()
        decision_for(
            EngineAnswer(result=result, revision=revision),
            engine="embedded",
            policy_path=DEFAULT_POLICY_PATH,
            mode="enforce",
            fail_mode="closed",
        )
        t5 = clock()
        lib.rg_open_handles()
        t6 = clock()
        policy.query("true", None, timeout=5.0)
        t7 = clock()
        if i < max(20, n // 10):  # warm-up
            continue
        stamps = (t0, t1, t2, t3, t4, t5, t6, t7)
        for name, (a, b) in zip(names, itertools.pairwise(stamps), strict=True):
            samples[name].append((b - a) / 1000)
    parts = {}
    for name, values in samples.items():
        q = statistics.quantiles(values, n=100, method="inclusive")
        parts[name] = {
            "p50_us": round(q[49], 2),
            "p99_us": round(q[98], 2),
            "mean_us": round(statistics.fmean(values), 2),
        }
    return {"result_bytes": len(raw), "input_bytes": len(encoded), "parts_us": parts}


BENCH_LINE = re.compile(
    r"^Benchmark(\w+)-\d+\s+\d+\s+([\d.]+) ns/op(?:.*?(\d+) B/op\s+(\d+) allocs/op)?"
)
PART_METRIC = re.compile(r"([\d.]+) ([\w-]+)-ns/op")
GO_PARTS = {
    "InputToAST": "Go: input JSON -> ast.Value (readInput: util.UnmarshalJSON, InterfaceToValue)",
    "Deadline": "Go: deadline (topdown cancel + time.AfterFunc)",
    "EvalPrepared": "Go: eval of the prepared query (incl. result ast -> Go values)",
    "ResultASTToGo": "Go: of which, result ast.Value -> Go values (ast.JSON)",
    "ResultToJSON": "Go: result Go values -> JSON (json.Marshal)",
    "EvalBody": "Go: all of rg_eval's body (the above together)",
    "EvalTrivial": "Go: eval of a trivial prepared query ('true', no input): fixed cost",
    "EvalSharedTxn": "Go, alternative: the eval in one long-lived store read transaction",
    "DecisionParts": "Go: rg_eval's body, parts timed in one loop (below)",
    "InputDirect": "Go, candidate: input JSON parsed straight to ast.Value",
    "EvalBodyDirect": "Go, candidate: rg_eval's body with that input parser",
    "InputAB": "Go: input + eval, readInput and the candidate in one loop",
}
# BenchmarkInputAB's figures: the two input conversions alternated in one loop.
AB_METRICS = {
    "input-any": "input, readInput (main.go)",
    "input-direct": "input, parsed straight to ast.Value (candidate)",
    "decision-any": "input + eval, readInput (main.go)",
    "decision-direct": "input + eval, parsed straight (candidate)",
}
PART_METRICS = {
    "prepare": "prepared-query lookup",
    "input": "input JSON -> ast.Value",
    "deadline": "deadline set-up",
    "eval": "evaluation (incl. result ast -> Go values)",
    "result": "result -> JSON, timer stopped",
}
# As the library runs (native.GC_PERCENT), unless GOGC is set.
GO_BENCH_GOGC = os.environ.get("GOGC") or str(native_lib.GC_PERCENT)


def go_parts(benchtime: str, count: int, gogc: str = GO_BENCH_GOGC) -> dict[str, Any]:
    """native/bench_test.go's figures (``go test -bench``), or why there are none."""
    go = shutil.which("go")
    if go is None:
        return {"skipped": "no Go toolchain"}
    env = {**os.environ, "GOGC": gogc}
    done = subprocess.run(
        [go, "test", "-run", "^$", "-bench", ".", "-benchmem",
         "-benchtime", benchtime, "-count", str(count), "./"],
        cwd=NATIVE, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if done.returncode != 0:
        return {"skipped": "go test failed: " + (done.stderr or done.stdout)[-500:]}
    runs: dict[str, list[tuple[float, int, int]]] = {}
    metrics: dict[str, list[float]] = {}
    ab: dict[str, list[float]] = {}
    for line in done.stdout.splitlines():
        match = BENCH_LINE.match(line)
        if match:
            name, ns, size, allocs = match.groups()
            runs.setdefault(name, []).append((float(ns), int(size or 0), int(allocs or 0)))
            into = ab if name == "InputAB" else metrics
            for value, metric in PART_METRIC.findall(line):
                into.setdefault(metric, []).append(float(value))
    figures: dict[str, Any] = {
        GO_PARTS.get(name, name): {
            "us": round(statistics.median(r[0] for r in rows) / 1000, 2),
            "bytes": rows[0][1],
            "allocs": rows[0][2],
        }
        for name, rows in runs.items()
    }
    medians = {m: statistics.median(v) / 1000 for m, v in metrics.items() if m in PART_METRICS}
    total = sum(medians.values())
    figures["parts"] = {
        PART_METRICS[m]: {"us": round(us, 2), "share": round(us / total, 3) if total else 0}
        for m, us in medians.items()
    }
    figures["input_ab"] = {
        AB_METRICS[m]: round(statistics.median(v) / 1000, 2)
        for m, v in ab.items()
        if m in AB_METRICS
    }
    return figures


def gc_probe(n: int, warmup: int) -> dict[str, Any]:
    """(In a subprocess with GOGC set:) the embedded decision's latency, and 8 threads' rate."""
    bench = Bench(EmbeddedEngine(ROOT / "policies"), policy_input(PARAMETERS))
    for _ in range(warmup):
        bench.one_sync()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        bench.one_sync()
        samples.append((time.perf_counter() - started) * 1000)
    with ThreadPoolExecutor(max_workers=8) as pool:
        threads_in_flight(bench, pool, 64, 8)
        started = time.perf_counter()
        threads_in_flight(bench, pool, n, 8)
        rate = n / (time.perf_counter() - started)
    rss_kib = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kib = int(line.split()[1])
    return {**percentiles(samples), "throughput_8": round(rate, 1), "rss_mib": rss_kib // 1024}


def gc_comparison(n: int, warmup: int, rounds: int) -> dict[str, Any]:
    """The decision under each GOGC, a subprocess each, in rounds rotating their order."""
    names = list(GC_SETTINGS)
    results: dict[str, list[dict[str, Any]]] = {g: [] for g in names}
    for r in range(rounds):
        for gogc in names[r % len(names) :] + names[: r % len(names)]:
            env = {k: v for k, v in os.environ.items() if k not in ("GOGC", "GOMEMLIMIT")}
            done = subprocess.run(
                [sys.executable, __file__, "--gc-probe", str(n), "--warmup", str(warmup)],
                env={**env, **GC_SETTINGS[gogc]},
                capture_output=True, text=True, timeout=600, check=True,
            )  # fmt: skip
            results[gogc].append(json.loads(done.stdout.strip().splitlines()[-1]))
    summary = {}
    for gogc, rows in results.items():
        summary[gogc] = {
            key: round(statistics.median(row[key] for row in rows), 4)
            for key in ("p50_ms", "p95_ms", "p99_ms", "throughput_8", "rss_mib")
        }
        summary[gogc]["rounds"] = len(rows)
    return summary


def breakdown(n: int, warmup: int, quick: bool) -> dict[str, Any]:
    engine = EmbeddedEngine(ROOT / "policies")
    document = policy_input(PARAMETERS)
    gc.collect()
    return {
        "python": python_parts(engine, document, n),
        "go": go_parts("200x" if quick else "1s", 1 if quick else 3),
        "go_gogc": GO_BENCH_GOGC,
        "gogc": gc_comparison(n, warmup, 1 if quick else 3),
    }


# -- output ---------------------------------------------------------------------------


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def table(figures: dict[str, Any], n: int, warmup: int, info: dict[str, Any]) -> str:
    """The figures against the goals, as text."""
    engines = [e for e in ("embedded", "regorus", "opa") if e in figures]
    lines = [
        f"decision latency over {n} decisions per engine after {warmup} warm-up, "
        f"{ROUNDS} interleaved rounds ({describe(info)})",
        f"{'engine':10} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}   goal p50/p99 ms",
    ]
    for name in engines:
        row = figures[name]
        goal = ""
        if name in LATENCY_GOALS:
            p50_goal, p99_goal = LATENCY_GOALS[name]
            p50_met = "met" if row["p50_ms"] <= p50_goal else "MISSED"
            p99_met = "met" if row["p99_ms"] <= p99_goal else "MISSED"
            goal = f"   p50 <= {p50_goal:g} {p50_met}, p99 <= {p99_goal:g} {p99_met}"
        lines.append(
            f"{name:10} {row['p50_ms']:8.3f} {row['p95_ms']:8.3f} {row['p99_ms']:8.3f}{goal}"
        )
    for other in engines[1:]:
        ours, theirs = figures["embedded"], figures[other]
        lines.append(
            f"embedded / {other}: p50 {ratio(ours['p50_ms'], theirs['p50_ms'])}"
            f", p99 {ratio(ours['p99_ms'], theirs['p99_ms'])}"
        )
    lines.append("")
    lines.append(
        "decisions/s from one process (in-process engines: threads calling decide_sync; "
        "opa: asyncio tasks)"
    )
    lines.append(f"{'engine':10} " + " ".join(f"{f'{c} in flight':>12}" for c in CONCURRENCY))
    rates = figures["throughput"]
    for name in engines:
        row = rates[name]
        cells = " ".join(f"{row[str(c)]:12,.0f}" for c in CONCURRENCY)
        goal = THROUGHPUT_GOALS.get(name)
        if goal:
            met = all(row[str(c)] >= goal for c in CONCURRENCY)
            cells += f"   goal >= {goal:,.0f} at each: {'met' if met else 'MISSED'}"
        lines.append(f"{name:10} {cells}")
    for other in engines[1:]:
        lines.append(
            f"embedded / {other}: "
            + ", ".join(
                f"{c}: {ratio(rates['embedded'][str(c)], rates[other][str(c)])}"
                for c in CONCURRENCY
            )
        )
    if "breakdown" in figures:
        lines.extend(breakdown_lines(figures["breakdown"]))
    return "\n".join(lines)


def breakdown_lines(parts: dict[str, Any]) -> list[str]:
    py = parts["python"]
    lines = [
        "",
        f"where an embedded decision's time goes (input {py['input_bytes']} B of JSON, "
        f"result {py['result_bytes']} B)",
        f"{'part':64} {'p50 us':>9} {'p99 us':>9}",
    ]
    for name, row in py["parts_us"].items():
        lines.append(f"{name:64} {row['p50_us']:9.1f} {row['p99_us']:9.1f}")
    go = parts["go"]
    if "skipped" in go:
        lines.append(f"Go parts: skipped ({go['skipped']})")
    else:
        title = f"part (go test -bench, GOGC={parts['go_gogc']}, median of runs)"
        lines.append(f"{title:64} {'us/op':>9} {'allocs':>9}")
        for name, row in go.items():
            if name not in ("parts", "input_ab"):
                lines.append(f"{name:64} {row['us']:9.1f} {row['allocs']:9d}")
        lines.append(f"{'  of which, timed in the same loop':64} {'us/op':>9} {'share':>9}")
        for name, row in go["parts"].items():
            lines.append(f"{'    ' + name:64} {row['us']:9.1f} {row['share']:9.1%}")
        if go.get("input_ab"):
            lines.append(f"{'  input conversion, main.go vs candidate, one loop':64} {'us/op':>9}")
            for name, us in go["input_ab"].items():
                lines.append(f"{'    ' + name:64} {us:9.1f}")
    lines.append(f"{'GOGC (subprocess each)':24} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
                 f" {'8 threads/s':>12} {'RSS MiB':>8}")  # fmt: skip
    for gogc, row in parts["gogc"].items():
        lines.append(
            f"{gogc:24} {row['p50_ms']:8.3f} {row['p95_ms']:8.3f} {row['p99_ms']:8.3f}"
            f" {row['throughput_8']:12,.0f} {row['rss_mib']:8.0f}"
        )
    return lines


async def run(n: int, warmup: int, rounds: int) -> dict[str, Any]:
    """All engines in one run: embedded, regorus (if installed), OPA on loopback."""
    document = policy_input(PARAMETERS)
    benches = [Bench(EmbeddedEngine(ROOT / "policies"), document)]
    if available():
        benches.append(Bench(RegorusEngine(ROOT / "policies"), document))
    else:
        print("regorus is not installed (pip install '.[bench]'): measuring without it")
    with opa_sidecar() as url:
        engine = OpaEngine(url)
        try:
            benches.append(Bench(engine, document))
            return await measure(benches, n, warmup, rounds)
        finally:
            await engine.aclose()


def main() -> None:
    global ROUNDS
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="200 decisions, 20 warm-up")
    parser.add_argument("-n", type=int, help="decisions per figure (default 2000)")
    parser.add_argument("--warmup", type=int, help="unmeasured decisions first (default 200)")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the time breakdown")
    parser.add_argument("--gc-probe", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gc_probe:
        print(json.dumps(gc_probe(args.gc_probe, args.warmup or 200)))
        return
    n = args.n or (200 if args.quick else 2000)
    warmup = args.warmup if args.warmup is not None else (20 if args.quick else 200)
    if args.quick:
        ROUNDS = 2
    load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    figures = asyncio.run(run(n, warmup, ROUNDS))
    load_after = os.getloadavg()[0]
    load = [round(load_before, 2), round(load_after, 2)]
    if not args.no_breakdown:
        figures["breakdown"] = breakdown(n, warmup, args.quick)
        load.append(round(os.getloadavg()[0], 2))
    print(table(figures, n, warmup, machine()))
    print(
        "load average (1 min) before, after the engines"
        + (", after the breakdown" if len(load) > 2 else "")
        + ": "
        + ", ".join(f"{x:.2f}" for x in load)
    )
    write_result(
        "decision_latency",
        figures,
        decisions=n,
        warmup=warmup,
        rounds=ROUNDS,
        parameters=PARAMETERS,
        concurrency=list(CONCURRENCY),
        in_flight="in-process engines: threads calling decide_sync; opa: asyncio tasks",
        policy_path=DEFAULT_POLICY_PATH,
        prefect=importlib.metadata.version("prefect"),
        opa=opa_version(),
        embedded_opa=native_lib.opa_version(),
        regorus="gordon-to-regorus 0.13.0" if available() else "not installed",
        load_average=load,
    )


if __name__ == "__main__":
    main()
