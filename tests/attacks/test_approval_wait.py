"""Attacks on approvals as a verdict (a run waits, Scheduled/AwaitingApproval, until a
signed approval), against a real Prefect server and the real governed worker.

Every agent here needs alice's approval; the worker pins alice's and bob's keys and
decides a waiting run again every 2 s. The attackers: the requester as an API client
(sets states, labels, scheduled times, deletes and writes variables), the deployment's
author (job variables), and whoever holds a run that alice did approve. A run the attack
must not execute is proven not to have executed: the marker file the flow writes stays
absent (or holds one line per execution). A hole the code does not withstand yet is an
``xfail(strict=True)`` test that says what opens it.

Held: a refused run (alice approved and rejected it) stays refused after the requester
deletes the rejection and sets it Scheduled again; a rejection crowded out by 600 junk
variables (reading fails closed past the cap: nothing is approved); an approved run that
completed does not run again on the same approval (an approval lets a run go ahead once); a
fail-open pool's engine failure refuses a run that needs an approval; a worker without a
lineage key does not restart the wait (its first AwaitingApproval state bounds it); no
exception waives the approval rule; the timeout cannot be pushed by labels, fresh
AwaitingApproval states or forced rechecks; ``mode: audit`` asked by the deployment or the
agent does not skip the wait.
Open (xfail): a rejection deleted by an API client before the worker read it; code or job variables
changed after the approval; junk statements flood a waiting run's lineage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from prefect import get_client
from prefect.client.schemas.actions import VariableCreate
from prefect.states import Scheduled

from prefect_governance.cli.local import prefect_env
from prefect_governance.core.approvals import MAX_STATEMENTS
from prefect_governance.testing import create_pool, deploy_example
from prefect_governance.worker.blocks import GovernanceAgent
from tests.agents import harness
from tests.approvers import ALICE, approver_keys_env

pytestmark = pytest.mark.e2e

POOL = "atk-approval-wait"
CLI = [sys.executable, "-m", "prefect_governance.cli"]
RECHECK = {"PREFECT_GOVERNANCE_APPROVAL_RECHECK_SECONDS": "2"}
TIMEOUT = 12  # seconds the "deadline pushed" run may wait
# case -> (agent's approval timeout or None for the hour, created for later (not due),
#          deployment job variables beyond the agent, agent's own mode)
CASES: dict[str, dict[str, Any]] = {
    "rejection deleted": {"later": True},
    "replayed after completion": {"later": True},
    "rejected then reset": {"later": True},
    "deadline pushed": {"timeout": TIMEOUT, "later": True},
    "rejection flooded out": {"later": True},
    "flooded lineage": {"later": True},
    "code swapped": {"later": True},
    "job variables changed": {"later": True, "capabilities": ["read:warehouse", "write:warehouse"]},
    "audit asked": {"job_variables": {"mode": "audit"}, "agent_mode": "audit"},
}


def _slug(case: str) -> str:
    return case.replace(" ", "-")


def _alice(server, key_file: Path, *args: str) -> dict[str, Any]:
    """``prefect-governance approve ... --key FILE --approver alice``, as alice would."""
    result = subprocess.run(
        [*CLI, "approve", "--key", str(key_file), "--approver", "alice", *args],
        env=prefect_env(server.home, server.api_url),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


async def _due_now(run_id: Any) -> None:
    """The requester pulls the run's start forward (any API client may)."""
    async with get_client() as client:
        await client.set_flow_run_state(
            run_id, Scheduled(scheduled_time=datetime.now(timezone.utc)), force=True
        )


async def _state(run_id: Any) -> Any:
    async with get_client() as client:
        return (await client.read_flow_run(run_id)).state


async def _wait(run_id: Any, done, timeout: float = 90, what: str = "a state") -> Any:
    deadline = time.monotonic() + timeout
    async with get_client() as client:
        while True:
            run = await client.read_flow_run(run_id)
            if done(run):
                return run
            assert time.monotonic() < deadline, f"no {what}: {run.state}"
            await asyncio.sleep(0.5)


