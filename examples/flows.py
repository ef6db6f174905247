"""Example flows for the demo and the tests: each writes a marker file when it runs."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import allow_failure, flow, task

from prefect_governance import govern, governed


@flow(log_prints=True)
def load_warehouse(
    rows: int = 10,
    table: str = "orders",
    marker: str | None = None,
    fail: bool = False,
    seconds: float = 0.0,
) -> int:
    """Pretend to load `rows` rows into `table` (taking `seconds`); leave a marker that it ran.

    The marker gets one line per execution, so a run executed twice shows two.
    """
    if marker:
        with open(marker, "a") as out:
            out.write(f"loaded {rows} rows into {table}\n")
    time.sleep(seconds)
    if fail:
        raise RuntimeError("the warehouse load failed (as asked)")
    print(f"loaded {rows} rows into {table}")
    return rows


@flow(log_prints=True)
def learn(
    rows: int = 10, marker: str | None = None, fail: bool = False, report_rows: int | None = None
) -> dict:
    """An agent that remembers: reads its memory, proposes an update, leaves a marker.

    The marker holds the memory the run saw, so a test can check that a commit
    from one run is visible to the next.
    """
    from prefect_governance import runtime

    agent = runtime.current_agent()  # verified: signature, expiry, this flow run
    seen = {"version": agent.memory.version, "content": agent.memory.content}
    if marker:
        Path(marker).write_text(json.dumps(seen))
    if fail:
        raise RuntimeError("the load failed (as asked)")
    total = agent.memory.content.get("total_rows", 0) + rows
    runtime.propose_memory(
        {"total_rows": total if report_rows is None else report_rows, "last_rows": rows}
    )
    print(f"agent {agent.id} (trust {agent.agent.trust.score}) saw memory v{agent.memory.version}")
    return seen


# --- governance inside a run: governed tasks and mediated capabilities --------------


@task
def extract(marker_dir: str) -> int:
    """Allowed: the agent's policy lets any task it does not deny run."""
    Path(marker_dir, "extract").write_text("ran\n")
    return 3


@task(retries=2)
def drop_tables(marker_dir: str) -> None:
    """Refused before its body: the agent's constraints deny this task by name."""
    Path(marker_dir, "drop_tables").write_text("ran\n")


@governed(capabilities=["read:warehouse"])
@task
def summarize(rows: int, marker_dir: str, api_token: str = "") -> str:
    """Declares read:warehouse; uses it, then tries write:warehouse, which it did not declare."""
    from prefect_governance import CapabilityDenied, capability

    Path(marker_dir, "summarize").write_text("ran\n")
    with capability("read:warehouse", use="read the orders table"):
        Path(marker_dir, "read").write_text(f"read {rows} rows\n")
    try:
        with capability("write:warehouse", use="write a summary table"):
            Path(marker_dir, "write").write_text("wrote the summary\n")
    except CapabilityDenied as denied:
        Path(marker_dir, "blocked").write_text(f"{denied}\n")
    return f"{rows} rows"


@task
def report(summary: str, marker_dir: str) -> str:
    Path(marker_dir, "report").write_text(f"{summary}\n")
    return summary


@govern
@flow(log_prints=True)
def governed_pipeline(marker_dir: str, api_token: str = "", pause: float = 0.0) -> str:
    """Every task governed (``govern``): one refused, one capability use blocked, the rest runs.

    Leaves one marker file per step that ran, so a test can see what did not.
    ``pause`` seconds pass before the first task.
    """
    time.sleep(pause)
    rows = extract(marker_dir)
    dropped = drop_tables.submit(marker_dir)
    summary = summarize(rows, marker_dir, api_token=api_token)
    done = report.submit(summary, marker_dir, wait_for=[allow_failure(dropped)]).result()
    print(f"drop_tables ended {dropped.state.name}: {dropped.state.message}")
    return done


@governed(capabilities=["write:warehouse"])
@task
def write_summary(marker_dir: str) -> None:
    from prefect_governance import capability

    with capability("write:warehouse"):
        Path(marker_dir, "task-write").write_text("wrote\n")


@flow
def narrowed_write(marker_dir: str) -> str:
    """A task that declares write:warehouse, then the flow body using it itself.

    Both happen only when the run's decision granted write:warehouse.
    """
    from prefect_governance import CapabilityDenied, capability

    state = write_summary(marker_dir, return_state=True)
    try:
        with capability("write:warehouse"):
            Path(marker_dir, "flow-write").write_text("wrote\n")
    except CapabilityDenied as denied:
        Path(marker_dir, "flow-blocked").write_text(f"{denied}\n")
    return state.name
