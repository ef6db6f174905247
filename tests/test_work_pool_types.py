"""`prefect work-pool create --type ...` for each governed type, offline, from the package's
entry point: the pool's template starts every run through the gate, which no job variable
can replace."""

from __future__ import annotations

import asyncio
import importlib.util
import shlex
import subprocess
import sys
from typing import Any

import pytest
from prefect import get_client

from prefect_governance.cli.local import prefect_env
from prefect_governance.core.handoff import GATE_COMMAND
from tests.conftest import missing


def _process_command(template: dict[str, Any]) -> str:
    return template["job_configuration"]["command"]


def _kubernetes_command(template: dict[str, Any]) -> str:
    manifest = template["job_configuration"]["job_manifest"]
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    assert container["args"] == []
    return shlex.join(container["command"])


@pytest.mark.parametrize(
    ("worker_type", "extra", "command_of"),
    [
        ("governed-process", None, _process_command),
        ("governed-docker", "prefect_docker", _process_command),
        ("governed-kubernetes", "prefect_kubernetes", _kubernetes_command),
    ],
)
def test_work_pool_create_type_works_offline(prefect_server, worker_type, extra, command_of):
    if extra is not None and importlib.util.find_spec(extra) is None:
        missing(f"{extra} (the extra for {worker_type})")
    pool_name = f"cli-{worker_type}"
    created = subprocess.run(
        [sys.executable, "-m", "prefect", "work-pool", "create", pool_name, "--type", worker_type],
        env=prefect_env(prefect_server.home, prefect_server.api_url),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert created.returncode == 0, created.stdout + created.stderr

    async def read() -> Any:
        async with get_client() as client:
            return await client.read_work_pool(pool_name)

    pool = asyncio.run(read())
    assert pool.type == worker_type
    assert command_of(pool.base_job_template) == GATE_COMMAND
    assert "command" not in pool.base_job_template["variables"]["properties"]
