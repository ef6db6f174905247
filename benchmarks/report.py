"""One table of every benchmark's latest figures against the goals (issue 6).

Reads benchmarks/results/*.json. ``--readme`` also writes the table into README.md
between the ``benchmarks:begin`` and ``benchmarks:end`` markers.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from common import RESULTS, ROOT, describe

README = ROOT / "README.md"
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"


@dataclass(frozen=True)
class Row:
    """One figure: where it comes from, how it is shown, and its goal if it has one."""

    benchmark: str
    label: str
    path: tuple[str, ...]
    unit: str
    goal: str = ""
    meets: Callable[[float], bool] | None = None


def _at(document: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = document.get("figures", {})
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


ROWS = [
    Row("decision_latency", "decision, embedded (OPA in-process), p50", ("embedded", "p50_ms"),
        "ms", "≤ 0.15 ms", lambda v: v <= 0.15),
    Row("decision_latency", "decision, embedded (OPA in-process), p99", ("embedded", "p99_ms"),
        "ms", "≤ 0.5 ms", lambda v: v <= 0.5),
    Row("decision_latency", "decision, regorus (the build it replaced), p50",
        ("regorus", "p50_ms"), "ms"),
    Row("decision_latency", "decision, regorus (the build it replaced), p99",
        ("regorus", "p99_ms"), "ms"),
    Row("decision_latency", "decision, OPA sidecar, p50", ("opa", "p50_ms"), "ms",
        "≤ 1 ms", lambda v: v <= 1.0),
    Row("decision_latency", "decision, OPA sidecar, p99", ("opa", "p99_ms"), "ms",
        "≤ 3 ms", lambda v: v <= 3.0),
    *(
        Row("decision_latency", f"decisions/s, embedded, {n} in flight",
            ("throughput", "embedded", n), "/s", "≥ 3,500", lambda v: v >= 3500)
        for n in ("1", "8", "64")
    ),
    *(
        Row("decision_latency", f"decisions/s, {engine}, {n} in flight",
            ("throughput", engine, n), "/s")
        for engine in ("regorus", "opa")
        for n in ("1", "8", "64")
    ),
    *(
        Row("worker_ab", f"worker wall time, governed ({engine}) / stock",
            ("ratios", engine, "wall"), "x", "≤ 1.05", lambda v: v <= 1.05)
        for engine in ("embedded", "opa")
    ),
    *(
        Row("worker_ab", f"run latency p50, governed ({engine}) / stock",
            ("ratios", engine, "latency_p50"), "x")
        for engine in ("embedded", "opa")
    ),
    Row("infrastructure_ab", "container run, governed-docker / docker (median)",
        ("docker", "ratio_median"), "x"),
    Row("infrastructure_ab", "Job run, governed-kubernetes / kubernetes (median)",
        ("kubernetes", "ratio_median"), "x"),
    Row("tasks", "task call p50, ungoverned", ("ungoverned", "p50_ms"), "ms"),
    *(
        row
        for engine, name in (("embedded", "embedded"), ("opa", "OPA sidecar"))
        for row in (
            Row("tasks", f"task call p50, governed ({name})", (engine, "p50_ms"), "ms"),
            Row("tasks", f"task call p99, governed ({name})", (engine, "p99_ms"), "ms"),
            Row("tasks", f"governed task overhead, p50 ({name})",
                (engine, "overhead_p50_ms"), "ms"),
            Row("tasks", f"governed task p50 / ungoverned ({name})", (engine, "ratio_p50"),
                "x"),
            Row("tasks", f"governed task overhead, p50, median of paired rounds ({name})",
                (engine, "overhead_p50_paired_ms"), "ms"),
            Row("tasks", f"task decision p50, in run_engine().decide ({name})",
                (engine, "decide", "p50_ms"), "ms"),
        )
    ),
    Row("lineage", "lineage appends/s, SQLite, 1 writer", ("append_per_s", "sqlite", "1"),
        "/s", "≥ 1,000", lambda v: v >= 1000),
    Row("lineage", "lineage appends/s, SQLite, 4 writers", ("append_per_s", "sqlite", "4"),
        "/s"),
    Row("lineage", "lineage appends/s, PostgreSQL, 1 writer",
        ("append_per_s", "postgresql", "1"), "/s"),
    Row("lineage", "lineage appends/s, PostgreSQL, 4 writers",
        ("append_per_s", "postgresql", "4"), "/s", "≥ 2,000", lambda v: v >= 2000),
    *(
        Row("lineage", f"chain verification, {name}", ("verify_per_s", db), "events/s",
            "≥ 50,000", lambda v: v >= 50_000)
        for db, name in (("sqlite", "SQLite"), ("postgresql", "PostgreSQL"))
    ),
    *(
        Row("scale", f"growth with history, {what}, {name}",
            (db, "growth", key), "%", "≤ 20 %", lambda v: v <= 0.20)
        for db, name in (("sqlite", "SQLite"), ("postgresql", "PostgreSQL"))
        for key, what in (("decision_path_p50", "run decision path p50"),
                          ("append_time", "append time"))
    ),
]  # fmt: skip


def _show(value: float, unit: str) -> str:
    if unit == "%":
        return f"{value * 100:+.1f} %"
    if unit == "ms":
        return f"{value:.3f} ms"
    if unit == "x":
        return f"{value:.3f}"
    return f"{value:,.0f} {unit}"


def load() -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}


def lines(results: dict[str, dict[str, Any]]) -> Iterator[str]:
    """The markdown table, then where and when each benchmark ran."""
    yield "| figure | latest | goal | met |"
    yield "| --- | --- | --- | --- |"
    for row in ROWS:
        document = results.get(row.benchmark)
        value = _at(document, row.path) if document else None
        if value is None:
            yield f"| {row.label} | not run | {row.goal} | |"
            continue
        met = "" if row.meets is None else ("yes" if row.meets(float(value)) else "**no**")
        yield f"| {row.label} | {_show(float(value), row.unit)} | {row.goal} | {met} |"
    yield ""
    for name, document in results.items():
        settings = ", ".join(f"{k}={v}" for k, v in document.get("settings", {}).items())
        yield (f"- `{name}`: {document['date'][:10]}, {describe(document['machine'])}; {settings}")


def write_readme(table: str) -> None:
    text = README.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no {BEGIN} ... {END} section")
    README.write_text(pattern.sub(lambda _: f"{BEGIN}\n{table}\n{END}", text))
    print("README.md updated")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--readme", action="store_true", help="write the table into README.md")
    args = parser.parse_args()
    table = "\n".join(lines(load()))
    print(table)
    if args.readme:
        write_readme(table)


if __name__ == "__main__":
    main()