def _awaiting(run: Any) -> bool:
    return run.state is not None and run.state.name == "AwaitingApproval"


def _final(run: Any) -> bool:
    return run.state is not None and run.state.is_final()


def _decisions(store, run_id) -> list[Any]:
    events = store.recent(500, flow_run_id=str(run_id))
    return [e for e in reversed(events) if e.kind == "decision"]


def _executions(marker: Path) -> int:
    return marker.read_text().count("loaded") if marker.exists() else 0


@pytest.fixture(scope="module")
def attack(prefect_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("atk-approval-wait")
    key_file = tmp / "alice.key"
    key_file.write_text(ALICE.seed_b64 + "\n")
    with harness(prefect_server, tmp, lineage_block="atk-approval-wait-lineage") as gov:

        async def setup() -> dict[str, Any]:
            await create_pool(POOL, lineage_store=await gov.save_lineage(), overwrite=True)
            runs = {}
            async with get_client() as client:
                for case, spec in CASES.items():
                    slug = _slug(case)
                    approval: dict[str, Any] = {"approvers": ["alice"]}
                    if spec.get("timeout"):
                        approval["timeout_seconds"] = spec["timeout"]
                    await gov.save_agent(
                        GovernanceAgent(
                            id=f"atk-waits-{slug}",
                            owner="sec@example.com",
                            trust_scope=[POOL],
                            capabilities=spec.get("capabilities", ["read:warehouse"]),
                            constraints={"approval": approval},
                            mode=spec.get("agent_mode"),
                        )
                    )
                    deployment = await deploy_example(
                        f"atk-wait-{slug}",
                        POOL,
                        {"agent": f"atk-waits-{slug}", **spec.get("job_variables", {})},
                    )
                    marker = tmp / f"marker-{slug}"
                    create: dict[str, Any] = {"parameters": {"marker": str(marker), "rows": 5}}
                    if spec.get("later"):  # not due: decided only when the test says
                        create["state"] = Scheduled(
                            scheduled_time=datetime.now(timezone.utc) + timedelta(hours=1)
                        )
                    run = await client.create_flow_run_from_deployment(deployment, **create)
                    runs[case] = {"id": run.id, "marker": marker, "deployment": deployment}
            return runs

        runs = asyncio.run(setup())
        gov.start_worker(POOL, log=tmp / "worker.log", extra_env={**approver_keys_env(), **RECHECK})
        yield {"gov": gov, "runs": runs, "key_file": key_file, "server": prefect_server}
        gov.stop_workers()
        assert gov.store.verify() == []


@pytest.mark.xfail(
    strict=True,
    reason=(
        "OPEN: a signed rejection is only a Prefect variable, which any API client can "
        "delete. Alice approves run X and then rejects it (she changed her mind) before the "
        "worker decides it; the requester deletes the rejection variable and pulls the run "
        "forward: the worker finds only the approval and runs X (decision allowed, lineage "
        "without any trace of the rejection)."
    ),
)
def test_a_rejection_deleted_by_an_api_client_still_refuses(attack):
    run, server, key_file = (
        attack["runs"]["rejection deleted"],
        attack["server"],
        attack["key_file"],
    )
    _alice(server, key_file, "--flow-run", str(run["id"]))
    rejection = _alice(server, key_file, "--flow-run", str(run["id"]), "--reject")

    async def delete_and_pull_forward() -> None:
        async with get_client() as client:
            await client.delete_variable_by_name(rejection["variable"])
        await _due_now(run["id"])

    asyncio.run(delete_and_pull_forward())
    final = asyncio.run(_wait(run["id"], _final, what="a final state"))
    assert not run["marker"].exists(), f"the rejected run executed: {final.state}"
    assert final.state.name == "Refused", final.state


def test_an_approved_run_that_completed_does_not_run_again_on_the_same_approval(attack):
    run, server, key_file = (
        attack["runs"]["replayed after completion"],
        attack["server"],
        attack["key_file"],
    )
    store = attack["gov"].store
    _alice(server, key_file, "--flow-run", str(run["id"]), "--expires", "1h")
    asyncio.run(_due_now(run["id"]))
    first = asyncio.run(_wait(run["id"], _final, what="the first end"))
    assert first.state.is_completed(), first.state
    assert _executions(run["marker"]) == 1

    asyncio.run(_due_now(run["id"]))  # the replay
    # the worker decides it again (it waits: the approval was spent), or runs it again
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(_decisions(store, run["id"])) < 2:
        time.sleep(0.5)
    time.sleep(3)  # a second execution (if any) writes its marker
    decisions = _decisions(store, run["id"])
    verdicts = [d.verdict for d in decisions]
    assert _executions(run["marker"]) == 1, f"executed twice on one approval: {verdicts}"
    assert verdicts == ["allowed", "awaiting_approval"], verdicts
    assert "an approval lets a run go ahead once" in " ".join(
        decisions[-1].payload["rejected_approvals"]
    )


def test_a_rejection_cannot_be_crowded_out_by_junk_variables(attack):
    run, server, key_file = (
        attack["runs"]["rejection flooded out"],
        attack["server"],
        attack["key_file"],
    )
    slug = _slug("rejection flooded out")
    _alice(
        server,
        key_file,
        "--deployment",
        f"load-warehouse/atk-wait-{slug}",
        "--parameters",
        json.dumps({"marker": str(run["marker"]), "rows": 5}),
    )
    _alice(server, key_file, "--flow-run", str(run["id"]), "--reject")

    async def flood_and_pull_forward() -> None:
        limit = asyncio.Semaphore(16)
        async with get_client() as client:

            async def junk(i: int) -> None:
                async with limit:
                    await client.create_variable(
                        VariableCreate(
                            name=f"a-governance-approval-run-{run['id']}-{i:04d}", value=i
                        )
                    )

            await asyncio.gather(*(junk(i) for i in range(MAX_STATEMENTS)))
        await _due_now(run["id"])

    asyncio.run(flood_and_pull_forward())
    store = attack["gov"].store
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
        "cannot all be read" in " ".join(d.payload.get("rejected_approvals") or [])
        for d in _decisions(store, run["id"])
    ):
        time.sleep(0.5)
    time.sleep(3)  # an execution (if any) writes its marker
    decisions = _decisions(store, run["id"])
    seen = [(d.verdict, d.payload.get("rejected_approvals")) for d in decisions]
    assert not run["marker"].exists(), f"the rejected run executed: {seen}"
    assert "allowed" not in [d.verdict for d in decisions], seen
    # Fail closed: past the cap nothing is approved (the run waits until its timeout).
    assert "cannot all be read" in " ".join(decisions[-1].payload["rejected_approvals"]), seen


