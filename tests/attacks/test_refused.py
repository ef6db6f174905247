"""Attack: a refused run, moved back, executes after all (issue 14, 3).

Any holder of the Prefect API credentials may move a CANCELLED run back to
Scheduled, Pending or Running, and rewrite its labels. The shipped guard used to
hold only within Prefect's event-bucket window (about a minute); the governed
worker re-decided a rescheduled run from scratch. Against a real Prefect server
and the real governed worker, more than 90 s after the refusal:

- the server's guard puts a refused run forced to Running back to Refused;
- the governed worker refuses a refused run moved back to Scheduled again, without
  asking the policy, even with its labels rewritten to a fresh "allowed" decision;
- the gate refuses such a run started by hand with a grant validly signed for it;
- nothing executes (the marker stays absent) and the lineage records each attempt.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from prefect import get_client
from prefect.states import Running, Scheduled

from prefect_governance.cli.automations import REFUSED_AGAIN, apply_guards, remove_guards
from prefect_governance.cli.local import prefect_env
from prefect_governance.core.handoff import ENVELOPE_ENV
from prefect_governance.core.signing import SigningKey, sign
from prefect_governance.runtime.gate import REFUSED_EXIT
from prefect_governance.testing import wait_final
from prefect_governance.worker.blocks import GovernanceAgent
from tests.agents import harness
from tests.attacks.support import home_lineage_url
from tests.grants import example_grant

pytestmark = pytest.mark.e2e

POOL, AGENT = "attack-refused", "refused-attacker"
LATER = 95  # seconds after the refusal: past Prefect's bucket sweep (60 s after the window)
KEY = SigningKey.generate("refused-test-signer")


async def _state(client, run_id):
    return (await client.read_flow_run(run_id)).state


def test_a_refused_run_stays_refused_long_after(prefect_server, tmp_path):
    agent = GovernanceAgent(
        id=AGENT, owner="sec@example.com", trust_scope=[POOL], capabilities=["read:warehouse"]
    )
    markers = {name: tmp_path / f"{name}.ran" for name in ("guard", "rescheduled", "gate")}
    # The pool names no store: the worker keeps the default one in the home.
    gov = harness(prefect_server, tmp_path, lineage_url=home_lineage_url(prefect_server.home))

    async def setup():
        async with get_client() as client:
            await apply_guards(client)
            deployment = await gov.governed_pool(
                POOL,
                agent,
                job_variables={"capabilities": ["delete:warehouse"]},
                deployment="refused-attack",
                lineage_store=None,
            )
            return {
                name: (
                    await client.create_flow_run_from_deployment(
                        deployment, parameters={"marker": str(marker)}
                    )
                ).id
                for name, marker in markers.items()
            }

    with gov:
        _attack(prefect_server, gov, asyncio.run(setup()), markers)


def _attack(prefect_server, gov, runs, markers):
    gov.start_worker(POOL, log=gov.workdir / "w.log")
    store = gov.store
    try:
        finals = asyncio.run(wait_final(list(runs.values()), timeout=120))
        for name, run_id in runs.items():
            assert finals[run_id].state.name == "Refused", (name, finals[run_id].state)
        refused_at = time.monotonic()
        first = {
            name: finals[run_id].labels["governance.decision_id"] for name, run_id in runs.items()
        }
        time.sleep(max(0.0, LATER - (time.monotonic() - refused_at)))

        async def move_back():
            async with get_client() as client:
                # 1. forced to Running: the server's guard puts it back
                await client.set_flow_run_state(runs["guard"], Running(), force=True)
                deadline = time.monotonic() + 30
                while (await _state(client, runs["guard"])).type.value != "CANCELLED":
                    assert time.monotonic() < deadline, "the guard did not fire"
                    await asyncio.sleep(0.5)
                # 2. labels rewritten to a fresh "allowed" decision, then rescheduled
                await client.update_flow_run_labels(
                    runs["rescheduled"],
                    {"governance.decision": "allowed", "governance.decision_id": "forged"},
                )
                await client.set_flow_run_state(runs["rescheduled"], Scheduled(), force=True)
                return await _state(client, runs["guard"])

        guarded = asyncio.run(move_back())
        assert (guarded.name, guarded.message) == ("Refused", REFUSED_AGAIN)

        # The governed worker takes the rescheduled run again and refuses it for good.
        deadline = time.monotonic() + 120
        while True:
            decisions = [
                e
                for e in store.recent(50, flow_run_id=str(runs["rescheduled"]))
                if e.kind == "decision"
            ]
            if len(decisions) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(1)
        again = asyncio.run(wait_final([runs["rescheduled"]], timeout=60))[runs["rescheduled"]]
    finally:
        gov.stop_workers()
        asyncio.run(_remove_guard())
    assert len(decisions) == 2, [d.verdict for d in decisions]
    newest = decisions[0]
    assert newest.verdict == "refused" and newest.agent_id == AGENT
    assert "refused this flow run before" in newest.reasons[0]
    assert f"the lineage holds refused decision {first['rescheduled']}" in newest.reasons[0]
    assert "a Refused state is in its history" in newest.reasons[0]
    assert newest.engine == "worker", "the policy was asked again"
    trust = [e for e in store.recent(50, flow_run_id=str(runs["rescheduled"])) if e.kind == "trust"]
    assert len(trust) == 1, "moving a run back charged the agent again"
    assert again.state.name == "Refused", again.state

    # 3. The gate, started by hand for the third run with a grant validly signed for it and
    # the run's labels rewritten to match: its history still says refused.
    run_id = runs["gate"]

    async def relabel():
        async with get_client() as client:
            await client.update_flow_run_labels(
                run_id, {"governance.decision": "allowed", "governance.decision_id": "decision-1"}
            )
            await client.set_flow_run_state(run_id, Running(), force=True)

    asyncio.run(relabel())
    grant = example_grant(str(run_id), decision_id="decision-1", expires_in=timedelta(minutes=5))
    environment = prefect_env(
        prefect_server.home, prefect_server.api_url, PREFECT__FLOW_RUN_ID=str(run_id)
    )
    environment[ENVELOPE_ENV] = json.dumps(sign(grant.model_dump(mode="json"), KEY))
    result = subprocess.run(
        [sys.executable, "-I", "-m", "prefect_governance.gate", "--trusted-key", KEY.trusted_key],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == REFUSED_EXIT, result.stderr[-2000:]
    assert "a Refused state is in its history" in result.stderr

    for name, marker in markers.items():
        assert not marker.exists(), f"the refused {name} run executed"
    assert store.verify() == []


async def _remove_guard():
    async with get_client() as client:
        await remove_guards(client)
