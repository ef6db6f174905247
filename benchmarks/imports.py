"""What a governed flow run pays at start to import the run's side, next to Prefect alone.

Each figure is the median wall time of fresh interpreters (``python -c "import ..."``),
taken alternately so that both see the same machine. Run: ``python benchmarks/imports.py``
(``--module`` names another module, e.g. an older tree's run side on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

RUN_SIDE = "prefect_governance.runtime.tasks"
BASELINE = "prefect.flows"  # what any flow run imports anyway
STORAGE = ("sqlmodel", "sqlalchemy", "alembic")


def _once(module: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
    return time.perf_counter() - started


def _loads_storage(module: str) -> bool:
    code = f"import sys, {module}; print(any(m.split('.')[0] in {STORAGE!r} for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return out.stdout.strip() == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", default=RUN_SIDE)
    parser.add_argument("--runs", type=int, default=11)
    args = parser.parse_args()
    _once(args.module), _once(BASELINE)  # warm the file cache
    ours, prefect = [], []
    for _ in range(args.runs):
        ours.append(_once(args.module))
        prefect.append(_once(BASELINE))
    ours_s, prefect_s = statistics.median(ours), statistics.median(prefect)
    print(f"import {args.module}: {ours_s * 1000:.0f} ms (median of {args.runs})")
    print(f"import {BASELINE} (Prefect alone): {prefect_s * 1000:.0f} ms")
    print(f"the run side's own cost: {(ours_s - prefect_s) * 1000:.0f} ms")
    print(f"loads SQLModel/SQLAlchemy/Alembic: {_loads_storage(args.module)}")


if __name__ == "__main__":
    main()
