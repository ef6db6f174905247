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


# --- each task a governed mutation: trust and memory move with every task -----------------

POSTURE_MEMORY_SCHEMA = {
    "type": "object",
    "properties": {
        "processed": {"type": "integer", "minimum": 0},
        "seen": {"type": "object", "additionalProperties": {"type": "boolean"}},
    },
    "additionalProperties": False,
}


def _mark(marker_dir: str, step: str, text: str = "ran") -> None:
    Path(marker_dir, step).write_text(f"{text}\n")


@governed(writes=["processed"])
@task
def load_batch(marker_dir: str) -> int:
    """Task 1: loads a batch and records it in memory (accepted, read by the next task)."""
    from prefect_governance import propose_memory

    _mark(marker_dir, "load_batch")
    propose_memory({"processed": 100})
    return 100


@governed
@task
def check_batch(marker_dir: str) -> dict:
    """Task 2: reads the memory task 1 committed in this run."""
    from prefect_governance import current_memory

    seen = current_memory()
    _mark(marker_dir, "check_batch", json.dumps(seen))
    return seen


@governed
@task
def transform(marker_dir: str) -> None:
    """Task 3: fails."""
    _mark(marker_dir, "transform")
    raise RuntimeError("the transform failed (as the demo asks)")


@governed(writes=["processed"])
@task
def annotate(marker_dir: str) -> None:
    """Task 4: proposes a count the memory schema forbids (rejected at the task's end)."""
    from prefect_governance import propose_memory

    _mark(marker_dir, "annotate")
    propose_memory({"processed": -5})


@governed
@task
def publish(marker_dir: str) -> None:
    """Task 5: refused before its body: trust fell across the last three tasks."""
    _mark(marker_dir, "publish")


@governed
@task
def notify(marker_dir: str) -> None:
    """Task 6: refused too: the trust it inherits is still falling."""
    _mark(marker_dir, "notify")


@flow(log_prints=True)
def posture_pipeline(marker_dir: str) -> list[str]:
    """Six governed tasks, each moving the agent's posture for the next one.

    Ends Completed (every task's state is taken, none raised to the flow); returns the
    tasks' state names in order.
    """
    states = [
        load_batch(marker_dir, return_state=True),
        check_batch(marker_dir, return_state=True),
        transform(marker_dir, return_state=True),
        annotate(marker_dir, return_state=True),
        publish(marker_dir, return_state=True),
        notify(marker_dir, return_state=True),
    ]
    for state in states:
        print(f"{state.name}: {state.message or ''}")
    return [state.name for state in states]


@governed
@task
def flaky(marker_dir: str) -> None:
    _mark(marker_dir, "flaky")
    raise RuntimeError("flaky failed")


@flow
def posture_liar(marker_dir: str) -> list[str]:
    """The flow's own code lies: it reports every failed task as completed, so the
    next task is decided with a posture better than the agent's."""
    from prefect_governance.runtime import posture

    honest = posture.RunPosture.end

    def lying_end(self, ref, outcome, state, writes):  # type: ignore[no-untyped-def]
        return honest(self, ref, "completed" if outcome == "failed" else outcome, state, writes)

    posture.RunPosture.end = lying_end  # type: ignore[method-assign]
    states = [flaky(marker_dir, return_state=True), check_batch(marker_dir, return_state=True)]
    return [state.name for state in states]


@governed(writes=["seen"])
@task
def remember_run(key: str, marker_dir: str, pause: float) -> None:
    from prefect_governance import propose_memory

    time.sleep(pause)
    propose_memory({"seen": {key: True}})
    _mark(marker_dir, f"remember-{key}")


@flow
def posture_concurrent(key: str, marker_dir: str, pause: float = 0.5) -> None:
    """Two governed tasks; the second records this run's key in the agent's memory."""
    check_batch(marker_dir)
    remember_run(key, marker_dir, pause)
