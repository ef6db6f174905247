"""Governed vs ungoverned tasks: what a policy decision before each task run costs.

One process, one local Prefect server (SQLite, in a temporary home). Two flows
of the same shape call a trivial task N times in a row, timing each call with
``perf_counter`` inside the flow body: ``ungoverned_loop`` calls the task,
``governed_loop`` calls ``governed(task)``, whose body is preceded by a task
policy decision (``prefect/governance/task``, the packaged policies) through the
engine its run's signed grant names, and whose decisions are queued to the run's
event log (sent to Prefect as artifacts). Each flow run is created on the server
and run here with ``prefect.flow_engine.run_flow``; a governed run gets its own
grant (the `allowed` example, issued for that run, signed with a key trusted
through PREFECT_GOVERNANCE_TRUSTED_KEYS) in PREFECT_GOVERNANCE_ENVELOPE, as a
governed worker would hand it.

Variants: ungoverned, governed with the embedded engine, governed with an OPA
sidecar on loopback. After a warm-up run per variant (not counted), the runs
go in rounds, one run per variant per round, the order of the variants rotated
from round to round, so that a slow spell of a shared machine falls on all of them.

Per variant: p50/p95/p99 of one task call (as the flow sees it); governed, the
p50 difference to ungoverned and the ratio, over all calls and as the median of
the rounds' paired figures (each round's p50 against that round's ungoverned
run, which one disturbed round moves little); and the parts of a governed call:
the admission (``tasks._admit``: envelope, decision, queuing it), the decision
(``run_engine().decide``, with its hop to the decision thread) and the engine's
own evaluation (the decision's ``latency_ms``). Every governed run's reported
events are then read back from Prefect (``read_reports`` and
``reported_events``): one allowed task decision and one completed task end per
call, nothing missing, or the benchmark fails (the figure is only worth having
for working governance).
After each run the benchmark waits until the server has recorded its task runs,
so that no run starts against a server still busy with the last one. The timers
around the parts add a few microseconds to a governed call.

    .venv/bin/python benchmarks/tasks.py            # 8 rounds of 125 calls per variant
    .venv/bin/python benchmarks/tasks.py --quick    # 2 rounds of 25, for a smoke test

Prints a table and writes benchmarks/results/tasks.json.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from common import ROOT, describe, machine, opa_sidecar, opa_version, percentiles, write_result
from prefect import flow, get_client, task
from prefect.client.schemas.objects import FlowRun
from prefect.context import refresh_global_settings_context
from prefect.flow_engine import run_flow
from prefect.logging.handlers import PrefectConsoleHandler

import prefect_governance.runtime.tasks as governed_tasks
from prefect_governance import governed
from prefect_governance.cli.local import PrefectServer
from prefect_governance.core.handoff import ENVELOPE_ENV, TRUSTED_KEYS_ENV
from prefect_governance.core.models import (
    EngineRef,
    Grant,
    GrantPosture,
    MemorySnapshot,
    TrustState,
)
from prefect_governance.core.posture import start_posture
from prefect_governance.core.settings import packaged_policy_dir
from prefect_governance.core.signing import SigningKey, sign
from prefect_governance.core.trust import TrustWeights
from prefect_governance.runtime.engine import RunEngine
from prefect_governance.runtime.run_log import flush_run_log
from prefect_governance.worker.governor import read_reports
from prefect_governance.worker.run_reports import reported_events

EXAMPLE = ROOT / "policies/examples/allowed/input.json"
VARIANTS = ("ungoverned", "embedded", "opa")


# --- the flows ---------------------------------------------------------------


@task
def step(i: int) -> int:
    """A trivial task: what is measured is everything around its body."""
    return i + 1


governed_step = governed(step)


def timed_calls(one: Callable[[int], int], n: int) -> list[float]:
    """Call the task n times in a row; each call's time in ms."""
    samples: list[float] = []
    for i in range(n):
        started = time.perf_counter()
        one(i)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


@flow
def ungoverned_loop(n: int) -> list[float]:
    return timed_calls(step, n)


@flow
def governed_loop(n: int) -> list[float]:
    return timed_calls(governed_step, n)


# --- the parts of a governed call, timed from outside ------------------------

PARTS: dict[str, list[float]] = {"admit": [], "decide": []}


