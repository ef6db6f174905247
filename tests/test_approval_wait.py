"""Approvals as a verdict, against a real Prefect server and the real governed worker.

Each agent needs alice's approval (``constraints.approval``); the worker pins alice's and
bob's keys and decides an awaiting run again every 2 s
(PREFECT_GOVERNANCE_APPROVAL_RECHECK_SECONDS). A run that needs an approval starts
nothing (its marker file stays absent) and waits Scheduled, named AwaitingApproval, with
labels that say who may approve and until when; alice's approval made with
``prefect-governance approve`` while it waits lets it run; a rejection by alice, or the
timeout, refuses it; approvals by someone the policy does not name (bob's, pinned; and
mallory's, unpinned, under alice's name) change nothing. The lineage holds each step.

Attacks: an API client that moves the waiting run to Running and starts the gate by hand,
one that edits the run's parameters after alice approved it, and one that reschedules the
run to be decided at once, start nothing.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from prefect import get_client
from prefect.states import Running, Scheduled

from prefect_governance.cli.local import prefect_env
from prefect_governance.core.approvals import (
    FlowRunBinding,
    new_statement,
    parameters_sha256,
    sign_statement,
    store_approval,
)
from prefect_governance.core.handoff import ENVELOPE_ENV
from prefect_governance.core.signing import SigningKey, sign
from prefect_governance.runtime.gate import REFUSED_EXIT
from prefect_governance.testing import create_pool, deploy_example, wait_final
from prefect_governance.worker.blocks import GovernanceAgent
from tests.agents import harness
from tests.approvers import ALICE, BOB, MALLORY_AS_ALICE, approver_keys_env
from tests.grants import example_grant

pytestmark = pytest.mark.e2e

POOL = "approval-wait"
CLI = [sys.executable, "-m", "prefect_governance.cli"]
RECHECK = {"PREFECT_GOVERNANCE_APPROVAL_RECHECK_SECONDS": "2"}
CASES = ["approved", "timed out", "rejected", "not permitted", "gate", "parameters edited"]
TIMEOUTS = {"timed out": 12}  # seconds; the others wait up to an hour


def _slug(case: str) -> str:
    return case.replace(" ", "-")


def _cli(server, key_file: Path, *args: str) -> dict[str, Any]:
    result = subprocess.run(
        [*CLI, "approve", "--key", str(key_file), "--approver", "alice", *args],
        env=prefect_env(server.home, server.api_url),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def _wait_for(
    run_id: Any, done: Callable[[Any], bool], timeout: float = 90, what: str = "a state"
) -> Any:
    deadline = time.monotonic() + timeout
    async with get_client() as client:
        while True:
            run = await client.read_flow_run(run_id)
            if done(run):
                return run
            assert not run.state.is_final(), f"no {what}: {run.state}"
            assert time.monotonic() < deadline, f"no {what}: {run.state}"
            await asyncio.sleep(0.5)


def _awaiting(run: Any) -> bool:
    return run.state is not None and run.state.name == "AwaitingApproval"


def _decisions(store, run_id) -> list[Any]:
    """The run's decision records, oldest first."""
    events = store.recent(200, flow_run_id=str(run_id))
    return [e for e in reversed(events) if e.kind == "decision"]


@pytest.fixture(scope="module")
def waiting(prefect_server, tmp_path_factory):
    """One run per case, each awaiting alice's approval under a running worker."""
    tmp = tmp_path_factory.mktemp("approval-wait")
    key_file = tmp / "alice.key"
    key_file.write_text(ALICE.seed_b64 + "\n")
    with harness(prefect_server, tmp, lineage_block="approval-wait-lineage") as gov:

        async def setup() -> dict[str, Any]:
            await create_pool(POOL, lineage_store=await gov.save_lineage(), overwrite=True)
            runs = {}
            async with get_client() as client:
                for case in CASES:
                    slug = _slug(case)
                    approval: dict[str, Any] = {"approvers": ["alice"]}
                    if case in TIMEOUTS:
                        approval["timeout_seconds"] = TIMEOUTS[case]
                    await gov.save_agent(
                        GovernanceAgent(
                            id=f"waits-{slug}",
                            owner="sec@example.com",
                            trust_scope=[POOL],
                            capabilities=["read:warehouse"],
                            constraints={"approval": approval},
                        )
                    )
                    deployment = await deploy_example(
                        f"wait-{slug}", POOL, {"agent": f"waits-{slug}"}
                    )
                    marker = tmp / f"marker-{slug}"
                    run = await client.create_flow_run_from_deployment(
                        deployment, parameters={"marker": str(marker), "rows": 5}
                    )
                    runs[case] = {"id": run.id, "marker": marker}
            return runs

        runs = asyncio.run(setup())
        gov.start_worker(POOL, log=tmp / "worker.log", extra_env={**approver_keys_env(), **RECHECK})
        for run in runs.values():
            run["awaiting"] = asyncio.run(_wait_for(run["id"], _awaiting, what="AwaitingApproval"))
        yield {"gov": gov, "runs": runs, "key_file": key_file, "server": prefect_server}
        gov.stop_workers()
        assert gov.store.verify() == []


