"""Governed vs stock worker: the same trivial flow through three workers, alternating.

One local Prefect server (SQLite) and three workers started alike (same
PREFECT_WORKER_QUERY_SECONDS and prefetch from ``local.prefect_env``, no
``--limit``), each on its own pool: Prefect's stock ``process`` worker,
``governed-process`` with the embedded engine, and ``governed-process`` with the
OPA engine against an OPA sidecar on loopback. ``benchmarks/flows.py:noop`` is
deployed to each pool. After a warm-up batch per worker (not counted), the runs
go in rounds: each round creates one batch per variant, one variant at a time,
with the order of the variants rotated from round to round.

Per variant: wall time (sum over its batches, from creating a batch's runs to
the last one's end), per-run latency from the run's expected start to its end,
how many COMPLETED (and, governed, were allowed by the policy), the most of its
runs RUNNING at once (start to end time) and in the worker's hands at once
(PENDING to end: a noop flow is RUNNING only briefly), and governed/stock ratios
(also the median of the rounds' paired ratios, which one disturbed batch moves
little). And where the CPU goes per run: the worker, its flow processes, the
server during the variant's batches (also less its idle polling load), OPA.
Prints a table and writes benchmarks/results/worker_ab.json.

    .venv/bin/python benchmarks/worker_ab.py     # 100 runs per variant, ~20 minutes here
    .venv/bin/python benchmarks/worker_ab.py --runs 3 --batch 3 --warmup 1 --no-write  # ~1 min
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

import prefect
from common import ROOT, describe, machine, opa_sidecar, opa_version, percentiles, write_result
from prefect import get_client
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings
from prefect.workers.process import ProcessWorker

from prefect_governance.cli.apply import apply_documents, parse_document
from prefect_governance.cli.demo import deploy_example, pool_template, wait_outcomes
from prefect_governance.cli.local import PrefectServer, prefect_env, start_worker, stop
from prefect_governance.core.attestation import KEYS_ENV
from prefect_governance.core.signing import SigningKey
from prefect_governance.lineage.events import LineageEvent
from prefect_governance.lineage.store import LineageStore, as_utc
from prefect_governance.worker.process import GovernedProcessWorker
from prefect_governance.worker.report import format_table

AGENT = "bench-agent"
# The pool owner's key for this run: the agent is applied signed with it, the workers pin it.
OWNER_KEY = SigningKey.generate("bench-pool-owner")
CAPABILITIES = ["read:warehouse"]
GOAL_WALL_RATIO = 1.05


@dataclass
class Variant:
    """One worker under test: its pool, deployment, lineage, and what it ran."""

    name: str
    engine: str | None  # None: Prefect's stock process worker
    deployment_id: UUID | None = None
    lineage_url: str | None = None
    store: LineageStore | None = None
    walls_s: list[float] = field(default_factory=list)
    runs: list[FlowRun] = field(default_factory=list)
    pending_at: dict[UUID, datetime] = field(default_factory=dict)  # the worker took the run
    timeouts: int = 0
    cpu_s: dict[str, float] = field(default_factory=dict)  # worker, flow processes, server
    busy_s: float = 0.0  # time in its batches (to the outcomes recorded), by this clock

    @property
    def pool(self) -> str:
        return f"bench-{self.name}"

    @property
    def governed(self) -> bool:
        return self.engine is not None


def ended_at(run: FlowRun) -> datetime | None:
    """When the run reached its final state (None if it has not)."""
    if run.state is None or not run.state.is_final():
        return None
    return run.end_time or run.state.timestamp


def cpu_times(pid: int) -> tuple[float, float]:
    """CPU seconds of a process (user + system) and of its children it has reaped."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    tick = os.sysconf("SC_CLK_TCK")
    return (utime + stime) / tick, (cutime + cstime) / tick


def session_cpu(sid: int) -> float:
    """CPU seconds of every process in a session (the server and its children)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:
            total += sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


def child_pid(command: str) -> int | None:
    """The pid of this process's child running ``command`` (by its name), if any."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            head, tail = stat.read_text().rsplit(")", 1)
        except OSError:
            continue
        if head.split("(", 1)[1] == command and int(tail.split()[1]) == os.getpid():
            return int(stat.parent.name)
    return None


