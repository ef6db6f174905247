"""docker-compose.yml's stack, really run with Docker Compose v2.

``docker compose config`` reads the project's file. Then the whole stack comes up
(PostgreSQL, the Prefect server, OPA, the governed worker) with
``deploy/compose/test-override.yml``, which puts every service on the host's network,
listening on loopback only, with images built here (``scripts/docker.sh``,
``scripts/compose.sh``), and a governed run goes through it end to end: deployed to the
stack's Prefect server, decided by the stack's OPA for the stack's worker, the allowed run
completes, the refused one is ``Refused`` and never executes, and the lineage is in the
stack's PostgreSQL. The stack is always taken down with its volumes (``down -v``).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prefect_governance.cli.local import free_port, wait_http
from prefect_governance.lineage.store import LineageStore
from prefect_governance.testing import wait_final, wait_outcomes
from prefect_governance.worker.blocks import GovernanceAgent
from tests.agents import TEST_AGENT_KEYS, asave_agent
from tests.conftest import ROOT, missing
from tests.lineage_keys import LINEAGE_ENV
from tests.stack_support import (
    PROJECT_IMAGE,
    docker,
    engine,
    flow_run_summary,
    image,
    polled_pool,
    shared_directory,
    start_allowed_and_refused,
)

COMPOSE = ROOT / "docker-compose.yml"
OVERRIDE = ROOT / "deploy" / "compose" / "test-override.yml"
OPA_IMAGE = "openpolicyagent/opa:1.22.2-static"
POSTGRES_IMAGE = "prefect-governance-postgres:15-bookworm"
SERVICES = {"postgres", "prefect-server", "opa", "worker"}


def compose_available() -> None:
    engine()
    found = docker("compose", "version", check=False)
    if found.returncode != 0:
        missing(f"Docker Compose v2 ({found.stderr.strip()}; bash scripts/compose.sh builds it)")


def secrets_env() -> dict[str, str]:
    """The variables docker-compose.yml requires (.env's), fresh random values."""
    return {
        "POSTGRES_PASSWORD": secrets.token_hex(12),
        "PREFECT_DB_PASSWORD": secrets.token_hex(12),
        "LINEAGE_DB_PASSWORD": secrets.token_hex(12),
        "PREFECT_API_AUTH_STRING": f"admin:{secrets.token_hex(12)}",
        "OPA_TOKEN": secrets.token_hex(16),
        "PREFECT_GOVERNANCE_AGENT_KEYS": TEST_AGENT_KEYS,
        "PREFECT_GOVERNANCE_LINEAGE_KEY": LINEAGE_ENV["PREFECT_GOVERNANCE_LINEAGE_KEY"],
        "PREFECT_GOVERNANCE_LINEAGE_KEY_ID": LINEAGE_ENV["PREFECT_GOVERNANCE_LINEAGE_KEY_ID"],
    }


def ports_env(flows: Path) -> dict[str, str]:
    """What the override asks of the test: free loopback ports and the shared directory."""
    return {
        "STACK_POSTGRES_PORT": str(free_port()),
        "STACK_PREFECT_PORT": str(free_port()),
        "STACK_OPA_PORT": str(free_port()),
        "STACK_WORKER_PORT": str(free_port()),
        "STACK_FLOWS_DIR": str(flows),
    }


def compose_env(extra: dict[str, str]) -> dict[str, str]:
    """The test's environment without any variable the compose files read, plus ``extra``
    (compose reads no .env file here: each call passes ``--env-file /dev/null``)."""
    ours = {*secrets_env(), "PREFECT_WORK_POOL", "PREFECT_UI_API_URL"}
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("COMPOSE_", "STACK_")) and k not in ours
    }
    return {**env, **extra}


def config(env: dict[str, str], *files: Path) -> dict[str, Any]:
    args = [a for f in files for a in ("--file", str(f))]
    result = docker(
        "compose",
        *("--project-directory", str(ROOT), "--env-file", os.devnull),
        *args,
        *("config", "--format", "json"),
        env=env,
    )
    return json.loads(result.stdout)


# --- the stand-in's files -----------------------------------------------------------------


def test_the_postgres_stand_in_dockerfile_lints_clean() -> None:
    from tests.test_container import tool

    dockerfile = ROOT / "deploy" / "compose" / "postgres-standin" / "Dockerfile"
    result = subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


# --- docker compose config --------------------------------------------------------------


