"""A governed container run against the stock worker's, side by side in one session.

The same flow in the same image on the same engine, from the run's creation to its final
state, under ``governed-docker`` and ``docker``, then ``governed-kubernetes`` and
``kubernetes`` (the real Docker engine and the single-node cluster of the tests). The runs
are the tests' own (tests/test_docker_e2e.py and tests/test_kubernetes_e2e.py, which print
their figures); this runs them ``--rounds`` times and writes
benchmarks/results/infrastructure_ab.json.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import statistics
import subprocess
import sys

from common import ROOT, write_result

DOCKER = re.compile(r"governed-docker ([\d.]+) s, stock docker ([\d.]+) s")
KUBERNETES = re.compile(r"Kubernetes run, created to final \(s\): (\{.*\})")
TESTS = {
    "docker": "tests/test_docker_e2e.py::test_stock_docker_worker_runs_the_same_flow",
    "kubernetes": "tests/test_kubernetes_e2e.py::test_stock_and_governed_side_by_side",
}


def _round(kind: str) -> tuple[float, float]:
    """One side-by-side pair, (governed, stock) seconds."""
    output = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", TESTS[kind]],
        cwd=ROOT,
        env={**os.environ, "CI": "true"},
        capture_output=True,
        text=True,
        check=True,
    )
    text = output.stdout + output.stderr
    if kind == "docker":
        match = DOCKER.search(text)
        assert match, text[-2000:]
        return float(match[1]), float(match[2])
    match = KUBERNETES.search(text)
    assert match, text[-2000:]
    figures = ast.literal_eval(match[1])
    return figures["gov-kube"], figures["stock-kube"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    figures = {}
    for kind in TESTS:
        pairs = [_round(kind) for _ in range(args.rounds)]
        ratios = [governed / stock for governed, stock in pairs]
        figures[kind] = {
            "governed_s": [round(g, 2) for g, _ in pairs],
            "stock_s": [round(s, 2) for _, s in pairs],
            "ratio_median": round(statistics.median(ratios), 2),
        }
        print(
            f"{kind:10}  governed {figures[kind]['governed_s']} s  stock "
            f"{figures[kind]['stock_s']} s  ratio (median) {figures[kind]['ratio_median']}"
        )
    write_result("infrastructure_ab", figures, rounds=args.rounds)


if __name__ == "__main__":
    main()