def max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    """The most intervals open at one instant (an end at t comes before a start at t)."""
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = peak = 0
    for _, step in points:
        running += step
        peak = max(peak, running)
    return peak


async def setup(home: Path, opa_url: str, variants: list[Variant]) -> None:
    """Blocks (agent, engines, lineage stores), one pool per variant, ``noop`` deployed to each."""
    governed = [v for v in variants if v.governed]
    raws: list[dict[str, Any]] = [
        {
            "kind": "agent",
            "name": AGENT,
            "spec": {
                "id": AGENT,
                "owner": "bench@example.com",
                "trust_scope": [v.pool for v in governed],
                "capabilities": CAPABILITIES,
                "deployments": ["noop/noop-*"],
            },
        }
    ]
    for v in governed:
        v.lineage_url = f"sqlite:///{home / f'lineage-{v.name}.db'}"
        engine: dict[str, Any] = {"kind": v.engine}
        if v.engine == "opa":
            engine["opa_url"] = opa_url
        raws.append({"kind": "policy-engine", "name": v.pool, "spec": engine})
        raws.append({"kind": "lineage-store", "name": v.pool, "spec": {"url": v.lineage_url}})
    await apply_documents(
        [parse_document(raw, Path(__file__)) for raw in raws], agent_key=OWNER_KEY
    )

    async with get_client() as client:
        for v in variants:
            if v.governed:
                kind, template = (
                    GovernedProcessWorker.type,
                    pool_template(engine=v.pool, lineage_store=v.pool),
                )
            else:
                kind, template = ProcessWorker.type, ProcessWorker.get_default_base_job_template()
            await client.create_work_pool(
                WorkPoolCreate(name=v.pool, type=kind, base_job_template=template)
            )
    for v in variants:
        job_variables = {"agent": AGENT, "capabilities": CAPABILITIES} if v.governed else {}
        v.deployment_id = await deploy_example(
            f"noop-{v.name}", v.pool, job_variables, "noop", directory=ROOT / "benchmarks"
        )


async def run_batch(variant: Variant, n: int) -> tuple[list[FlowRun], float, bool]:
    """Create n runs of the variant's deployment and wait for their ends.

    Returns the runs, the wall time (creation of the first to the end of the
    last, by the server's clock for the end), and whether all ended in time.
    """
    started, clock = datetime.now(timezone.utc), time.monotonic()
    async with get_client() as client:
        ids = [
            (await client.create_flow_run_from_deployment(variant.deployment_id)).id
            for _ in range(n)
        ]
        runs = await wait_ended(client, ids, timeout=120 + 10 * n)
    ends = [ended_at(r) for r in runs]
    if all(ends):
        wall, in_time = (max(ends) - started).total_seconds(), True  # type: ignore[type-var]
    else:
        wall, in_time = time.monotonic() - clock, False
    if variant.store is not None:  # the worker records outcomes last: let it finish first
        executed = [r.id for r in runs if r.state and r.state.name != "Refused"]
        await wait_outcomes(variant.store, executed, timeout=60)
    return runs, wall, in_time


async def wait_ended(client: PrefectClient, ids: list[UUID], timeout: float) -> list[FlowRun]:
    """Poll (one request per half second) until every run is final, or the timeout."""
    deadline = time.monotonic() + timeout
    query = FlowRunFilter(id=FlowRunFilterId(any_=ids))
    while True:
        found = {r.id: r for r in await client.read_flow_runs(flow_run_filter=query)}
        runs = [found[i] for i in ids if i in found]
        if len(runs) == len(ids) and all(ended_at(r) for r in runs):
            return runs
        if time.monotonic() > deadline:
            return runs
        await asyncio.sleep(0.5)


async def read_pending(variant: Variant) -> None:
    """When the worker took each run (its PENDING state), from the runs' state histories."""
    async with get_client() as client:
        for run in variant.runs:
            states = await client.read_flow_run_states(run.id)
            pending = [s.timestamp for s in states if s.type == StateType.PENDING]
            if pending:
                variant.pending_at[run.id] = min(pending)