def test_a_run_that_needs_an_approval_waits_visibly_and_starts_nothing(waiting):
    run = waiting["runs"]["approved"]
    awaiting = run["awaiting"]
    assert awaiting.state.type.value == "SCHEDULED"
    assert "Awaiting approval by one of alice until" in awaiting.state.message
    assert f"prefect-governance approve --flow-run {run['id']}" in awaiting.state.message
    labels = awaiting.labels
    assert labels["governance.decision"] == "awaiting_approval"
    assert labels["governance.approvers"] == "alice"
    deadline = datetime.fromisoformat(labels["governance.approval_deadline"])
    assert timedelta(minutes=59) < deadline - datetime.now(timezone.utc) <= timedelta(hours=1)
    assert not run["marker"].exists()
    first = _decisions(waiting["gov"].store, run["id"])[0]
    assert first.verdict == "awaiting_approval" and not first.allow
    assert first.payload["approval"][0]["approvers"] == ["alice"]
    assert first.payload["approval"][0]["rule"] == "prefect.governance.rules.approval.approval"
    trust = [e for e in waiting["gov"].store.recent(200, agent_id=first.agent_id)]
    assert not [e for e in trust if e.kind == "trust"], "waiting cost the agent trust"


def test_an_approval_by_alice_while_it_waits_runs_it(waiting):
    run = waiting["runs"]["approved"]
    time.sleep(5)  # two rechecks at least: still waiting, nothing recorded again
    store = waiting["gov"].store
    assert [d.verdict for d in _decisions(store, run["id"])] == ["awaiting_approval"]
    approval = _cli(waiting["server"], waiting["key_file"], "--flow-run", str(run["id"]))
    final = asyncio.run(wait_final([run["id"]], timeout=90))[run["id"]]
    assert final.state.is_completed(), final.state
    assert run["marker"].read_text().count("loaded") == 1
    decisions = _decisions(store, run["id"])
    assert [d.verdict for d in decisions] == ["awaiting_approval", "allowed"]
    allowed = decisions[-1]
    assert [a["id"] for a in allowed.payload["envelope"]["approvals"]] == [approval["id"]]
    requested = datetime.fromisoformat(allowed.payload["envelope"]["approval_requested_at"])
    assert abs(requested - decisions[0].created_at.replace(tzinfo=timezone.utc)) < timedelta(
        seconds=1
    )


def test_the_timeout_refuses_it(waiting):
    run = waiting["runs"]["timed out"]
    final = asyncio.run(wait_final([run["id"]], timeout=90))[run["id"]]
    assert final.state.is_cancelled() and final.state.name == "Refused", final.state
    assert "approval timed out" in final.state.message
    assert f"{TIMEOUTS['timed out']} s allowed" in final.state.message
    assert not run["marker"].exists()
    decisions = _decisions(waiting["gov"].store, run["id"])
    assert [d.verdict for d in decisions] == ["awaiting_approval", "refused"]
    waited = decisions[-1].created_at - decisions[0].created_at
    assert waited >= timedelta(seconds=TIMEOUTS["timed out"]), waited


def test_approvals_by_someone_not_permitted_change_nothing_and_a_rejection_refuses(waiting):
    run, store = waiting["runs"]["not permitted"], waiting["gov"].store

    async def approve_as_others() -> None:
        async with get_client() as client:
            current = await client.read_flow_run(run["id"])
            binding = FlowRunBinding(
                flow_run_id=str(run["id"]), parameters_sha256=parameters_sha256(current.parameters)
            )
            now = datetime.now(timezone.utc)
            for approver, key in (("bob", BOB), ("alice", MALLORY_AS_ALICE)):
                made = new_statement(
                    approver=approver, binding=binding, now=now, ttl=timedelta(hours=1)
                )
                await store_approval(client, sign_statement(made, key))

    asyncio.run(approve_as_others())
    time.sleep(8)  # several rechecks
    still = asyncio.run(_wait_for(run["id"], _awaiting))
    assert not run["marker"].exists()
    decisions = _decisions(store, run["id"])
    assert {d.verdict for d in decisions} == {"awaiting_approval"}
    # Recorded when something changed (the statements found), not at every recheck: the
    # first wait, then one or two changes (bob's, mallory's, seen apart or together).
    assert 2 <= len(decisions) <= 3, [d.payload["rejected_approvals"] for d in decisions]
    newest = decisions[-1]
    assert [a["approver"] for a in newest.payload["envelope"]["approvals"]] == ["bob"]
    assert any(
        "does not verify with key 'alice'" in r for r in newest.payload["rejected_approvals"]
    )
    assert "who are not approvers" in newest.payload["approval"][0]["reason"]
    assert "approvals not accepted" in still.state.message

    _cli(waiting["server"], waiting["key_file"], "--flow-run", str(run["id"]), "--reject")
    final = asyncio.run(wait_final([run["id"]], timeout=90))[run["id"]]
    assert final.state.name == "Refused", final.state
    assert 'was rejected by ["alice"]' in final.state.message
    assert not run["marker"].exists()
    assert _decisions(store, run["id"])[-1].verdict == "refused"