@pytest.mark.xfail(
    strict=True,
    reason=(
        "OPEN: an approval binds the flow run (or deployment) id and the parameters, not "
        "what will run. After alice approved run X of deployment D (flows.py:load_warehouse), "
        "D's author updates D's entrypoint to flows.py:learn (any deployment field: "
        "entrypoint, pull_steps, path, job_variables): the approval still verifies and the "
        "worker runs code alice never saw."
    ),
)
def test_an_approval_does_not_cover_code_swapped_in_after_it(attack):
    from prefect.client.schemas.actions import DeploymentUpdate

    run, server, key_file = attack["runs"]["code swapped"], attack["server"], attack["key_file"]
    _alice(server, key_file, "--flow-run", str(run["id"]))

    async def swap_and_pull_forward() -> None:
        async with get_client() as client:
            await client.update_deployment(
                run["deployment"], DeploymentUpdate(entrypoint="flows.py:learn")
            )
        await _due_now(run["id"])

    asyncio.run(swap_and_pull_forward())
    final = asyncio.run(_wait(run["id"], _final, what="a final state"))
    ran = run["marker"].read_text() if run["marker"].exists() else ""
    assert ran in ("", "loaded 5 rows into orders\n"), f"other code ran ({final.state}): {ran!r}"


@pytest.mark.xfail(
    strict=True,
    reason=(
        "OPEN (documented: 'It says nothing about job variables'): after alice approved run "
        "X asking for read:warehouse, any API client updates X's job variables to ask for "
        "write:warehouse too (the agent has it); the approval still verifies and the run "
        "is granted a capability alice never saw. The binding could hash the run's job "
        "variables (or the envelope's capabilities and infrastructure) too."
    ),
)
def test_an_approval_does_not_cover_job_variables_changed_after_it(attack):
    run, server, key_file = (
        attack["runs"]["job variables changed"],
        attack["server"],
        attack["key_file"],
    )
    _alice(server, key_file, "--flow-run", str(run["id"]))

    async def widen_and_pull_forward() -> None:
        async with get_client() as client:
            await client.update_flow_run(
                run["id"], job_variables={"capabilities": ["read:warehouse", "write:warehouse"]}
            )
        await _due_now(run["id"])

    asyncio.run(widen_and_pull_forward())
    asyncio.run(_wait(run["id"], _final, what="a final state"))
    decision = _decisions(attack["gov"].store, run["id"])[-1]
    granted = decision.payload["envelope"]["capabilities"]
    assert not (decision.verdict == "allowed" and "write:warehouse" in granted), (
        decision.verdict,
        granted,
    )