def test_compose_config_reads_the_project_file(tmp_path: Path) -> None:
    compose_available()
    project = config(compose_env(secrets_env()), COMPOSE)
    assert set(project["services"]) == SERVICES
    worker = project["services"]["worker"]
    assert worker["environment"]["PREFECT_GOVERNANCE_OPA_URL"] == "http://opa:8181"
    assert {d for d in worker["depends_on"]} == {"postgres", "prefect-server", "opa"}
    # Every secret is required: without any one of .env's values compose starts nothing.
    for name in secrets_env():
        if name == "PREFECT_GOVERNANCE_LINEAGE_KEY_ID":
            continue  # has a default
        without = {k: v for k, v in secrets_env().items() if k != name}
        refused = docker(
            *("compose", "--env-file", os.devnull, "--file", str(COMPOSE), "config"),
            check=False,
            env=compose_env(without),
        )
        assert refused.returncode != 0, f"compose starts without {name}"
        assert f"set {name} in .env" in refused.stderr


def test_the_override_changes_only_what_the_host_network_needs(tmp_path: Path) -> None:
    compose_available()
    env = compose_env({**secrets_env(), **ports_env(tmp_path)})
    base = config(env, COMPOSE)["services"]
    test = config(env, COMPOSE, OVERRIDE)["services"]
    allowed = {
        "postgres": {"image", "pull_policy", "network_mode", "networks", "environment", "command"},
        "prefect-server": {
            *("pull_policy", "network_mode", "networks", "ports"),
            *("entrypoint", "environment", "healthcheck"),
        },
        "opa": {"pull_policy", "network_mode", "networks", "command", "healthcheck"},
        "worker": {"pull_policy", "network_mode", "networks", "environment", "volumes"},
    }
    for name in SERVICES:
        changed = {
            k
            for k in base[name].keys() | test[name].keys()
            if base[name].get(k) != test[name].get(k)
        }
        assert changed <= allowed[name], (
            f"{name}: the override also changes {changed - allowed[name]}"
        )
        svc = test[name]
        assert svc["network_mode"] == "host" and not svc.get("ports") and not svc.get("networks")
        assert svc.get("pull_policy") == "never", "nothing is pulled from a registry"
    # Only addresses and ports change: each changed value, with the test's loopback
    # address and ports put back, is the project's.
    loopback = {
        "127.0.0.1:" + env["STACK_OPA_PORT"]: "opa:8181",
        "127.0.0.1:" + env["STACK_PREFECT_PORT"]: "prefect-server:4200",
        "127.0.0.1:" + env["STACK_POSTGRES_PORT"]: "postgres:5432",
    }

    def back(value: str) -> str:
        for new, old in loopback.items():
            value = value.replace(new, old)
        return value

    assert [back(a) for a in test["opa"]["command"]] == [
        a.replace("0.0.0.0:8181", "opa:8181") for a in base["opa"]["command"]
    ]
    assert [back(a) for a in test["opa"]["healthcheck"]["test"]] == [
        a.replace("127.0.0.1:8181", "opa:8181") for a in base["opa"]["healthcheck"]["test"]
    ]
    worker_env, base_env = test["worker"]["environment"], base["worker"]["environment"]
    for key in ("PREFECT_API_URL", "PREFECT_GOVERNANCE_OPA_URL", "PREFECT_GOVERNANCE_LINEAGE_URL"):
        assert back(worker_env[key]) == base_env[key]
        assert "127.0.0.1" in worker_env[key], "the worker reaches the others on loopback"
    assert set(worker_env) - set(base_env) == {
        "PREFECT_WORKER_WEBSERVER_HOST",
        "PREFECT_WORKER_WEBSERVER_PORT",
    }
    assert worker_env["PREFECT_WORKER_WEBSERVER_HOST"] == "127.0.0.1"
    server = test["prefect-server"]
    assert server["entrypoint"][server["entrypoint"].index("--host") + 1] == "127.0.0.1"
    assert "listen_addresses=127.0.0.1" in test["postgres"]["command"]


# --- the stack, up ----------------------------------------------------------------------


