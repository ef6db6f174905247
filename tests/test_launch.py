"""How the governed worker starts the gate, and what the gate hands Prefect's engine (pure)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

from prefect_governance.core.handoff import (
    FLOW_CWD,
    FLOW_ENV,
    GATE_COMMAND,
    STARTED_AT_ENV,
    TRUSTED_KEYS_ENV,
    prior_refusal,
)
from prefect_governance.runtime.gate import flow_environment
from prefect_governance.worker.launch import (
    gate_argv,
    gate_environment,
    is_current_gate,
    unsafe_env,
    uses_gate,
)

WORKER = {"PATH": "/usr/bin", "HOME": "/home/worker", "SECRET_OF_WORKER": "s"}


def test_the_job_may_not_set_what_changes_what_starts_unless_the_pool_allows_it():
    job = {
        "PATH": "/tmp/evil:/usr/bin",
        "PYTHONPATH": "/tmp/fake",
        "LD_PRELOAD": "/tmp/x.so",
        "PREFECT_GOVERNANCE_TRUSTED_KEYS": "{}",
        "PREFECT_LOGGING_SETTINGS_PATH": "/tmp/log.yml",
        "ROWS": "10",  # an ordinary variable
    }
    assert unsafe_env(job, WORKER, []) == [
        "LD_PRELOAD",
        "PATH",
        "PREFECT_GOVERNANCE_TRUSTED_KEYS",
        "PREFECT_LOGGING_SETTINGS_PATH",
        "PYTHONPATH",
    ]
    assert unsafe_env(job, WORKER, ["PYTHON*", "LD_*", "PATH"]) == [
        "PREFECT_GOVERNANCE_TRUSTED_KEYS",
        "PREFECT_LOGGING_SETTINGS_PATH",
    ]
    # The worker's own value, or unsetting, changes nothing.
    assert unsafe_env({"PATH": "/usr/bin", "PYTHONPATH": None}, WORKER, []) == []
    assert unsafe_env({"path": "/tmp"}, WORKER, []) == [], "names are case-sensitive"


def test_the_gate_gets_the_worker_s_environment_and_the_run_s_as_data():
    job_env = {
        **WORKER,
        "HOME": "/tmp/attacker",
        "ROWS": "10",
        "PREFECT_GOVERNANCE_LINEAGE_URL": "x",
    }
    env = gate_environment(
        job_env,
        WORKER,
        secrets=["PREFECT_GOVERNANCE_LINEAGE_URL"],
        add={"PREFECT_GOVERNANCE_ENVELOPE": "grant"},
        working_dir="/srv/flows",
    )
    # Every variable is unset but the worker's own HOME (not the job's) and the grant.
    assert env["HOME"] == "/home/worker" and env["PATH"] is None and env["ROWS"] is None
    assert env["SECRET_OF_WORKER"] is None and env["PREFECT_GOVERNANCE_ENVELOPE"] == "grant"
    flow_env = json.loads(env[FLOW_ENV])
    assert flow_env["HOME"] == "/tmp/attacker" and flow_env["ROWS"] == "10"
    assert "PREFECT_GOVERNANCE_LINEAGE_URL" not in flow_env, "a worker secret reached the run"
    assert env[FLOW_CWD] == "/srv/flows"


def test_after_its_checks_the_gate_hands_the_engine_the_run_s_environment():
    gate_env = {
        FLOW_ENV: json.dumps({"HOME": "/tmp/attacker", "PREFECT_API_URL": "http://job"}),
        FLOW_CWD: "/srv/flows",
        "HOME": "/home/worker",
        "PREFECT_API_URL": "http://worker",  # the worker's settings win, as under Prefect
        "PREFECT__FLOW_RUN_ID": "run-1",
        TRUSTED_KEYS_ENV: "{}",
    }
    started = datetime(2026, 12, 1, tzinfo=timezone.utc)
    env, cwd = flow_environment(gate_env, {"k": "PUBLIC"}, started)
    assert cwd == "/srv/flows" and env["HOME"] == "/tmp/attacker"
    assert env["PREFECT_API_URL"] == "http://worker" and env["PREFECT__FLOW_RUN_ID"] == "run-1"
    assert json.loads(env[TRUSTED_KEYS_ENV]) == {"k": "PUBLIC"}
    assert env[STARTED_AT_ENV] == started.isoformat()
    assert FLOW_ENV not in env and FLOW_CWD not in env


def test_the_gate_command_is_one_a_stock_worker_cannot_start():
    assert GATE_COMMAND.startswith("/dev/null/") and is_current_gate(GATE_COMMAND)
    assert uses_gate("python -m prefect_governance.gate")
    assert not is_current_gate("python -m prefect_governance.gate"), "an old template"
    assert not uses_gate("python -m prefect.engine")
    assert gate_argv("/venv/bin/python", "k=P") == [
        "/venv/bin/python",
        "-I",
        "-m",
        "prefect_governance.gate",
        "--trusted-key",
        "k=P",
    ]


def test_any_witness_of_a_refusal_makes_it_final():
    assert prior_refusal(["Scheduled", "Pending", "Completed"], "allowed", None) is None
    assert "a Refused state is in its history" in prior_refusal(["Scheduled", "Refused"])
    assert "label is refused" in prior_refusal([], "refused")
    reason = prior_refusal(["Scheduled"], "allowed", "d-1")
    assert "the lineage holds refused decision d-1" in reason and "start a new run" in reason