def summarize(variant: Variant) -> dict[str, Any]:
    """The figures of one variant."""
    runs = variant.runs
    latencies, start_lags, to_running, intervals, in_flight = [], [], [], [], []
    for run in runs:
        end, pending = ended_at(run), variant.pending_at.get(run.id)
        if end is not None and run.expected_start_time is not None:
            latencies.append((end - run.expected_start_time).total_seconds() * 1000)
        if run.start_time is not None and run.expected_start_time is not None:
            start_lags.append((run.start_time - run.expected_start_time).total_seconds() * 1000)
        if run.start_time is not None and pending is not None:
            to_running.append((run.start_time - pending).total_seconds() * 1000)
        if run.start_time is not None and end is not None:
            intervals.append((run.start_time, end))
        if pending is not None and end is not None:
            in_flight.append((pending, end))
    figures: dict[str, Any] = {
        "runs": len(runs),
        "batches": len(variant.walls_s),
        "completed": sum(1 for r in runs if r.state is not None and r.state.is_completed()),
        "timed_out_batches": variant.timeouts,
        "wall_s": round(sum(variant.walls_s), 3),
        "batch_walls_s": [round(w, 3) for w in variant.walls_s],  # in round order
        "latency": {**percentiles(latencies), "max_ms": round(max(latencies), 4)},
        "start_lag": {**percentiles(start_lags), "max_ms": round(max(start_lags), 4)},
        "pending_to_running": {**percentiles(to_running), "max_ms": round(max(to_running), 4)},
        "max_running": max_overlap(intervals),
        "max_in_flight": max_overlap(in_flight),
        "cpu_ms_per_run": {k: round(v * 1000 / len(runs), 1) for k, v in variant.cpu_s.items()},
    }
    if variant.store is not None:
        figures.update(governance(variant.store, runs))
    return figures


def governance(store: LineageStore, runs: list[FlowRun]) -> dict[str, Any]:
    """Decision verdicts, recorded outcomes, and how long after a run's end its outcome came."""
    wanted = {str(r.id): r for r in runs}
    events: dict[tuple[str, str], LineageEvent] = {}
    for e in store.recent(100 * len(runs) + 1000):
        if e.flow_run_id in wanted:
            events.setdefault((e.flow_run_id, e.kind), e)
    allowed = labelled = outcomes = 0
    lags = []
    for run_id, run in wanted.items():
        decision = events.get((run_id, "decision"))
        allowed += decision is not None and decision.verdict == "allowed"
        labelled += (run.labels or {}).get("governance.decision") == "allowed"
        outcome = events.get((run_id, "outcome"))
        end = ended_at(run)
        if outcome is not None and outcome.state == "COMPLETED":
            outcomes += 1
            if end is not None:
                lags.append((as_utc(outcome.created_at) - end).total_seconds() * 1000)
    return {
        "allowed": allowed,
        "labelled_allowed": labelled,
        "outcomes_completed": outcomes,
        "outcome_lag": {**percentiles(lags), "max_ms": round(max(lags), 4)}
        if len(lags) > 1
        else None,
    }


