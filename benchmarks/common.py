"""What every benchmark shares: the machine, percentiles, an OPA sidecar, results.

Each benchmark writes ``benchmarks/results/<name>.json`` with the machine and the
date; ``benchmarks/report.py`` prints them all as one table against the goals.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Where results go: benchmarks/results, or BENCH_RESULTS (the smoke tests write elsewhere).
RESULTS = Path(os.environ.get("BENCH_RESULTS") or ROOT / "benchmarks" / "results")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from prefect_governance.cli.local import free_port, spawn, stop, wait_http  # noqa: E402


def machine() -> dict[str, Any]:
    """Cores, memory, CPU model and Python: the figures mean nothing without them."""
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(memory_gib),
        "cpu": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def describe(info: dict[str, Any]) -> str:
    """One line for a table caption."""
    cores, memory = info["cores"], info["memory_gib"]
    return f"{cores} cores, {memory} GiB, {info['cpu']}, Python {info['python']}"


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    """p50/p95/p99 (and the mean) of latencies in milliseconds."""
    q = statistics.quantiles(samples_ms, n=100, method="inclusive")
    return {
        "p50_ms": round(q[49], 4),
        "p95_ms": round(q[94], 4),
        "p99_ms": round(q[98], 4),
        "mean_ms": round(statistics.fmean(samples_ms), 4),
        "n": len(samples_ms),
    }


def write_result(name: str, figures: dict[str, Any], **settings: Any) -> Path:
    """Write one benchmark's figures, with the machine and the time, as JSON."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    document = {
        "benchmark": name,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": settings,
        "figures": figures,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {path}")
    return path


# As docker-compose.yml and the Kubernetes pod run OPA: Go's collector less often (its
# pauses were OPA's p99 on 2 cores).
OPA_GOGC = "400"


def opa_bin() -> Path:
    """OPA from OPA_BIN, or the one `make opa` builds."""
    path = Path(os.environ.get("OPA_BIN") or ROOT / ".tools/bin/opa")
    if not path.exists():
        raise SystemExit(f"OPA not found at {path}: run `make opa` or set OPA_BIN")
    return path


@contextmanager
def opa_sidecar(policy_dir: Path = ROOT / "policies") -> Iterator[str]:
    """``opa run --server`` on a loopback port, serving the policies; yields its URL."""
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="bench-opa-")) / "opa.log"
    process = spawn(
        [str(opa_bin()), "run", "--server", "--addr", f"127.0.0.1:{port}", str(policy_dir)],
        {**os.environ, "GOGC": OPA_GOGC},
        log,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 30, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


def opa_version() -> str:
    """The OPA version line, for the table."""
    out = subprocess.run([str(opa_bin()), "version"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    return "?"
