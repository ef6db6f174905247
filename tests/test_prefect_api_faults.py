"""The Prefect API fails under the worker: it neither crashes nor runs what it could not decide.

The server is real; the faults are injected with respx on the worker's own httpx
traffic (a real server cannot be made to fail one route on demand). Every other
request passes through to the real server.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import respx
from prefect import get_client
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

from prefect_governance.testing import wait_final
from prefect_governance.worker.blocks import GovernanceAgent
from prefect_governance.worker.process import GovernedProcessWorker
from tests.agents import harness

pytestmark = pytest.mark.e2e

POOL = "gov-api-faults"
AGENT = "api-fault-agent"


@pytest.fixture(scope="module")
def deployment(prefect_server, tmp_path_factory):
    with harness(
        prefect_server, tmp_path_factory.mktemp("api-faults"), lineage_block="api-faults-lineage"
    ) as gov:
        agent = GovernanceAgent(
            id=AGENT, owner="data@example.com", trust_scope=[POOL], capabilities=[]
        )
        yield asyncio.run(gov.governed_pool(POOL, agent)), gov.store


def _governed_run(deployment_id, marker: Path, faults) -> object:
    """Create a run, let an in-process governed worker take it under the faults."""

    async def go():
        async with get_client() as client:
            run = await client.create_flow_run_from_deployment(
                deployment_id, parameters={"rows": 10, "marker": str(marker)}
            )
        with respx.mock(assert_all_called=False, assert_all_mocked=False) as mock:
            faults(mock)
            mock.route().pass_through()
            async with GovernedProcessWorker(work_pool_name=POOL, prefetch_seconds=60) as worker:
                await worker.get_and_submit_flow_runs()
            calls = list(mock.calls)  # respx forgets them when the mock closes
        return (await wait_final([run.id], timeout=120))[run.id], calls

    return asyncio.run(go())


def test_a_transient_failure_is_retried_and_the_run_decided_once(deployment, tmp_path):
    deployment_id, store = deployment

    def faults(mock):
        # The first two reads of the agent block fail; Prefect's client retries.
        responses = [httpx.Response(503), httpx.Response(503)]
        mock.route(path__regex=rf"/block_documents/name/{AGENT}$").mock(
            side_effect=lambda request: responses.pop(0) if responses else None
        )

    run, calls = _governed_run(deployment_id, tmp_path / "marker", faults)
    agent_reads = [c for c in calls if c.request.url.path.endswith(f"/name/{AGENT}")]
    served = [
        c.optional_response.status_code if c.optional_response else "real" for c in agent_reads
    ]
    assert served[:3] == [503, 503, "real"], "two failures, then the real server answered"
    assert run.state.is_completed(), run.state
    assert (tmp_path / "marker").read_text().count("loaded") == 1, "executed exactly once"
    decisions = [e for e in store.recent(20, flow_run_id=str(run.id)) if e.kind == "decision"]
    assert len(decisions) == 1 and decisions[0].verdict == "allowed"


def test_a_lasting_failure_refuses_the_run_and_the_worker_carries_on(deployment, tmp_path):
    deployment_id, store = deployment

    def faults(mock):
        mock.route(path__regex=rf"/block_documents/name/{AGENT}$").mock(
            return_value=httpx.Response(503, json={"detail": "unavailable"})
        )

    with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 1}):
        run, calls = _governed_run(deployment_id, tmp_path / "marker", faults)
    assert any(c.optional_response and c.optional_response.status_code == 503 for c in calls)
    assert run.state.name == "Refused", run.state
    assert not (tmp_path / "marker").exists(), "a run that could not be decided did not run"
    assert "governance failed" in run.state.message and "503" in run.state.message
    decisions = [e for e in store.recent(20, flow_run_id=str(run.id)) if e.kind == "decision"]
    assert len(decisions) == 1 and decisions[0].verdict == "refused", "the refusal is recorded"

    # The fault is gone: the next run is decided and runs.
    run, _ = _governed_run(deployment_id, tmp_path / "after", lambda mock: None)
    assert run.state.is_completed() and (tmp_path / "after").exists()