class Stack:
    """One `docker compose` project of the stack, on the host network."""

    def __init__(self, flows: Path):
        self.project = f"governance-stack-{uuid.uuid4().hex[:8]}"
        self.env = compose_env({**secrets_env(), **ports_env(flows)})
        self.api_url = f"http://127.0.0.1:{self.env['STACK_PREFECT_PORT']}/api"
        self.opa_url = f"http://127.0.0.1:{self.env['STACK_OPA_PORT']}"
        self.lineage_url = (
            f"postgresql+psycopg://lineage:{self.env['LINEAGE_DB_PASSWORD']}"
            f"@127.0.0.1:{self.env['STACK_POSTGRES_PORT']}/lineage"
        )

    def compose(self, *args: str, check: bool = True, timeout: float = 600):
        return docker(
            "compose",
            "--project-name",
            self.project,
            "--project-directory",
            str(ROOT),
            "--env-file",
            os.devnull,
            "--file",
            str(COMPOSE),
            "--file",
            str(OVERRIDE),
            *args,
            check=check,
            timeout=timeout,
            env=self.env,
        )

    def logs(self, *services: str) -> str:
        found = self.compose("logs", "--no-color", *services, check=False)
        return found.stdout + found.stderr


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    compose_available()
    image(PROJECT_IMAGE, "bash scripts/docker.sh image")
    image(OPA_IMAGE, "bash scripts/compose.sh opa")
    image(POSTGRES_IMAGE, "bash scripts/compose.sh postgres")
    with shared_directory("governance-stack-") as flows:
        stack = Stack(flows)
        began = time.monotonic()
        try:
            up = stack.compose("up", "--detach", "--wait", "--no-build", check=False)
            stack.up_seconds = time.monotonic() - began
            if up.returncode != 0:
                pytest.fail(
                    f"the stack did not come up: {up.stderr[-2000:]}\n{stack.logs()[-6000:]}"
                )
            print(f"stack up in {stack.up_seconds:.1f} s")
            yield stack
        finally:
            (tmp_path / "stack.log").write_text(stack.logs())
            down = stack.compose("down", "--volumes", "--remove-orphans", check=False)
            assert down.returncode == 0, down.stderr


def test_a_governed_run_goes_through_the_stack(stack: Stack) -> None:
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    # Every container is on the host network, and compose made no network of its own.
    for name in SERVICES:
        cid = stack.compose("ps", "--quiet", name).stdout.strip()
        assert cid, f"{name} is not running"
        mode = docker("inspect", "--format", "{{.HostConfig.NetworkMode}}", cid).stdout.strip()
        assert mode == "host", f"{name} runs on network {mode}"
    networks = docker("network", "ls", "--format", "{{.Name}}").stdout.split()
    assert not [n for n in networks if n.startswith(stack.project)]
    wait_http(f"{stack.api_url}/health", 30)

    flows = Path(stack.env["STACK_FLOWS_DIR"])
    markers = {name: flows / f"marker-{name}" for name in ("allowed", "refused")}
    pool = "governed"  # docker-compose.yml's default PREFECT_WORK_POOL, made by the worker

    async def run() -> dict[str, Any]:
        polled = await polled_pool(pool, 120)
        assert polled == "governed-process", f"no worker polled {pool}:\n{stack.logs('worker')}"
        await asave_agent(
            GovernanceAgent(
                id="stack-etl",
                owner="data@example.com",
                trust_scope=[pool],
                capabilities=["read:warehouse"],
            ),
            "stack-etl",
        )
        runs = await start_allowed_and_refused("stack", pool, "stack-etl", flows, markers)
        final = await wait_final(list(runs.values()), timeout=180)
        return {name: final[run_id] for name, run_id in runs.items()}

    settings = {
        PREFECT_API_URL: stack.api_url,
        PREFECT_API_AUTH_STRING: stack.env["PREFECT_API_AUTH_STRING"],
    }
    with temporary_settings(settings):
        final = asyncio.run(run())
    allowed, refused = final["allowed"], final["refused"]
    context = f"\n{flow_run_summary(allowed)}\n{stack.logs('worker')[-4000:]}"
    assert allowed.state.is_completed(), context
    assert markers["allowed"].read_text() == "loaded 10 rows into orders\n"
    assert refused.state.is_cancelled() and refused.state.name == "Refused", context
    assert 'capability "delete:warehouse" is not granted' in refused.state.message
    assert not markers["refused"].exists(), "a refused run never executes"

    # The stack's OPA made both decisions (its decision log names each run's decision).
    store = LineageStore(stack.lineage_url)
    try:
        asyncio.run(wait_outcomes(store, [allowed.id], timeout=60))
        decisions = {
            name: [e for e in store.recent(50, flow_run_id=str(run.id)) if e.kind == "decision"]
            for name, run in final.items()
        }
        assert [d.verdict for d in decisions["allowed"]] == ["allowed"]
        assert [d.verdict for d in decisions["refused"]] == ["refused"]
        assert store.verify() == [], "the lineage in the stack's PostgreSQL verifies"
    finally:
        store.dispose()
    opa_log = stack.logs("opa")
    for name, run in final.items():
        assert str(run.id) in opa_log, f"the {name} run was decided by the stack's OPA"
        assert decisions[name][0].engine == "opa", decisions[name][0].engine
    # On the host's network PostgreSQL asks for passwords on loopback too.
    wrong = stack.lineage_url.replace(stack.env["LINEAGE_DB_PASSWORD"], "not-the-password")
    with pytest.raises(Exception, match="password authentication failed"):
        LineageStore(wrong).verify()
