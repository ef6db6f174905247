"""Approvals the requester cannot forge, against a real Prefect server and the governed worker.

Every case is an agent that needs alice's approval (``constraints.approval.approvers:
[alice]``). The worker pins alice's and bob's keys (PREFECT_GOVERNANCE_APPROVER_KEYS);
the requester, mallory, can do what any API client can: create runs with any labels and
parameters, write any Prefect variable (including copies of alice's real approvals, edited
or not), update a run's parameters, and sign with a key of her own. None of that executes
the flow: its marker file stays absent, the run waits for an approval (AwaitingApproval)
until its timeout (15 s here), then ends Cancelled/"Refused" with a message that says why
(approval timed out, and why each statement found approves nothing), and the lineage holds
the awaiting decision(s) and the refused one. Alice's own approvals, made
with ``prefect-governance approve`` before the run is decided, do execute it.

Each case has its own agent and deployment, so one case's refusals do not move another
case's trust.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from prefect import get_client
from prefect.client.schemas.actions import VariableCreate
from prefect.states import Scheduled

from prefect_governance.cli.local import prefect_env
from prefect_governance.core.approvals import (
    DeploymentBinding,
    FlowRunBinding,
    binding_key,
    new_statement,
    parameters_sha256,
    sign_statement,
    store_approval,
)
from prefect_governance.core.signing import SigningKey
from prefect_governance.testing import Harness, create_pool, deploy_example, wait_final
from prefect_governance.worker.blocks import GovernanceAgent
from tests.agents import harness
from tests.approvers import ALICE, BOB, MALLORY_AS_ALICE, approver_keys_env

pytestmark = pytest.mark.e2e

POOL = "approvals"
CLI = [sys.executable, "-m", "prefect_governance.cli"]
TIMEOUT = 15  # seconds each run may wait for alice's approval
NEEDS = "approval timed out"
RECHECK = {"PREFECT_GOVERNANCE_APPROVAL_RECHECK_SECONDS": "2"}

# case -> what the refusal must say besides NEEDS (what the policy found, and why each
# statement was rejected)
REFUSED = {
    "label": ["; no verified approval)"],
    "parameter": ["; no verified approval)"],
    "own key as alice": [
        "; no verified approval)",
        "the signature does not verify with key 'alice'",
    ],
    "pinned non-approver": ['; verified approvals only by ["bob"], who are not approvers)'],
    "another flow run": ["; no verified approval)", "bound to another flow run"],
    "other parameters": ["; no verified approval)", "bound to other parameters"],
    "expired": ["; no verified approval)", "expired at"],
    "altered": [
        "; no verified approval)",
        "the signature does not verify with key 'alice'",
    ],
    "parameters changed after approval": [
        "; no verified approval)",
        "bound to other parameters",
    ],
}
ALLOWED = ["deployment approval", "flow-run approval"]


def _slug(case: str) -> str:
    return case.replace(" ", "-")


def _approve_cli(server, key_file: Path, *args: str) -> dict[str, Any]:
    """``prefect-governance approve ... --key FILE --approver alice``, as alice would."""
    result = subprocess.run(
        [*CLI, "approve", "--key", str(key_file), "--approver", "alice", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=prefect_env(server.home, server.api_url),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


async def _store_as(client, name: str, document: dict[str, Any]) -> None:
    """Mallory writes a variable of her choosing (any API client may)."""
    await client.create_variable(VariableCreate(name=name, value=document))


def _statement(binding, *, approver="alice", issued=None, ttl=timedelta(hours=1)):
    return new_statement(
        approver=approver,
        binding=binding,
        now=issued or datetime.now(timezone.utc),
        ttl=ttl,
        reason="test",
    )


async def _setup(gov: Harness) -> dict[str, Any]:
    """Agents, deployments and runs of every case, with what the requester (and alice) did;
    no worker polls the pool yet, so every run is still Scheduled."""
    tmp, server = gov.workdir, gov.server
    await create_pool(POOL, lineage_store=await gov.save_lineage(), overwrite=True)
    key_file = tmp / "alice.key"
    key_file.write_text(ALICE.seed_b64 + "\n")
    runs: dict[str, Any] = {}
    async with get_client() as client:
        for case in [*REFUSED, *ALLOWED]:
            slug = _slug(case)
            await gov.save_agent(
                GovernanceAgent(
                    id=f"approved-{slug}",
                    owner="sec@example.com",
                    trust_scope=[POOL],
                    capabilities=["read:warehouse"],
                    constraints={"approval": {"approvers": ["alice"], "timeout_seconds": TIMEOUT}},
                ),
                f"approved-{slug}",
            )
            deployment_id = await deploy_example(
                f"approvals-{slug}", POOL, {"agent": f"approved-{slug}"}
            )
            marker = tmp / f"marker-{slug}"
            parameters: dict[str, Any] = {"marker": str(marker), "rows": 5}
            dep_binding = DeploymentBinding(
                deployment_id=str(deployment_id), parameters_sha256=parameters_sha256(parameters)
            )
            create: dict[str, Any] = {"parameters": parameters}
            if case == "label":
                create["labels"] = {"governance.approved_by": "alice"}
            elif case == "parameter":
                create["parameters"] = {**parameters, "approved_by": "alice"}
            elif case == "own key as alice":  # mallory's key, alice's name: stored normally
                await store_approval(
                    client, sign_statement(_statement(dep_binding), MALLORY_AS_ALICE)
                )
            elif case == "pinned non-approver":  # bob's key is pinned; bob is no approver
                await store_approval(
                    client, sign_statement(_statement(dep_binding, approver="bob"), BOB)
                )
            elif case == "other parameters":  # alice approved rows=5; mallory runs rows=500
                await store_approval(client, sign_statement(_statement(dep_binding), ALICE))
                create["parameters"] = {**parameters, "rows": 500}
            elif case == "deployment approval":
                approved = _approve_cli(
                    server,
                    key_file,
                    "--deployment",
                    f"load-warehouse/approvals-{slug}",
                    "--parameters",
                    json.dumps(parameters),
                    "--reason",
                    "change 42",
                )
            if case == "flow-run approval":  # a run scheduled for later, approved meanwhile
                create["state"] = Scheduled(
                    scheduled_time=datetime.now(timezone.utc) + timedelta(seconds=20)
                )
            run = await client.create_flow_run_from_deployment(deployment_id, **create)
            run_binding = FlowRunBinding(
                flow_run_id=str(run.id),
                parameters_sha256=parameters_sha256(run.parameters),
            )
            if case == "other parameters":  # ... and copies alice's approval to her hash
                document = sign_statement(_statement(dep_binding), ALICE)
                mine = DeploymentBinding(
                    deployment_id=str(deployment_id),
                    parameters_sha256=parameters_sha256(run.parameters),
                )
                await _store_as(
                    client,
                    f"governance-approval-{binding_key(mine)}-{document['payload']['id']}",
                    document,
                )
            elif case == "another flow run":  # alice approved another run; mallory copies it
                other = FlowRunBinding(
                    flow_run_id=str(uuid.uuid4()), parameters_sha256=run_binding.parameters_sha256
                )
                document = sign_statement(_statement(other), ALICE)
                await _store_as(
                    client,
                    f"governance-approval-{binding_key(run_binding)}-{document['payload']['id']}",
                    document,
                )
            elif case == "altered":  # ... and edits its binding to name her run
                other = FlowRunBinding(
                    flow_run_id=str(uuid.uuid4()), parameters_sha256=run_binding.parameters_sha256
                )
                document = sign_statement(_statement(other), ALICE)
                document["payload"]["binding"]["flow_run_id"] = str(run.id)
                await _store_as(
                    client,
                    f"governance-approval-{binding_key(run_binding)}-{document['payload']['id']}",
                    document,
                )
            elif case == "expired":
                issued = datetime.now(timezone.utc) - timedelta(hours=2)
                await store_approval(
                    client, sign_statement(_statement(run_binding, issued=issued), ALICE)
                )
            elif case in ("flow-run approval", "parameters changed after approval"):
                approved = _approve_cli(server, key_file, "--flow-run", str(run.id))
                if case == "parameters changed after approval":  # alice saw rows=5
                    await client.update_flow_run(run.id, parameters={**parameters, "rows": 500})
            runs[case] = {
                "id": run.id,
                "marker": marker,
                "approval": approved if case in ALLOWED else None,
            }
    return runs


@pytest.fixture(scope="module")
def decided(prefect_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("approvals")
    with harness(prefect_server, tmp, lineage_block="approvals-lineage") as gov:
        runs = asyncio.run(_setup(gov))
        gov.start_worker(POOL, log=tmp / "worker.log", extra_env={**approver_keys_env(), **RECHECK})
        try:
            finals = asyncio.run(wait_final([r["id"] for r in runs.values()], timeout=240))
        finally:
            gov.stop_workers()
        store = gov.store
        decisions: dict[str, list[Any]] = {}  # each run's decisions, oldest first
        for e in reversed(store.recent(1000)):
            if e.kind == "decision" and e.flow_run_id:
                decisions.setdefault(e.flow_run_id, []).append(e)
        yield {
            case: {
                **run,
                "final": finals[run["id"]],
                "decisions": decisions.get(str(run["id"]), []),
                "decision": (decisions.get(str(run["id"])) or [None])[-1],
            }
            for case, run in runs.items()
        }
        assert store.verify() == []


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_forged_or_misbound_approval_does_not_execute_the_run(decided, case):
    run = decided[case]
    state = run["final"].state
    assert not run["marker"].exists(), f"the run executed ({case})"
    assert state.is_cancelled() and state.name == "Refused", state
    for why in [NEEDS, *REFUSED[case]]:
        assert why in state.message, state.message
    verdicts = [d.verdict for d in run["decisions"]]
    assert verdicts[0] == "awaiting_approval" and verdicts[-1] == "refused", verdicts
    assert set(verdicts[1:-1]) <= {"awaiting_approval"}, verdicts
    decision = run["decision"]
    assert decision.verdict == "refused" and not decision.allow
    waited = decision.created_at - run["decisions"][0].created_at
    assert waited >= timedelta(seconds=TIMEOUT), waited
    assert any(NEEDS in r and REFUSED[case][0] in r for r in decision.reasons), decision.reasons
    for why in REFUSED[case][1:]:
        assert any(why in r for r in decision.payload["rejected_approvals"]), decision.payload
    approvals = decision.payload["envelope"]["approvals"]
    if case == "pinned non-approver":  # bob's approval verifies; it is just not alice's
        assert [a["approver"] for a in approvals] == ["bob"]
    else:
        assert approvals == [], approvals


@pytest.mark.parametrize("case", ALLOWED)
def test_alices_approval_made_before_the_decision_executes_the_run(decided, case):
    run = decided[case]
    state = run["final"].state
    assert state.is_completed(), state
    assert run["marker"].read_text().count("loaded") == 1
    assert [d.verdict for d in run["decisions"]] == ["allowed"]  # it never waited
    decision = run["decision"]
    assert decision.verdict == "allowed" and decision.allow
    approval = run["approval"]
    recorded = decision.payload["envelope"]["approvals"]
    binding = "deployment" if case == "deployment approval" else "flow_run"
    assert recorded == [
        {
            "id": approval["id"],
            "approver": "alice",
            "binding": binding,
            "issued_at": recorded[0]["issued_at"],
            "expires_at": recorded[0]["expires_at"],
            "decision": "approve",
        }
    ]
    assert datetime.fromisoformat(recorded[0]["expires_at"]) == datetime.fromisoformat(
        approval["expires_at"]
    )
    assert approval["variable"].startswith("governance-approval-")
    assert decision.payload["rejected_approvals"] == []


def test_the_requester_can_write_approval_variables_but_not_alices_key(prefect_server):
    """The premise of the cases above, on the real server: any API client can create a
    variable under an approval's name; only the key makes it count."""
    name = f"governance-approval-run-{uuid.uuid4()}-{uuid.uuid4().hex}"

    async def write_and_read():
        async with get_client() as client:
            forged = sign_statement(
                _statement(
                    FlowRunBinding(
                        flow_run_id=str(uuid.uuid4()), parameters_sha256=parameters_sha256({})
                    )
                ),
                SigningKey.generate("alice"),
            )
            await _store_as(client, name, forged)
            return await client.read_variable_by_name(name)

    assert asyncio.run(write_and_read()).value["kid"] == "alice"
