"""Example flows for the demo and the tests: each writes a marker file when it runs."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import flow


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
