"""Who a run acts as is the pool owner's to say: attacks by a deployment author or an API client.

Against a real Prefect server and the real governed worker (pinning the tests' pool-owner
key, as tests/conftest.py sets it): every attack below is a run that must not execute. Each
test proves it did not (the flow's marker file stays absent), that the run ended
Cancelled/"Refused" with a message that says why, and that the lineage holds the refused
decision. The positive control is a correctly signed, bound agent whose allowed run executes
through the same worker, so the refusals are not the worker refusing everything.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect import get_client
from prefect.states import Scheduled

from examples.flows import load_warehouse
from prefect_governance.core.attestation import signed
from prefect_governance.core.keys import GovernanceVerifyKey
from prefect_governance.core.signing import SigningKey
from prefect_governance.testing import Harness, create_pool, deploy_example, wait_final
from prefect_governance.worker.blocks import GovernanceAgent
from tests.agents import TEST_AGENT_KEY, harness

pytestmark = pytest.mark.e2e

POOL = "identity"
FLOW = "load-warehouse"
ROGUE = SigningKey.generate(TEST_AGENT_KEY.key_id)  # the pinned key id, another key
STRANGER = SigningKey.generate("some-other-owner")  # a key id the worker does not pin


def _agent(agent_id: str, **fields: Any) -> GovernanceAgent:
    return GovernanceAgent(
        **{
            "id": agent_id,
            "owner": "data@example.com",
            "trust_scope": [POOL],
            "capabilities": ["read:warehouse"],
            **fields,
        }
    )


@dataclass
class Attack:
    """One deployment (or ad-hoc run) of the example flow and what it asks for."""

    name: str
    job_variables: dict[str, Any]
    why: str  # what the refusal's message must say
    ad_hoc: bool = False


ATTACKS = [
    # A shipped agent in audit mode, named by a deployment whose run breaks the capability
    # rule: the agent's mode no longer relaxes the pool's.
    Attack(
        "audit-agent",
        {"agent": "id-shadow", "capabilities": ["write:warehouse"]},
        'capability "write:warehouse" is not granted to agent "id-shadow"',
    ),
    # An agent block the deployment author saved themselves, in audit mode, granting all.
    Attack(
        "self-made-agent",
        {"agent": "id-self-made", "capabilities": ["delete:warehouse"]},
        "agent block 'id-self-made' is not signed by the pool owner",
    ),
    # A signed agent an API client then widened (a capability added, no new signature).
    Attack(
        "altered-agent",
        {"agent": "id-altered", "capabilities": ["delete:warehouse"]},
        "agent block 'id-altered' does not carry the pool owner's signature",
    ),
    # The attestation of a signed agent copied onto another block name.
    Attack(
        "copied-attestation",
        {"agent": "id-copied", "capabilities": ["read:warehouse"]},
        "agent block 'id-copied' does not carry the pool owner's signature",
    ),
    # Signed by a rogue key under the pinned key id (and that key published in a
    # verify-key block under the same id: the worker must not read keys from blocks).
    Attack(
        "rogue-key",
        {"agent": "id-rogue", "capabilities": ["delete:warehouse"]},
        f"the signature does not verify with key '{TEST_AGENT_KEY.key_id}'",
    ),
    # Signed by a key under an id the worker does not pin.
    Attack(
        "unknown-key-id",
        {"agent": "id-stranger", "capabilities": ["read:warehouse"]},
        "signed with an unknown key 'some-other-owner'",
    ),
    # A correctly signed agent that binds other deployments, not this one.
    Attack(
        "unbound-deployment",
        {"agent": "id-etl", "capabilities": ["read:warehouse"]},
        f"deployment {FLOW}/id-unbound-deployment may not act as agent block 'id-etl'",
    ),
    # The deployment's own `mode: audit` job variable, for a run the policy refuses.
    Attack(
        "audit-job-variable",
        {"agent": "id-etl", "capabilities": ["delete:warehouse"], "mode": "audit"},
        'capability "delete:warehouse" is not granted to agent "id-etl"',
    ),
    # An ad-hoc run (no deployment) naming an agent bound to every deployment.
    Attack(
        "ad-hoc-run",
        {"agent": "id-any-deployment", "capabilities": ["read:warehouse"]},
        "an ad-hoc run may not act as agent block 'id-any-deployment'",
        ad_hoc=True,
    ),
]
ALLOWED = "allowed"  # the positive control: id-etl, bound, within its capabilities
# A rollback: the pool owner's version 2 runs; then an API client saves the signed
# version 1 (which granted delete:warehouse) over it again, and a run asks for delete.
ROLLBACK = Attack(
    "rollback",
    {"agent": "id-rollback", "capabilities": ["delete:warehouse"]},
    "agent block 'id-rollback' is version 1, older than version 2",
)
BEFORE_ROLLBACK = Attack("before-rollback", {"agent": "id-rollback"}, "")
ROLLBACK_V1 = _agent("id-rollback", version=1, capabilities=["read:warehouse", "delete:warehouse"])
ROLLBACK_V2 = _agent("id-rollback", version=2)


async def _agents(gov: Harness) -> None:
    """The pool owner's agents, and what an attacker did to them or beside them."""
    bound = [f"{FLOW}/id-{ALLOWED}", f"{FLOW}/id-audit-job-variable"]
    await gov.save_agent(_agent("id-etl", deployments=bound), "id-etl")
    await gov.save_agent(_agent("id-shadow", mode="audit"), "id-shadow")
    await gov.save_agent(_agent("id-any-deployment", deployments=["*"]), "id-any-deployment")
    # the deployment author's own block: unsigned, audit mode, every capability
    await _agent(
        "id-self-made",
        mode="audit",
        capabilities=["read:warehouse", "write:warehouse", "delete:warehouse"],
        deployments=["*"],
    ).asave("id-self-made", overwrite=True)
    # signed, then widened by an API client through the blocks API
    await gov.save_agent(_agent("id-altered"), "id-altered")
    altered = await GovernanceAgent.aload("id-altered")
    altered.capabilities = [*altered.capabilities, "delete:warehouse"]
    await altered.asave("id-altered", overwrite=True)
    # a signed agent's fields and attestation, saved unchanged under another block name
    origin = await gov.save_agent(_agent("id-origin", deployments=["*"]), "id-origin")
    await origin.asave("id-copied", overwrite=True)
    # a rogue key under the pinned id, also published as a verify-key block of that id
    rogue = signed(
        "id-rogue", _agent("id-rogue", capabilities=["delete:warehouse"], deployments=["*"]), ROGUE
    )
    await rogue.asave("id-rogue", overwrite=True)
    await GovernanceVerifyKey(public_key=ROGUE.public_b64).asave(
        TEST_AGENT_KEY.key_id, overwrite=True
    )
    stranger = signed("id-stranger", _agent("id-stranger", deployments=["*"]), STRANGER)
    await stranger.asave("id-stranger", overwrite=True)
    # the owner signed version 1 once (the attacker kept a copy), and applies version 2 now
    await gov.save_agent(ROLLBACK_V2, "id-rollback")


