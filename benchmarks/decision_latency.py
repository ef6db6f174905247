"""Decision latency, end to end from the policy input to the parsed decision.

Embedded engine and an OPA sidecar on loopback (started here from OPA_BIN),
the default policy, the `allowed` example input with 20 parameters.
Prints a table and writes benchmarks/results/decision_latency.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prefect_governance.decision import decide  # noqa: E402
from prefect_governance.engines import EmbeddedEngine, OpaEngine  # noqa: E402
from prefect_governance.local import free_port, spawn, stop, wait_http  # noqa: E402

PATH = "prefect/governance/decision"
WARMUP, N = 200, 2000


def realistic_input() -> dict:
    policy_input = json.loads((ROOT / "policies/examples/allowed/input.json").read_text())
    params = policy_input["envelope"]["parameters"]
    for i in range(20 - len(params)):
        params[f"option_{i}"] = f"value-{i}"
    return policy_input


async def measure(engine, policy_input) -> list[float]:
    for _ in range(WARMUP):
        await decide(engine, PATH, policy_input)
    samples = []
    for _ in range(N):
        started = time.perf_counter()
        decision = await decide(engine, PATH, policy_input)
        samples.append((time.perf_counter() - started) * 1000)
        assert decision.verdict == "allowed", decision
    return samples


def percentiles(samples: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples, n=100)
    return {"p50_ms": round(q[49], 4), "p95_ms": round(q[94], 4), "p99_ms": round(q[98], 4)}


async def main() -> None:
    policy_input = realistic_input()
    results = {
        "embedded": percentiles(await measure(EmbeddedEngine(ROOT / "policies"), policy_input))
    }
    opa_bin = os.environ.get("OPA_BIN") or str(ROOT / ".tools/bin/opa")
    if Path(opa_bin).exists():
        port = free_port()
        log = Path(tempfile.mkdtemp()) / "opa.log"
        process = spawn(
            [opa_bin, "run", "--server", "--addr", f"127.0.0.1:{port}", str(ROOT / "policies")],
            os.environ,
            log,
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/health", 30, process)
            engine = OpaEngine(f"http://127.0.0.1:{port}")
            results["opa"] = percentiles(await measure(engine, policy_input))
            await engine.aclose()
        finally:
            stop(process)
    machine = f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"
    print(f"decision latency over {N} decisions after {WARMUP} warm-up ({machine})")
    print(f"{'engine':10} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
    for name, row in results.items():
        print(f"{name:10} {row['p50_ms']:8.3f} {row['p95_ms']:8.3f} {row['p99_ms']:8.3f}")
    out = ROOT / "benchmarks/results/decision_latency.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "n": N, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