def _timed(part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            PARTS[part].append((time.perf_counter() - started) * 1000)

    return wrapper


@contextmanager
def parts_timed() -> Iterator[None]:
    """Time ``tasks._admit`` and ``RunEngine.decide`` (looked up at each call: patchable)."""
    admit, decide = governed_tasks._admit, RunEngine.decide
    governed_tasks._admit = _timed("admit", admit)
    RunEngine.decide = _timed("decide", decide)  # type: ignore[method-assign]
    try:
        yield
    finally:
        governed_tasks._admit, RunEngine.decide = admit, decide  # type: ignore[method-assign]


class SendFailures(logging.Handler):
    """Counts the run log's failed sends (each retried later; none expected here)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


# --- runs --------------------------------------------------------------------


class Grants:
    """Signed grants for governed runs, as a governed worker issues them."""

    def __init__(self) -> None:
        self.key = SigningKey.generate("bench-tasks")
        os.environ[TRUSTED_KEYS_ENV] = json.dumps({self.key.key_id: self.key.public_b64})
        self.example = json.loads(EXAMPLE.read_text())

    def issue(self, flow_run_id: str, engine: EngineRef) -> str:
        document = json.loads(json.dumps(self.example))
        envelope = document["envelope"]
        now = datetime.now(timezone.utc)
        envelope["issued_at"] = now.isoformat()
        envelope["expires_at"] = (now + timedelta(hours=1)).isoformat()
        envelope["flow_run"]["id"] = flow_run_id
        grant = Grant(
            decision_id=f"bench-{flow_run_id}",
            verdict="allowed",
            envelope=envelope,
            agent=document["agent"],
            memory={},
            grants=["read:warehouse"],
            engine=engine,
            posture=GrantPosture(  # as a governed worker hands it: the agent's at decision
                start=start_posture(
                    TrustState.model_validate(document["agent"]["trust"]),
                    MemorySnapshot(),
                    schema_hash=document["agent"]["memory_schema_hash"],
                    k=3,
                ),
                weights=TrustWeights().effective(),
            ),
        )
        return json.dumps(sign(grant.model_dump(mode="json"), self.key))


async def create_run(loop: Any, n: int) -> FlowRun:
    async with get_client() as client:
        return await client.create_flow_run(loop, parameters={"n": n})


async def check_reports(flow_run_id: Any, decision_id: str, n: int) -> list[float]:
    """The run's reported events are its n allowed task decisions, each followed by its
    completed end; the decisions' engine latencies."""
    async with get_client() as client:
        batches = await read_reports(client, flow_run_id)
    events, problems = reported_events(batches, decision_id)
    decisions = [e for e in events if e.kind == "task_decision"]
    refused = [e for e in decisions if e.decided.get("verdict") != "allowed"]
    ended = [e for e in events if e.kind == "task_end" and e.outcome == "completed"]
    if problems or len(decisions) != n or len(ended) != n or len(events) != 2 * n or refused:
        raise SystemExit(
            f"flow run {flow_run_id}: {len(decisions)} task decisions reported of {n}"
            f" ({len(events)} events, {len(refused)} not allowed): {problems[:3]}"
            + (f"; first refused: {refused[0].decision}" if refused else "")
        )
    return [float(e.decided["latency_ms"]) for e in decisions]


async def settle(flow_run_id: Any, n: int, timeout: float = 300) -> float:
    """Wait until the server has recorded the run's n completed task runs; seconds waited.

    Task runs reach the server as events, recorded after the run ends: the next run
    starts on a server that has caught up, not one still busy with the last.
    """
    query = {
        "flow_runs": {"id": {"any_": [str(flow_run_id)]}},
        "task_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
    }
    started = time.perf_counter()
    async with get_client() as client:
        while True:
            response = await client.request("POST", "/task_runs/count", json=query)
            response.raise_for_status()
            if response.json() >= n:
                return time.perf_counter() - started
            if time.perf_counter() - started > timeout:
                raise SystemExit(f"flow run {flow_run_id}: {response.json()} of {n} task runs")
            await asyncio.sleep(0.25)


def run_once(variant: str, n: int, grants: Grants, engines: dict[str, EngineRef]) -> dict:
    """One flow run of the variant: its call times, and (governed) its parts."""
    loop = ungoverned_loop if variant == "ungoverned" else governed_loop
    flow_run = asyncio.run(create_run(loop, n))
    if variant == "ungoverned":
        os.environ.pop(ENVELOPE_ENV, None)
    else:
        os.environ[ENVELOPE_ENV] = grants.issue(str(flow_run.id), engines[variant])
    for samples in PARTS.values():
        samples.clear()
    gc.collect()
    state = run_flow(loop, flow_run=flow_run, parameters={"n": n}, return_type="state")
    if not state.is_completed():
        raise SystemExit(f"{variant}: flow run {flow_run.id} ended {state.type.value}: {state}")
    result: dict[str, Any] = {"calls": state.result()}
    if variant != "ungoverned":
        flush_run_log(str(flow_run.id))  # what govern(flow) does when the flow body ends
    asyncio.run(settle(flow_run.id, n))
    if variant != "ungoverned":
        result["admit"] = list(PARTS["admit"])
        result["decide"] = list(PARTS["decide"])
        result["engine"] = asyncio.run(check_reports(flow_run.id, f"bench-{flow_run.id}", n))
        if len(result["decide"]) != n:
            raise SystemExit(f"{variant}: {len(result['decide'])} decisions timed of {n}")
    return result


Samples = dict[str, dict[str, list[float]]]


def measure(
    variants: tuple[str, ...], calls: int, rounds: int, warmup: int, opa_url: str | None
) -> tuple[Samples, int]:
    """Warm up each variant, then the rounds: every sample of every variant, and how many
    of the run logs' sends failed (and were retried)."""
    policy_dir = str(packaged_policy_dir())
    engines = {"embedded": EngineRef(kind="embedded", policy_dir=policy_dir)}
    if opa_url:
        engines["opa"] = EngineRef(kind="opa", url=opa_url)
    grants = Grants()
    samples: Samples = {
        v: {"calls": [], "admit": [], "decide": [], "engine": [], "round_p50": []} for v in variants
    }
    failures = SendFailures()
    logging.getLogger("prefect_governance.runtime.run_log").addHandler(failures)
    with parts_timed():
        for variant in variants:
            run_once(variant, warmup, grants, engines)
        for r in range(rounds):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for variant in order:
                started = time.perf_counter()
                result = run_once(variant, calls, grants, engines)
                for part, values in result.items():
                    samples[variant][part].extend(values)
                median = statistics.median(result["calls"])
                samples[variant]["round_p50"].append(median)
                print(
                    f"round {r + 1}/{rounds} {variant:10} {calls} calls, p50 {median:.3f} ms,"
                    f" run {time.perf_counter() - started:.1f} s"
                )
    logging.getLogger("prefect_governance.runtime.run_log").removeHandler(failures)
    return samples, failures.count


def summarize(samples: Samples) -> dict[str, Any]:
    """Percentiles per variant; governed, the p50 overhead and ratio, and the parts."""
    base = percentiles(samples["ungoverned"]["calls"])
    figures: dict[str, Any] = {"ungoverned": base}
    for variant, parts in samples.items():
        if variant == "ungoverned":
            continue
        row = percentiles(parts["calls"])
        row["overhead_p50_ms"] = round(row["p50_ms"] - base["p50_ms"], 4)
        row["ratio_p50"] = round(row["p50_ms"] / base["p50_ms"], 4)
        # The same per round, against that round's ungoverned run: a slow spell of a
        # shared machine moves one round, not the median of the rounds.
        pairs = list(zip(parts["round_p50"], samples["ungoverned"]["round_p50"], strict=True))
        row["overhead_p50_paired_ms"] = round(statistics.median(g - u for g, u in pairs), 4)
        row["ratio_p50_paired"] = round(statistics.median(g / u for g, u in pairs), 4)
        row["admit"] = percentiles(parts["admit"])
        row["decide"] = percentiles(parts["decide"])
        row["engine"] = percentiles(parts["engine"])
        figures[variant] = row
    return figures


def table(figures: dict[str, Any], calls: int, rounds: int, info: dict[str, Any]) -> str:
    lines = [
        f"one task call, as the flow sees it: {rounds} rounds of {calls} calls per variant"
        f" ({describe(info)})",
        f"{'variant':18} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} {'x p50':>7}"
        f"   paired by round: {'+p50 ms':>8} {'x p50':>7}",
    ]
    for variant in VARIANTS:
        if variant not in figures:
            continue
        row = figures[variant]
        extra = (
            f" {row['overhead_p50_ms']:+8.3f} {row['ratio_p50']:7.3f}"
            f"                    {row['overhead_p50_paired_ms']:+8.3f}"
            f" {row['ratio_p50_paired']:7.3f}"
            if "ratio_p50" in row
            else ""
        )
        name = variant if variant == "ungoverned" else f"governed/{variant}"
        lines.append(
            f"{name:18} {row['p50_ms']:8.3f} {row['p95_ms']:8.3f} {row['p99_ms']:8.3f}{extra}"
        )
    lines.append("")
    lines.append("inside a governed call (p50/p99 ms)")
    lines.append(f"{'engine':18} {'admission':>15} {'decide()':>15} {'evaluation':>15}")
    for variant in VARIANTS[1:]:
        if variant in figures:
            row = figures[variant]
            cells = " ".join(
                f"{row[p]['p50_ms']:7.3f}/{row[p]['p99_ms']:7.3f}"
                for p in ("admit", "decide", "engine")
            )
            lines.append(f"{variant:18} {cells}")
    return "\n".join(lines)


def quiet_console() -> None:
    """Prefect's console handler to warnings: 1,000s of task runs would print a line each.

    (The API log handler is left as it is: task runs' logs still go to the server.)
    """
    for logger in (logging.getLogger(), logging.getLogger("prefect")):
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler):
                handler.setLevel(logging.WARNING)