def test_an_approval_does_not_outlive_a_rejection_the_worker_saw(attack):
    """Alice approved and rejected run X; the worker sees both and refuses it. The
    requester then deletes the rejection and sets the run Scheduled again: a refused run
    is refused again (its Refused state and the lineage say so), the approval left alone
    runs nothing."""
    run, server, key_file = (
        attack["runs"]["rejected then reset"],
        attack["server"],
        attack["key_file"],
    )
    store = attack["gov"].store
    _alice(server, key_file, "--flow-run", str(run["id"]))
    rejection = _alice(server, key_file, "--flow-run", str(run["id"]), "--reject")
    asyncio.run(_due_now(run["id"]))
    refused = asyncio.run(_wait(run["id"], _final, what="the refusal"))
    assert refused.state.name == "Refused", refused.state
    assert 'was rejected by ["alice"]' in refused.state.message
    decisions = _decisions(store, run["id"])
    assert [d.verdict for d in decisions] == ["refused"]
    envelope = decisions[0].payload["envelope"]
    assert [a["approver"] for a in envelope["approvals"]] == ["alice"]  # both were seen
    assert [a["approver"] for a in envelope["rejections"]] == ["alice"]

    async def delete_and_reset() -> None:
        async with get_client() as client:
            await client.delete_variable_by_name(rejection["variable"])
        await _due_now(run["id"])

    asyncio.run(delete_and_reset())
    time.sleep(1)
    again = asyncio.run(_wait(run["id"], _final, what="the second refusal"))
    assert again.state.name == "Refused", again.state
    assert "refused this flow run before" in again.state.message
    time.sleep(2)
    assert not run["marker"].exists(), "the rejected run executed on the approval left alone"
    assert [d.verdict for d in _decisions(store, run["id"])] == ["refused", "refused"]