def test_a_rejection_by_alice_refuses_it(waiting):
    run = waiting["runs"]["rejected"]
    _cli(waiting["server"], waiting["key_file"], "--flow-run", str(run["id"]), "--reject")
    final = asyncio.run(wait_final([run["id"]], timeout=90))[run["id"]]
    assert final.state.name == "Refused" and 'was rejected by ["alice"]' in final.state.message
    assert not run["marker"].exists()
    decisions = _decisions(waiting["gov"].store, run["id"])
    assert [d.verdict for d in decisions] == ["awaiting_approval", "refused"]
    assert decisions[-1].payload["envelope"]["rejections"][0]["approver"] == "alice"


def test_attack_forced_running_and_the_gate_started_by_hand_runs_nothing(waiting):
    """An API client moves the waiting run to Running and starts the pool's gate itself:
    without a grant it refuses; with a grant for the run's awaiting decision (as if signed
    by a key the gate trusts) it refuses too, the run's decision is not one that runs."""
    run, server = waiting["runs"]["gate"], waiting["server"]
    awaiting = run["awaiting"]

    async def force_running() -> None:
        async with get_client() as client:
            await client.set_flow_run_state(run["id"], Running(), force=True)

    asyncio.run(force_running())
    key = SigningKey.generate("wait-attack-signer")
    environment = prefect_env(server.home, server.api_url, PREFECT__FLOW_RUN_ID=str(run["id"]))
    gate = [sys.executable, "-I", "-m", "prefect_governance.gate", "--trusted-key"]
    bare = subprocess.run(
        [*gate, key.trusted_key], env=environment, capture_output=True, text=True, timeout=120
    )
    assert bare.returncode == REFUSED_EXIT, bare.stderr[-2000:]
    grant = example_grant(
        str(run["id"]), decision_id=awaiting.labels["governance.decision_id"]
    ).model_dump(mode="json")
    environment[ENVELOPE_ENV] = json.dumps(sign(grant, key))
    granted = subprocess.run(
        [*gate, key.trusted_key], env=environment, capture_output=True, text=True, timeout=120
    )
    assert granted.returncode == REFUSED_EXIT, granted.stderr[-2000:]
    assert "'awaiting_approval', not one that runs" in granted.stderr
    assert not run["marker"].exists()


def test_attack_parameters_edited_after_the_approval_approve_nothing(waiting):
    """Alice approves the run as it is (rows=5); before the worker decides again, the
    requester edits its parameters (rows=500) and pulls its recheck forward. The approval
    is bound to the parameters' hash: the run still waits, and never runs with rows=500."""
    run, gov = waiting["runs"]["parameters edited"], waiting["gov"]
    gov.stop_workers()
    try:
        _cli(waiting["server"], waiting["key_file"], "--flow-run", str(run["id"]))

        async def edit() -> None:
            async with get_client() as client:
                await client.update_flow_run(
                    run["id"], parameters={"marker": str(run["marker"]), "rows": 500}
                )
                await client.set_flow_run_state(
                    run["id"],
                    Scheduled(scheduled_time=datetime.now(timezone.utc)),
                    force=True,
                )

        asyncio.run(edit())
    finally:
        gov.start_worker(
            POOL,
            log=gov.workdir / "worker-2.log",
            extra_env={**approver_keys_env(), **RECHECK},
        )
    asyncio.run(_wait_for(run["id"], _awaiting, what="AwaitingApproval again"))
    deadline = time.monotonic() + 60
    while True:
        decisions = _decisions(gov.store, run["id"])
        if len(decisions) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [d.verdict for d in decisions] == ["awaiting_approval", "awaiting_approval"]
    assert any(
        "bound to other parameters" in r for r in decisions[-1].payload["rejected_approvals"]
    )
    assert decisions[-1].payload["envelope"]["approvals"] == []
    time.sleep(4)
    assert not run["marker"].exists()
    assert _awaiting(asyncio.run(_wait_for(run["id"], lambda r: True)))