@contextmanager
def maybe_opa(wanted: bool) -> Iterator[str | None]:
    """An OPA sidecar serving the packaged policies, or nothing."""
    if not wanted:
        yield None
        return
    with opa_sidecar(packaged_policy_dir()) as url:
        yield url


def drain_prefect() -> None:
    """Send the logs and events Prefect still holds while the server is up (not at exit)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        service.drain_all(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 25 calls, warm-up 5")
    parser.add_argument("--calls", type=int, help="task calls per flow run (default 125)")
    parser.add_argument("--rounds", type=int, help="flow runs per variant (default 8)")
    parser.add_argument("--warmup", type=int, help="calls in the uncounted first run (50)")
    parser.add_argument("--no-opa", action="store_true", help="the embedded engine only")
    args = parser.parse_args()
    calls = args.calls or (25 if args.quick else 125)
    rounds = args.rounds or (2 if args.quick else 8)
    warmup = args.warmup if args.warmup is not None else (5 if args.quick else 50)
    variants = VARIANTS[:2] if args.no_opa else VARIANTS
    quiet_console()

    home = Path(tempfile.mkdtemp(prefix="bench-tasks-"))
    load_before = os.getloadavg()[0]
    ok = False
    try:
        with PrefectServer(home) as server, maybe_opa(not args.no_opa) as opa_url:
            # As a flow run's process has them: in the environment, and in the settings
            # every thread sees (the run log sends from its own thread).
            os.environ.update(PREFECT_API_URL=server.api_url, PREFECT_HOME=str(home))
            refresh_global_settings_context()
            try:
                samples, send_failures = measure(variants, calls, rounds, warmup, opa_url)
            finally:
                drain_prefect()
        ok = True
    finally:
        if ok:
            shutil.rmtree(home, ignore_errors=True)
        else:
            print(f"kept {home}")
    load_after = os.getloadavg()[0]
    figures = summarize(samples)
    # Every event was reported all the same (checked), but a failed send means the set-up
    # (the API the run log sends to), not governance, was wrong: say so.
    figures["run_log_send_failures"] = send_failures
    print(table(figures, calls, rounds, machine()))
    if send_failures:
        print(f"WARNING: {send_failures} sends of governance events failed and were retried")
    print(f"load average (1 min) before {load_before:.2f}, after {load_after:.2f}")
    write_result(
        "tasks",
        figures,
        calls_per_run=calls,
        rounds=rounds,
        warmup=warmup,
        task_policy="prefect/governance/task",
        opa=opa_version() if not args.no_opa else None,
        load_average=[round(load_before, 2), round(load_after, 2)],
    )


if __name__ == "__main__":
    main()