def test_the_timeout_cannot_be_pushed_by_labels_states_or_rechecks(attack):
    """While the run waits, the requester keeps writing a deadline an hour ahead into its
    labels, a fresh ``AwaitingApproval`` Scheduled state due now (so the worker decides it
    at every poll) and a decision label of ``allowed``: the wait's start comes from the
    lineage, so the run is refused when its TIMEOUT s have passed, and the rechecks that
    found nothing new are not recorded (no flood)."""
    run, store = attack["runs"]["deadline pushed"], attack["gov"].store
    asyncio.run(_due_now(run["id"]))
    asyncio.run(_wait(run["id"], _awaiting, what="AwaitingApproval"))
    started = time.monotonic()

    async def push() -> Any:
        async with get_client() as client:
            while time.monotonic() - started < TIMEOUT + 30:
                current = await client.read_flow_run(run["id"])
                if current.state is not None and current.state.is_final():
                    return current
                later = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
                await client.update_flow_run_labels(
                    run["id"],
                    {"governance.approval_deadline": later, "governance.decision": "allowed"},
                )
                with contextlib.suppress(Exception):  # the worker moved it meanwhile
                    await client.set_flow_run_state(
                        run["id"],
                        Scheduled(
                            name="AwaitingApproval", scheduled_time=datetime.now(timezone.utc)
                        ),
                        force=True,
                    )
                await asyncio.sleep(1)
            return await client.read_flow_run(run["id"])

    final = asyncio.run(push())
    if not final.state.is_final():  # our last push may have come after the refusal
        final = asyncio.run(_wait(run["id"], _final, timeout=30, what="the refusal"))
    # Refused (a push that landed after the refusal is refused again: "refused before").
    assert final.state.name == "Refused", final.state
    assert not run["marker"].exists()
    decisions = _decisions(store, run["id"])
    verdicts = [d.verdict for d in decisions]
    assert verdicts[0] == "awaiting_approval" and "refused" in verdicts, verdicts
    assert "allowed" not in verdicts, verdicts
    refusal = next(d for d in decisions if d.verdict == "refused")
    assert any("approval timed out" in r for r in refusal.reasons), refusal.reasons
    waited = refusal.created_at - decisions[0].created_at
    assert timedelta(seconds=TIMEOUT) <= waited < timedelta(seconds=TIMEOUT + 15), waited
    # the pushes changed labels and states only: nothing new for the lineage to hold
    assert verdicts[: verdicts.index("refused")] == ["awaiting_approval"], verdicts


JUNK = 100  # junk statements the requester stores for the run
FLOOD_SECONDS = 12


@pytest.mark.xfail(
    strict=True,
    reason=(
        "OPEN (flood): same_wait compares rejected_approvals, so every recheck after the "
        "requester adds or removes one junk `governance-approval-run-<id>-*` variable is "
        "recorded again, each record listing every junk statement (up to 600 per prefix); "
        "and the requester sets the run due again at will, so the rate is the worker's "
        "poll, not PREFECT_GOVERNANCE_APPROVAL_RECHECK_SECONDS. The run never executes, "
        "but the lineage grows by O(records x junk) per waiting run."
    ),
)
def test_junk_statements_do_not_flood_the_lineage_of_a_waiting_run(attack):
    run, store = attack["runs"]["flooded lineage"], attack["gov"].store
    asyncio.run(_due_now(run["id"]))
    asyncio.run(_wait(run["id"], _awaiting, what="AwaitingApproval"))
    prefix = f"governance-approval-run-{run['id']}-"

    async def flood() -> None:
        async with get_client() as client:
            for i in range(JUNK):
                await client.create_variable(VariableCreate(name=f"{prefix}junk{i:04d}", value=i))
            started, toggle = time.monotonic(), 0
            while time.monotonic() - started < FLOOD_SECONDS:
                name = f"{prefix}toggle{toggle:04d}"
                await client.create_variable(VariableCreate(name=name, value=toggle))
                toggle += 1
                with contextlib.suppress(Exception):
                    await client.set_flow_run_state(
                        run["id"],
                        Scheduled(
                            name="AwaitingApproval", scheduled_time=datetime.now(timezone.utc)
                        ),
                        force=True,
                    )
                await asyncio.sleep(1.5)

    asyncio.run(flood())
    time.sleep(3)
    assert not run["marker"].exists()
    decisions = _decisions(store, run["id"])
    assert {d.verdict for d in decisions} == {"awaiting_approval"}
    listed = sum(len(d.payload["rejected_approvals"]) for d in decisions)
    size = sum(len(json.dumps(d.payload)) for d in decisions)
    # Bounded: the first wait, and one record for the junk (not one per recheck).
    assert len(decisions) <= 3, f"{len(decisions)} records, {listed} junk reasons, {size} bytes"


