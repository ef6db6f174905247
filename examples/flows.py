"""Example flows for the demo and the tests: each writes a marker file when it runs."""

from __future__ import annotations

from pathlib import Path

from prefect import flow


@flow(log_prints=True)
def load_warehouse(
    rows: int = 10, table: str = "orders", marker: str | None = None, fail: bool = False
) -> int:
    """Pretend to load `rows` rows into `table`; leave a marker that it ran."""
    if marker:
        Path(marker).write_text(f"loaded {rows} rows into {table}\n")
    if fail:
        raise RuntimeError("the warehouse load failed (as asked)")
    print(f"loaded {rows} rows into {table}")
    return rows
