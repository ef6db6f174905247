"""A real Docker engine and Compose for the container tests, and what they share.

The engine, the base image and the project's image come from ``scripts/docker.sh``; Compose
and the stand-ins for the registry images from ``scripts/compose.sh``. A part that is not
here skips the test, or fails it with CI=true (``tests.conftest.missing``).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import get_client

from prefect_governance.testing import deploy_example
from tests.conftest import ROOT, missing

# The Debian client (20.10) matches the Debian engine; scripts/docker.sh picks it the same way.
DOCKER = os.environ.get("DOCKER") or (
    "/usr/bin/docker" if Path("/usr/bin/docker").exists() else shutil.which("docker") or "docker"
)
PROJECT_IMAGE = os.environ.get("PROJECT_IMAGE", "prefect-governance:0.1.0")


def docker(
    *args: str, check: bool = True, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the docker CLI (in ``env`` when given), output captured as text."""
    result = subprocess.run(
        [DOCKER, *args], capture_output=True, text=True, timeout=timeout, check=False, env=env
    )
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {result.stderr[-2000:]}")
    return result


def engine() -> None:
    """A Docker engine answers, or the test is missing a real part."""
    try:
        answered = docker("version", "--format", "{{.Server.Version}}", check=False, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        missing(f"a Docker engine ({exc}; bash scripts/docker.sh starts one)")
    if answered.returncode != 0:
        missing(f"a Docker engine ({answered.stderr.strip()}; bash scripts/docker.sh starts one)")


def image(name: str, made_by: str) -> None:
    """The image is in the engine, or the test is missing a real part."""
    if docker("image", "inspect", name, check=False).returncode != 0:
        missing(f"the image {name} ({made_by} builds it)")


def health(container: str) -> str:
    """The container's health status as the engine reports it (``docker inspect``)."""
    state = json.loads(docker("inspect", "--format", "{{json .State}}", container).stdout)
    return (state.get("Health") or {}).get("Status", "none")


def wait_health(container: str, wanted: str, timeout: float) -> str:
    """Poll the container's health until it is ``wanted`` (or the timeout); return the last."""
    deadline = time.monotonic() + timeout
    status = health(container)
    while status != wanted and time.monotonic() < deadline:
        time.sleep(1)
        status = health(container)
    return status


@contextmanager
def shared_directory(prefix: str) -> Iterator[Path]:
    """A directory the tests and a container share at the same path: examples/flows.py to
    deploy from, and room for the markers and files the container's user (uid 10001)
    writes. Not under pytest's tmp dir, which only root may enter."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        root.chmod(0o777)
        shutil.copy(ROOT / "examples" / "flows.py", root / "flows.py")
        (root / "flows.py").chmod(0o644)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def polled_pool(pool: str, timeout: float) -> str | None:
    """The type of the pool once a worker has created and polled it (None at the timeout):
    the worker in a container creates its pool itself, as ``prefect worker start`` does."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    async with get_client() as client:
        while time.monotonic() < deadline:
            try:
                found = await client.read_work_pool(pool)
                if await client.read_workers_for_work_pool(pool):
                    return found.type
            except ObjectNotFound:
                pass
            await asyncio.sleep(0.5)
    return None


def flow_run_summary(run: Any) -> str:
    """A flow run's final state, for assertion messages."""
    state = run.state
    return (
        f"{state.type if state else None} {state.name if state else ''}: {state and state.message}"
    )


# What the container tests ask for: one run the agent may make, one it may not.
ASKED = {"allowed": "read:warehouse", "refused": "delete:warehouse"}


async def start_allowed_and_refused(
    prefix: str, pool: str, agent: str, directory: Path, markers: dict[str, Path]
) -> dict[str, Any]:
    """Deploy the example flow twice on the pool (one capability the agent has, one it has
    not) and create a run of each; their flow run ids by name."""
    runs: dict[str, Any] = {}
    async with get_client() as client:
        for name, capability in ASKED.items():
            deployment = await deploy_example(
                f"{prefix}-{name}",
                pool,
                {"agent": agent, "capabilities": [capability]},
                directory=directory,
            )
            made = await client.create_flow_run_from_deployment(
                deployment, parameters={"rows": 10, "marker": str(markers[name])}
            )
            runs[name] = made.id
    return runs