async def _setup(gov: Harness) -> dict[str, tuple[UUID, Path]]:
    await gov.save_lineage()
    await _agents(gov)
    await create_pool(POOL, lineage_store=gov.lineage_block)
    plan = [*ATTACKS, Attack(ALLOWED, {"agent": "id-etl"}, ""), BEFORE_ROLLBACK]
    return await _start(gov.workdir, plan)


async def _roll_back(gov: Harness) -> dict[str, tuple[UUID, Path]]:
    """After version 2 ran: the signed version 1 saved over it, and a run that needs it."""
    await gov.save_agent(ROLLBACK_V1, "id-rollback")
    return await _start(gov.workdir, [ROLLBACK])


async def _start(tmp: Path, plan: list[Attack]) -> dict[str, tuple[UUID, Path]]:
    runs: dict[str, tuple[UUID, Path]] = {}
    async with get_client() as client:
        for attack in plan:
            marker = tmp / "markers" / attack.name
            parameters = {"rows": 10, "marker": str(marker)}
            if attack.ad_hoc:
                run = await client.create_flow_run(
                    load_warehouse,
                    parameters=parameters,
                    state=Scheduled(),
                    work_pool_name=POOL,
                    job_variables=attack.job_variables,
                )
            else:
                deployment_id = await deploy_example(
                    f"id-{attack.name}", POOL, attack.job_variables
                )
                run = await client.create_flow_run_from_deployment(
                    deployment_id, parameters=parameters
                )
            runs[attack.name] = (run.id, marker)
    return runs