def ratios(figures: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per governed variant, its / stock's: wall time, per-run p50, the rounds' median.

    The median over rounds pairs each governed batch with the stock batch of its
    round, so one batch slowed by the machine (or the server) weighs little.
    """
    stock = figures["stock"]
    rates = {}
    for name, f in figures.items():
        if name == "stock":
            continue
        paired = zip(f["batch_walls_s"], stock["batch_walls_s"], strict=True)
        rates[name] = {
            "wall": round(f["wall_s"] / stock["wall_s"], 3),
            "latency_p50": round(f["latency"]["p50_ms"] / stock["latency"]["p50_ms"], 3),
            "wall_median_of_rounds": round(statistics.median(g / s for g, s in paired), 3),
        }
    return rates


def table(figures: dict[str, dict[str, Any]], rates: dict[str, dict[str, float]]) -> str:
    """The timing table, then the CPU table."""
    rows = [
        (
            "variant",
            "runs",
            "completed",
            "allowed",
            "wall s",
            "p50 ms",
            "p95 ms",
            "max ms",
            "start p50 ms",
            "pending>running p50 ms",
            "max running",
            "max in flight",
            "wall ratio",
            "p50 ratio",
            "round median",
        )
    ]
    for name, f in figures.items():
        rate = rates.get(name, {})
        rows.append(
            (
                name,
                str(f["runs"]),
                str(f["completed"]),
                str(f.get("allowed", "-")),
                f"{f['wall_s']:.1f}",
                f"{f['latency']['p50_ms']:.0f}",
                f"{f['latency']['p95_ms']:.0f}",
                f"{f['latency']['max_ms']:.0f}",
                f"{f['start_lag']['p50_ms']:.0f}",
                f"{f['pending_to_running']['p50_ms']:.0f}",
                str(f["max_running"]),
                str(f["max_in_flight"]),
                f"{rate['wall']:.3f}" if rate else "-",
                f"{rate['latency_p50']:.3f}" if rate else "-",
                f"{rate['wall_median_of_rounds']:.3f}" if rate else "-",
            )
        )
    cpu = [("variant", "CPU ms/run: worker", "flow processes", "server", "server less idle", "OPA")]
    keys = ("worker", "flow_processes", "server", "server_less_idle", "opa_sidecar")
    for name, f in figures.items():
        c = f["cpu_ms_per_run"]
        cpu.append((name, *(f"{c[k]:.0f}" if k in c else "-" for k in keys)))
    return format_table(rows) + "\n\n" + format_table(cpu)


async def measure(
    home: Path, server: PrefectServer, opa_url: str, args: argparse.Namespace
) -> tuple[dict[str, dict[str, Any]], float]:
    """Set up, start the workers, warm up, run the rounds.

    Returns the figures per variant and the server's idle CPU (ms per second).
    CPU: each worker's own and its flow processes' (reaped children) over the
    rounds, and the server's during the variant's batches (one batch at a time),
    also less what it spends idle (the workers' polls) in as long; the OPA
    sidecar's during the OPA variant's batches.
    """
    assert server.process is not None
    opa_pid = child_pid("opa")
    variants = [Variant("stock", None), Variant("embedded", "embedded"), Variant("opa", "opa")]
    await setup(home, opa_url, variants)
    workers = {
        v.name: start_worker(
            v.pool,
            home,
            server.api_url,
            home / f"worker-{v.name}.log",
            worker_type=GovernedProcessWorker.type if v.governed else ProcessWorker.type,
            extra_env={KEYS_ENV: json.dumps({OWNER_KEY.key_id: OWNER_KEY.public_b64})},
        )
        for v in variants
    }
    try:
        for v in variants:
            if v.lineage_url is not None:
                v.store = LineageStore(v.lineage_url)
        for v in variants:  # warm-up: not counted
            runs, _, in_time = await run_batch(v, args.warmup)
            if not in_time or not all(r.state and r.state.is_completed() for r in runs):
                states = [r.state.name if r.state else None for r in runs]
                raise SystemExit(f"warm-up of {v.name} failed: {states}; see {home}")
        idle_cpu, idle_clock = session_cpu(server.process.pid), time.monotonic()
        await asyncio.sleep(args.idle)  # the server's CPU with the workers polling, no runs
        idle_rate = (session_cpu(server.process.pid) - idle_cpu) / (time.monotonic() - idle_clock)
        before = {v.name: cpu_times(workers[v.name].pid) for v in variants}
        rounds = math.ceil(args.runs / args.batch)
        for r in range(rounds):
            n = min(args.batch, args.runs - r * args.batch)
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for v in order:
                server_before, clock = session_cpu(server.process.pid), time.monotonic()
                opa_before = session_cpu(opa_pid) if opa_pid is not None else 0.0
                runs, wall, in_time = await run_batch(v, n)
                v.busy_s += time.monotonic() - clock
                v.cpu_s["server"] = v.cpu_s.get("server", 0.0) + (
                    session_cpu(server.process.pid) - server_before
                )
                if v.engine == "opa" and opa_pid is not None:
                    v.cpu_s["opa_sidecar"] = v.cpu_s.get("opa_sidecar", 0.0) + (
                        session_cpu(opa_pid) - opa_before
                    )
                v.runs += runs
                v.walls_s.append(wall)
                v.timeouts += not in_time
                done = sum(1 for x in runs if x.state and x.state.is_completed())
                print(
                    f"round {r + 1}/{rounds}  {v.name:8}  {n} runs  {wall:6.2f}s  {done} completed",
                    flush=True,
                )
        await asyncio.sleep(2)  # the last flow processes exit and are reaped
        for v in variants:
            own, children = cpu_times(workers[v.name].pid)
            v.cpu_s["worker"] = own - before[v.name][0]
            v.cpu_s["flow_processes"] = children - before[v.name][1]
            v.cpu_s["server_less_idle"] = v.cpu_s["server"] - idle_rate * v.busy_s
            await read_pending(v)
        return {v.name: summarize(v) for v in variants}, round(idle_rate * 1000, 1)
    finally:
        for worker in workers.values():
            stop(worker)
        for v in variants:
            if v.store is not None:
                v.store.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=100, help="runs per variant (default 100)")
    parser.add_argument("--batch", type=int, default=10, help="runs per batch (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="uncounted runs per worker")
    parser.add_argument("--idle", type=float, default=5, help="seconds of idle server CPU")
    parser.add_argument("--no-write", action="store_true", help="do not write the JSON result")
    parser.add_argument("--keep", action="store_true", help="keep the home (logs, databases)")
    args = parser.parse_args()
    # SIGTERM (and SIGINT, ignored in background jobs) stop the run and what it started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.runs < 2 or args.batch < 1 or args.warmup < 1:
        parser.error("--runs must be at least 2, --batch and --warmup at least 1")

    home = Path(tempfile.mkdtemp(prefix="bench-worker-ab-"))
    started = time.monotonic()
    print(f"worker A/B in {home}: {args.runs} runs per variant in batches of {args.batch}")
    ok = False
    try:
        with PrefectServer(home) as server, opa_sidecar() as opa_url:
            settings = {PREFECT_API_URL: server.api_url, PREFECT_HOME: str(home)}
            with temporary_settings(settings):
                figures, idle = asyncio.run(measure(home, server, opa_url, args))
        ok = True
    finally:
        if args.keep or not ok:
            print(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)
    elapsed = time.monotonic() - started
    rates = ratios(figures)
    info = machine()
    print(f"\nworker A/B, {args.runs} runs per variant, batches of {args.batch} ({describe(info)})")
    print(table(figures, rates))
    counts = ("completed", "allowed", "labelled_allowed", "outcomes_completed")
    ok = all(f.get(k, args.runs) == args.runs for f in figures.values() for k in counts)
    met = {name: rate["wall"] <= GOAL_WALL_RATIO for name, rate in rates.items()}
    print(f"goal governed/stock wall <= {GOAL_WALL_RATIO}: {met}; all completed/allowed: {ok}")
    print(f"server idle CPU {idle:.0f} ms/s; took {elapsed:.0f}s")
    if not args.no_write:
        env = prefect_env(home)
        write_result(
            "worker_ab",
            {
                "variants": figures,
                "ratios": rates,
                "goal": {"wall_ratio_max": GOAL_WALL_RATIO, "met": met},
                "server_idle_cpu_ms_per_s": idle,
            },
            runs_per_variant=args.runs,
            batch=args.batch,
            warmup_per_worker=args.warmup,
            order="rounds; the variants' order rotated each round",
            worker_limit=None,
            worker_query_seconds=float(env["PREFECT_WORKER_QUERY_SECONDS"]),
            worker_prefetch_seconds=float(env["PREFECT_WORKER_PREFETCH_SECONDS"]),
            prefect=prefect.__version__,
            opa=opa_version(),
            server_database="sqlite",
            lineage_database="sqlite, one per governed pool",
            duration_s=round(elapsed),
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
