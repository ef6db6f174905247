"""The container worker, really run: the project's image as the governed worker.

A real Docker engine runs the image (``scripts/docker.sh image`` builds it) exactly as the
Dockerfile's header documents, with host networking (the engine here has no network of its
own) so that it reaches the test's real Prefect server on 127.0.0.1. It decides runs with
the image's embedded engine and packaged policies: an allowed run executes in the
container (its marker appears through a shared directory), a refused one does not (its
marker stays absent) and is ``Refused`` with its reasons, every decision is in the
lineage the container wrote, and the image's HEALTHCHECK reports the container healthy.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid

import pytest

from prefect_governance.cli.local import free_port
from prefect_governance.lineage.store import LineageStore
from prefect_governance.testing import wait_final, wait_outcomes
from prefect_governance.worker.blocks import GovernanceAgent
from tests.agents import TEST_AGENT_KEYS, asave_agent
from tests.conftest import ROOT
from tests.lineage_keys import LINEAGE_ENV
from tests.stack_support import (
    PROJECT_IMAGE,
    docker,
    engine,
    flow_run_summary,
    health,
    image,
    polled_pool,
    shared_directory,
    start_allowed_and_refused,
    wait_health,
)

pytestmark = pytest.mark.e2e


def documented_run() -> list[str]:
    """The `docker run` line of the Dockerfile's header, as arguments (continuations joined)."""
    header = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    text = " ".join(header).replace("\\ ", " ")
    found = re.search(r"docker run (.*?) (prefect-governance:\S+)", text)
    assert found, "the Dockerfile's header documents how to run the image"
    return found.group(1).split()


def test_the_documented_run_passes_the_api_url_and_the_pool() -> None:
    args = documented_run()
    names = {args[i + 1].split("=")[0] for i, a in enumerate(args) if a == "-e"}
    assert {"PREFECT_API_URL", "PREFECT_WORK_POOL"} <= names


def test_the_image_as_the_worker_decides_runs_and_is_healthy(prefect_server) -> None:

    engine()
    image(PROJECT_IMAGE, "bash scripts/docker.sh image")
    pool = f"container-{uuid.uuid4().hex[:8]}"
    container = f"governance-worker-{pool}"
    with shared_directory("governance-container-") as shared:
        lineage_url = f"sqlite:///{shared / 'lineage.db'}"
        markers = {name: shared / f"marker-{name}" for name in ("allowed", "refused")}
        health_port = str(free_port())

        async def deploy() -> dict[str, uuid.UUID]:
            await asave_agent(
                GovernanceAgent(
                    id="container-etl",
                    owner="data@example.com",
                    trust_scope=[pool],
                    capabilities=["read:warehouse"],
                ),
                "container-etl",
            )
            polled = await polled_pool(pool, 120)
            assert polled == "governed-process", "the container's worker made and polled its pool"
            return await start_allowed_and_refused(pool, pool, "container-etl", shared, markers)

        environment = {
            # As the Dockerfile's header: the API and the pool ...
            "PREFECT_API_URL": prefect_server.api_url,
            "PREFECT_WORK_POOL": pool,
            # ... the keys the worker pins and signs with (see the README), its lineage ...
            "PREFECT_GOVERNANCE_AGENT_KEYS": TEST_AGENT_KEYS,
            "PREFECT_GOVERNANCE_LINEAGE_URL": lineage_url,
            **LINEAGE_ENV,
            # ... its health endpoint on loopback (host network), and a brisk poll.
            "PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1",
            "PREFECT_WORKER_WEBSERVER_PORT": health_port,
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_WORKER_PREFETCH_SECONDS": "1",
        }
        documented = documented_run()
        named = {documented[i + 1].split("=")[0] for i, a in enumerate(documented) if a == "-e"}
        assert named <= set(environment), "every variable the header sets, the test sets"
        run_args = ["--detach", "--name", container, "--init", "--network", "host"]
        run_args += ["--volume", f"{shared}:{shared}"]
        for name in environment:
            run_args += ["--env", name]
        # Arguments after the image are appended to `prefect worker start` (the header's
        # `[--limit 4 ...]`).
        worker_args = ["--limit", "4"]
        docker(
            *("run", *run_args, PROJECT_IMAGE, *worker_args),
            env={**os.environ, **environment},
            timeout=120,
        )
        try:
            assert health(container) == "starting", "the image declares a HEALTHCHECK"
            runs = asyncio.run(deploy())
            final = asyncio.run(wait_final(list(runs.values()), timeout=180))
            allowed, refused = final[runs["allowed"]], final[runs["refused"]]
            logs = docker("logs", container, check=False)
            context = f"\n{flow_run_summary(allowed)}\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}"
            assert allowed.state.is_completed(), context
            assert markers["allowed"].read_text() == "loaded 10 rows into orders\n"
            assert refused.state.is_cancelled() and refused.state.name == "Refused", context
            assert 'capability "delete:warehouse" is not granted' in refused.state.message
            assert not markers["refused"].exists(), "a refused run never executes"

            store = LineageStore(lineage_url)
            try:
                asyncio.run(wait_outcomes(store, [runs["allowed"]], timeout=60))
                verdicts = {
                    name: {(e.kind, e.verdict) for e in store.recent(50, flow_run_id=str(run_id))}
                    for name, run_id in runs.items()
                }
                assert ("decision", "allowed") in verdicts["allowed"]
                assert ("decision", "refused") in verdicts["refused"]
                assert "outcome" in {kind for kind, _ in verdicts["allowed"]}
                assert store.verify() == [], "the container signs the lineage with its key"
            finally:
                store.dispose()

            # The image's HEALTHCHECK (every 30 s after a 30 s start period), as the engine
            # reports it.
            assert wait_health(container, "healthy", 120) == "healthy", context
        finally:
            docker("rm", "--force", container, check=False)