@dataclass
class Observed:
    flow_run: Any
    executed: bool
    events: list[Any]

    def decision(self) -> Any:
        [decision] = [e for e in self.events if e.kind == "decision"]
        return decision


@pytest.fixture(scope="module")
def attacked(prefect_server, tmp_path_factory):
    """Every attack and the control, through one governed worker, observed once."""
    tmp = tmp_path_factory.mktemp("identity")
    (tmp / "markers").mkdir()
    with harness(prefect_server, tmp, lineage_block="identity-lineage") as gov:
        runs = asyncio.run(_setup(gov))
        gov.start_worker(POOL, log=tmp / "worker.log")
        final = asyncio.run(wait_final([run_id for run_id, _ in runs.values()], timeout=180))
        later = asyncio.run(_roll_back(gov))
        final.update(asyncio.run(wait_final([run_id for run_id, _ in later.values()], 120)))
        runs.update(later)
        gov.stop_workers()
        store = gov.store
        return {
            name: Observed(
                final[run_id], marker.exists(), list(store.recent(50, flow_run_id=str(run_id)))
            )
            for name, (run_id, marker) in runs.items()
        }


def _assert_refused(observed: Observed, why: str) -> None:
    assert not observed.executed, "the run executed"
    state = observed.flow_run.state
    assert state.is_cancelled() and state.name == "Refused", state
    assert why in state.message, state.message
    decision = observed.decision()
    assert decision.verdict == "refused" and decision.allow is False
    assert any(why in reason for reason in decision.reasons), decision.reasons
    assert decision.mode == "enforce"


def test_a_signed_bound_agent_runs(attacked):
    """The positive control: the same worker runs what the pool owner's agent allows."""
    observed = attacked[ALLOWED]
    assert observed.executed
    assert observed.flow_run.state.is_completed(), observed.flow_run.state
    assert observed.decision().verdict == "allowed"
    assert observed.decision().agent_id == "id-etl"


def test_an_audit_mode_agent_does_not_relax_an_enforcing_pool(attacked):
    _assert_refused(attacked["audit-agent"], ATTACKS[0].why)
    assert attacked["audit-agent"].decision().agent_id == "id-shadow"


@pytest.mark.parametrize(
    "attack", [a for a in ATTACKS if a.name != "audit-agent"] + [ROLLBACK], ids=lambda a: a.name
)
def test_the_attack_is_refused_and_nothing_runs(attacked, attack):
    _assert_refused(attacked[attack.name], attack.why)


def test_the_current_version_ran_before_the_rollback(attacked):
    """The rollback's control: version 2 of the same agent, the same worker, executed."""
    observed = attacked[BEFORE_ROLLBACK.name]
    assert observed.executed and observed.flow_run.state.is_completed()
    assert observed.decision().payload["agent_version"] == 2


def test_a_refusal_for_an_unverified_agent_charges_no_agent(attacked):
    """An agent the pool owner did not sign (or that does not bind the run) is not the
    agent's doing: the refusal is in the lineage without an agent, costing nobody trust."""
    for name in ("self-made-agent", "altered-agent", "copied-attestation", "rogue-key"):
        events = attacked[name].events
        assert attacked[name].decision().agent_id is None, name
        assert not [e for e in events if e.kind == "trust"], name
    assert attacked["unbound-deployment"].decision().agent_id is None


def test_the_deployments_mode_is_ignored_and_said_so(attacked):
    decision = attacked["audit-job-variable"].decision()
    assert any("job variable mode='audit'" in w for w in decision.warnings), decision.warnings