def test_audit_asked_by_the_deployment_or_the_agent_does_not_skip_the_wait(attack):
    """The deployment's job variables say ``mode: audit`` and the agent's own ``mode`` is
    audit: only the pool's mode counts, so the run still waits and starts nothing."""
    run, store = attack["runs"]["audit asked"], attack["gov"].store
    awaiting = asyncio.run(_wait(run["id"], _awaiting, what="AwaitingApproval"))
    time.sleep(5)  # two rechecks
    still = asyncio.run(_state(run["id"]))
    assert still.type.value in ("SCHEDULED", "PENDING"), still  # waiting, or rechecked now
    assert awaiting.labels["governance.decision"] == "awaiting_approval"
    assert not run["marker"].exists()
    verdicts = {d.verdict for d in _decisions(store, run["id"])}
    assert verdicts == {"awaiting_approval"}, verdicts


# --- the policy's side: an exception meets an approval -----------------------------------


def _policy_eval(document: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "input.json"
    path.write_text(json.dumps(document))
    result = subprocess.run(
        [*CLI, "policy", "eval", "--input", str(path)], capture_output=True, text=True, timeout=120
    )
    return json.loads(result.stdout)


EXAMPLES = Path(__file__).resolve().parents[2] / "policies" / "examples"


@pytest.mark.parametrize(
    "case, message",
    [("refused-approval-timed-out", "approval timed out"), ("refused-approval-rejected", "")],
)
def test_an_exception_on_the_approval_rule_never_runs_an_unapproved_run(tmp_path, case, message):
    document = json.loads((EXAMPLES / case / "input.json").read_text())
    document["exceptions"] = [
        {
            "name": "give-alice-more-time",
            "rules": ["prefect.governance.rules.approval.deny"],
            "message": message,
            "agents": [document["agent"]["id"]],
            "deployments": [],
            "pools": [],
            "owner": "security@example.com",
            "reason": "the approver is on leave; wait longer",
            "ticket": "SEC-9",
            "issued_at": "2026-11-20T09:00:00Z",
            "expires_at": "2026-12-30T09:00:00Z",
        }
    ]
    assert document["envelope"]["approvals"] == []
    decision = _policy_eval(document, tmp_path)
    assert decision["verdict"] != "allowed", decision
    assert not decision["allow"], decision


# --- a fail-open pool whose engine fails while a run waits -------------------------------

OPEN_POOL = "atk-approval-open"


def test_an_engine_failure_on_a_fail_open_pool_does_not_run_a_waiting_run(
    prefect_server, opa_bin, tmp_path
):
    from tests.conftest import OpaServer

    opa = OpaServer(opa_bin, tmp_path)
    try:
        with harness(prefect_server, tmp_path, lineage_block="atk-approval-open-lineage") as gov:
            marker = tmp_path / "marker-open"

            async def setup() -> Any:
                engine = await gov.save_engine(
                    "atk-approval-open-opa",
                    kind="opa",
                    opa_url=opa.url,
                    timeout_seconds=1,
                    retries=0,
                )
                await create_pool(
                    OPEN_POOL,
                    lineage_store=await gov.save_lineage(),
                    engine=engine,
                    fail_mode="open",
                    overwrite=True,
                )
                await gov.save_agent(
                    GovernanceAgent(
                        id="atk-waits-open",
                        owner="sec@example.com",
                        trust_scope=[OPEN_POOL],
                        capabilities=["read:warehouse"],
                        constraints={"approval": {"approvers": ["alice"]}},
                    )
                )
                deployment = await deploy_example(
                    "atk-wait-open", OPEN_POOL, {"agent": "atk-waits-open"}
                )
                async with get_client() as client:
                    return await client.create_flow_run_from_deployment(
                        deployment, parameters={"marker": str(marker), "rows": 5}
                    )

            run = asyncio.run(setup())
            gov.start_worker(
                OPEN_POOL, log=tmp_path / "worker.log", extra_env={**approver_keys_env(), **RECHECK}
            )
            asyncio.run(_wait(run.id, _awaiting, what="AwaitingApproval"))
            assert not marker.exists()
            opa.stop()  # the engine fails from the next recheck on
            deadline = time.monotonic() + 25
            while time.monotonic() < deadline and not marker.exists():
                state = asyncio.run(_state(run.id))
                if state.is_final():
                    break
                time.sleep(0.5)
            time.sleep(1)
            verdicts = [d.verdict for d in _decisions(gov.store, run.id)]
            assert not marker.exists(), f"the waiting run ran on an engine failure: {verdicts}"
            assert "allowed" not in verdicts and "ungoverned" not in verdicts, verdicts
    finally:
        opa.stop()


# --- a worker without a lineage key, restarted while a run waits -------------------------

RESTART_POOL = "atk-approval-restart"
RESTART_TIMEOUT = 10


def test_a_worker_restart_does_not_restart_the_wait(prefect_server, tmp_path, monkeypatch):
    from tests.lineage_keys import LINEAGE_ENV

    for name in LINEAGE_ENV:
        if name != "PREFECT_GOVERNANCE_LINEAGE_KEYS":  # the test's store still believes it
            monkeypatch.delenv(name, raising=False)
    with harness(prefect_server, tmp_path, lineage_block="atk-approval-restart-lineage") as gov:
        marker = tmp_path / "marker-restart"

        async def setup() -> Any:
            await create_pool(RESTART_POOL, lineage_store=await gov.save_lineage(), overwrite=True)
            await gov.save_agent(
                GovernanceAgent(
                    id="atk-waits-restart",
                    owner="sec@example.com",
                    trust_scope=[RESTART_POOL],
                    capabilities=["read:warehouse"],
                    constraints={
                        "approval": {"approvers": ["alice"], "timeout_seconds": RESTART_TIMEOUT}
                    },
                )
            )
            deployment = await deploy_example(
                "atk-wait-restart", RESTART_POOL, {"agent": "atk-waits-restart"}
            )
            async with get_client() as client:
                return await client.create_flow_run_from_deployment(
                    deployment, parameters={"marker": str(marker), "rows": 5}
                )

        run = asyncio.run(setup())
        env = {**approver_keys_env(), **RECHECK}
        worker = gov.start_worker(RESTART_POOL, log=tmp_path / "worker-0.log", extra_env=env)
        asyncio.run(_wait(run.id, _awaiting, what="AwaitingApproval"))
        first = time.monotonic()
        # The worker restarts every 5 s or so (between rechecks) for longer than the
        # timeout: a worker that remembers the wait refuses the run by then; one that
        # forgets it at each restart keeps it waiting (checked right after the last one,
        # whose own wait is younger than the timeout).
        i = 0
        while time.monotonic() < first + RESTART_TIMEOUT + 12:
            i += 1
            time.sleep(3)
            ready = asyncio.run(
                _wait(run.id, lambda r: _final(r) or _between_rechecks(r), what="a wait")
            )
            if _final(ready):
                break
            gov.stop_worker(worker)
            worker = gov.start_worker(RESTART_POOL, log=tmp_path / f"worker-{i}.log", extra_env=env)
        state = asyncio.run(_state(run.id))
        assert not marker.exists()
        since = [
            (d.verdict, d.payload["envelope"]["approval_requested_at"])
            for d in _decisions(gov.store, run.id)
        ]
        assert state.name == "Refused" and "approval timed out" in state.message, (state, since)


def _between_rechecks(run: Any) -> bool:
    """Waiting, and not due for another second (the worker is not deciding it now)."""
    if not _awaiting(run):
        return False
    due = run.state.state_details.scheduled_time
    return due is not None and (due - datetime.now(timezone.utc)).total_seconds() > 1
