"""The per-task history in the operator tools: `agent show` and `lineage show` over a real
SQLite lineage (records built by the factories, signed with the tests' lineage key)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone

from prefect_governance.cli.history import TASK_END, history_report, run_histories
from prefect_governance.cli.local import prefect_env
from prefect_governance.core.decision import worker_refusal
from prefect_governance.lineage.events import decision_event
from prefect_governance.lineage.store import LineageStore
from prefect_governance.worker.blocks import GovernanceAgent
from tests.agents import save_agent
from tests.task_end_support import FELL, LIED, REJECTED, governed_run

CLI = [sys.executable, "-m", "prefect_governance.cli"]
AGENT = "a-tasks"
T0 = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)
FIRST, SECOND, THIRD = (f"{n}b6f1a2e-0000-4000-8000-000000000000" for n in (1, 2, 3))

RUN_RECORDS = 12  # how many records governed_run appends


def tasks(run: int = 0) -> list[list[str]]:
    """The tasks of the ``run``-th run appended as the history shows them: seq in the chain,
    task, outcome, trust, memory, check (none when the worker's check agreed with the run)."""
    rows = [
        ["load (attempt 1)", "completed", "0.80 -> 0.82", "committed v2 (notes)"],
        ["transform (attempt 1)", "failed", "0.82 -> 0.70", "-", f"NOT VERIFIED: {LIED}"],
        ["write (attempt 1)", "memory_rejected", "0.70 -> 0.62", f"rejected: {REJECTED}"],
        ["publish (attempt 1)", "refused", "0.62 -> 0.57", "-"],
    ]
    return [[str(run * RUN_RECORDS + 3 + 2 * i), *row] for i, row in enumerate(rows)]


HEADER = ["seq", "task", "outcome", "trust", "memory", "check"]


def _store(tmp_path, *flow_runs: str) -> tuple[str, LineageStore]:
    url = f"sqlite:///{tmp_path / 'lineage.db'}"
    store = LineageStore(url)
    for index, flow_run in enumerate(flow_runs):
        store.append(*governed_run(AGENT, flow_run, T0 + timedelta(minutes=index)))
    return url, store


def _cells(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def _sections(text: str) -> dict[str, list[list[str]]]:
    """The history's runs (by their header line) and each one's table rows (header and
    rule left out)."""
    sections: dict[str, list[list[str]]] = {}
    current: list[list[str]] = []
    for line in text.split("per-task history (oldest run first)", 1)[1].splitlines():
        if line.startswith("run "):
            current = sections.setdefault(line, [])
        elif line.startswith("  ") and not line.strip().startswith("---"):
            current.append(_cells(line))
    return {run: rows[1:] for run, rows in sections.items() if rows and rows[0] == HEADER}


def test_a_runs_history_shows_each_task_in_order(tmp_path):
    _, store = _store(tmp_path, FIRST)
    report = history_report(run_histories(store.last_runs_with(AGENT, TASK_END, 5)))
    store.dispose()
    assert _sections(report) == {
        f"run {FIRST[:8]}  decided allowed (dec-{FIRST[:8]}); ended FAILED": tasks()
    }
    assert FELL not in report  # the refusal's reason is the decision's, shown by lineage show


def test_the_history_keeps_the_newest_runs_with_tasks_and_only_vouched_records(tmp_path):
    _, store = _store(tmp_path, FIRST, SECOND, THIRD)
    refused = worker_refusal("no agent", policy_path="p", mode="enforce", fail_mode="closed")
    store.append(decision_event(refused, agent_id=AGENT, flow_run_id="no-tasks", envelope=None))
    forger = LineageStore(store.url, signer=None)
    forger.append(*governed_run(AGENT, "0b6f1a2e-0000-4000-8000-00000000ffff", T0))
    forger.dispose()

    runs = run_histories(store.last_runs_with(AGENT, TASK_END, 2))
    assert [run.flow_run_id for run in runs] == [SECOND, THIRD]
    for run in runs:
        assert run.decision is not None and run.decision.verdict == "allowed"
        assert run.outcome is not None and run.outcome.state == "FAILED"
        assert [end.verdict for end in run.tasks] == [
            "completed",
            "failed",
            "memory_rejected",
            "refused",
        ]
    assert len(run_histories(store.last_runs_with(AGENT, TASK_END, 10))) == 3
    assert store.last_runs_with(AGENT, TASK_END, 0) == []
    store.dispose()
    assert history_report([]) == "per-task history (oldest run first): no governed task has ended"


def test_lineage_show_prints_the_chain_then_the_per_task_history(tmp_path):
    url, store = _store(tmp_path, FIRST)
    store.dispose()
    shown = subprocess.run(
        [*CLI, "lineage", "show", "--agent", AGENT, "--url", url],
        capture_output=True,
        text=True,
        env=os.environ,
    )
    assert shown.returncode == 0, shown.stderr
    chain, history = shown.stdout.split("\n\n", 1)
    rows = {line.split()[0]: line.split() for line in chain.splitlines()[2:]}
    assert [rows[seq][3:6] for seq in ("3", "5", "7", "9")] == [
        ["task_end", FIRST[:8], "completed"],
        ["task_end", FIRST[:8], "failed"],
        ["task_end", FIRST[:8], "memory_rejected"],
        ["task_end", FIRST[:8], "refused"],
    ]
    assert _sections(history) == {
        f"run {FIRST[:8]}  decided allowed (dec-{FIRST[:8]}); ended FAILED": tasks()
    }


def test_agent_show_adds_the_per_task_history_of_its_newest_runs(prefect_server, tmp_path):
    url, store = _store(tmp_path, FIRST, SECOND)
    store.dispose()
    agent = GovernanceAgent(id=AGENT, version=1, owner="data", trust_scope=["governed"])
    save_agent(agent, "tasks-agent")

    def agent_show(*more: str) -> str:
        shown = subprocess.run(
            [*CLI, "agent", "show", "tasks-agent", "--url", url, *more],
            capture_output=True,
            text=True,
            timeout=120,
            env=prefect_env(prefect_server.home, prefect_server.api_url),
        )
        assert shown.returncode == 0, shown.stderr
        return shown.stdout

    out = agent_show("--runs", "1")
    assert out.startswith(f"agent      {AGENT} (version 1, owner data)")  # as before
    assert "trust      0.57" in out  # the trust the runs committed
    assert _sections(out) == {
        f"run {SECOND[:8]}  decided allowed (dec-{SECOND[:8]}); ended FAILED": tasks(1)
    }
    assert list(_sections(agent_show())) == [
        f"run {run[:8]}  decided allowed (dec-{run[:8]}); ended FAILED" for run in (FIRST, SECOND)
    ]
