"""The benchmarks still run, and still give every figure the README table shows.

Each runs in its quick form (small counts: the figures are not looked at, only
that they are there and sane), writing its results to a scratch directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from report import ROWS, _at  # noqa: E402


def _run(name: str, tmp_path: Path, *args: str, timeout: float = 600) -> dict:
    env = {**os.environ, "BENCH_RESULTS": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    document = json.loads((tmp_path / f"{name}.json").read_text())
    assert document["machine"]["cores"] == os.cpu_count()
    return document


# The regorus build is measured only where it is installed (the `bench` extra).
HAS_REGORUS = importlib.util.find_spec("regorus") is not None


def _figures_of(name: str, document: dict) -> dict[str, float]:
    figures = {
        row.label: _at(document, row.path)
        for row in ROWS
        if row.benchmark == name and (HAS_REGORUS or "regorus" not in row.path)
    }
    assert figures, f"the report shows nothing of {name}"
    missing = [label for label, value in figures.items() if value is None]
    assert not missing, f"{name} no longer gives: {missing}"
    return figures


@pytest.mark.parametrize(
    "name, args",
    [
        ("lineage", ("--quick",)),
        ("scale", ("--quick",)),
        ("worker_ab", ("--runs", "3", "--batch", "3", "--warmup", "1")),
    ],
)
def test_a_benchmark_gives_every_figure_of_the_table(name, args, tmp_path, opa_bin):
    document = _run(name, tmp_path, *args)
    figures = _figures_of(name, document)
    for label, value in figures.items():
        if "growth" not in label:
            assert value > 0, label


def test_the_decision_benchmark_compares_the_engines_and_breaks_the_embedded_one_down(
    tmp_path, opa_bin
):
    document = _run("decision_latency", tmp_path, "--quick")
    for label, value in _figures_of("decision_latency", document).items():
        assert value > 0, label
    figures = document["figures"]
    engines = {"embedded", "opa"} | ({"regorus"} if HAS_REGORUS else set())
    assert engines <= set(figures["throughput"])
    assert document["settings"]["embedded_opa"] == document["settings"]["opa"]
    parts = figures["breakdown"]
    for name in ("decide_sync (the whole decision)", "encode_input (orjson)"):
        assert parts["python"]["parts_us"][name]["p50_us"] > 0
    assert {"100", "400", "off"} <= set(parts["gogc"])
    go = parts["go"]
    assert "skipped" in go or any(row["us"] > 0 for row in go.values())


def test_the_product_does_not_import_regorus():
    # regorus is kept in benchmarks/ only, for the comparison.
    code = (
        "import sys, prefect_governance.core.engines, prefect_governance.core.decision, "
        "prefect_governance.runtime.engine, prefect_governance.worker; "
        "assert 'regorus' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_the_governed_task_benchmark_gives_every_figure_of_the_table(tmp_path, opa_bin):
    # Both engines, a few calls each: the benchmark itself fails unless every governed
    # call's decision was reported to Prefect, allowed, with nothing missing.
    document = _run("tasks", tmp_path, "--quick")
    figures = _figures_of("tasks", document)
    for label, value in figures.items():
        if "overhead" not in label:  # a difference: a quick run's noise may make it negative
            assert value > 0, label
    assert document["figures"]["run_log_send_failures"] == 0
    assert document["figures"]["embedded"]["decide"]["n"] == 50
