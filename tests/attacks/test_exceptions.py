"""Exceptions that waive a deny until they expire, and every way to forge one, against a
real Prefect server and the real governed worker.

Every case is an agent whose parameter rule refuses the run (``rows`` at most 10; each
run asks for 500). The worker pins the security team's exception key
(PREFECT_GOVERNANCE_EXCEPTION_KEYS) and the test pool owner's agent key. An exception
signed by the security team (applied with ``prefect-governance apply --exception-key``)
and scoped to the case's agent waives the deny: the run executes (its marker file is
written) and the decision names the exception. With ``context.time`` past its expiry
(the exception signed to expire a minute after the first run, the second run decided
after that), the same run is refused and a warning names the expired exception.

What an attacker can do, as any API client: save governance-exception blocks (forged,
signed with her own key under the security team's key id, signed with the pool owner's
agent key, edited after signing to extend the expiry, naming the aggregator's own deny),
and, as a deployment author, put an "exception" in job variables and parameters. None of
that executes the flow: its marker stays absent, the run ends Cancelled/"Refused", and
the decision says why each exception waived nothing.

Each case has its own agent and deployment (exceptions are scoped to one of them), so one
case's exception or refusals do not touch another case.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from prefect_governance.cli.local import prefect_env
from prefect_governance.testing import Harness, create_pool, deploy_example, wait_final
from prefect_governance.worker.blocks import GovernanceAgent, GovernanceException
from tests.agents import TEST_AGENT_KEY, harness
from tests.exception_keys import (
    MALLORY_AS_SECURITY,
    SECURITY,
    exception,
    exception_keys_env,
    signed,
)

pytestmark = pytest.mark.e2e

POOL = "exceptions"
CLI = [sys.executable, "-m", "prefect_governance.cli"]
DENY = 'parameter "rows" is 500, above the maximum 10'
RULE = "prefect.governance.rules.parameters.deny"
# The expiring exception's life: signed as the worker starts, the first run is decided
# within it, the second after it.
EXPIRY_SECONDS = 90

# case -> what the decision's rejected exceptions must say (None: nothing: out of scope)
REFUSED: dict[str, str | None] = {
    "forged signature": "the signature does not verify with key 'security'",
    "signed by the agent key": "signed with an unknown key 'test-pool-owner'",
    "edited after signing": "the signature does not verify with key 'security'",
    "names the aggregator deny": "can never be waived",
    "another pool": None,
    "another agent": None,
    "another deployment": None,
    "in job variables and parameters": None,
    "exception keys in the job environment": None,
}


def _slug(case: str) -> str:
    return case.replace(" ", "-")


def _apply_cli(server, tmp: Path, name: str, document: str) -> subprocess.CompletedProcess:
    """``prefect-governance apply DIR --exception-key FILE``, as the security team would."""
    key_file = tmp / "security.key"
    key_file.write_text(SECURITY.seed_b64 + "\n")
    directory = tmp / f"exception-{name}"
    directory.mkdir()
    (directory / f"{name}.yaml").write_text(document)
    return subprocess.run(
        [*CLI, "apply", str(directory), "--exception-key", str(key_file)],
        capture_output=True,
        text=True,
        timeout=120,
        env=prefect_env(server.home, server.api_url),
    )


def _document(name: str, agent: str, expires_at: datetime) -> str:
    return f"""\
kind: exception
name: {name}
spec:
  rules: [{RULE}]
  message: 'parameter "rows" is .*'
  agents: [{agent}]
  owner: security@example.com
  reason: a one-off backfill of 500 rows
  ticket: SEC-42
  expires_at: "{expires_at.isoformat()}"
"""


async def _setup(gov: Harness) -> dict[str, Any]:
    """Agents, deployments, exceptions and the first run of every case; no worker polls the
    pool yet, so every run is still Scheduled."""
    tmp, server = gov.workdir, gov.server
    await create_pool(POOL, lineage_store=await gov.save_lineage(), overwrite=True)
    cases: dict[str, Any] = {}
    now = datetime.now(timezone.utc)
    for case in ["waived", "expiring", *REFUSED]:
        slug = _slug(case)
        agent_id = f"exc-{slug}"
        await gov.save_agent(
            GovernanceAgent(
                id=agent_id,
                owner="data@example.com",
                trust_scope=[POOL],
                capabilities=["read:warehouse"],
                constraints={"parameters": {"rows": {"type": "integer", "maximum": 10}}},
            ),
            agent_id,
        )
        variables: dict[str, Any] = {"agent": agent_id}
        parameters: dict[str, Any] = {"rows": 500}
        name = f"exc-{slug}"
        if case == "waived":
            expires = now + timedelta(hours=1)
            applied = _apply_cli(server, tmp, name, _document(name, agent_id, expires))
            assert applied.returncode == 0, applied.stderr[-3000:]
            assert f"created    exception      {name}" in applied.stdout, applied.stdout
            cases[case] = {"expires_at": expires}
        elif case == "forged signature":
            await signed(name, exception(agents=[agent_id]), MALLORY_AS_SECURITY).asave(name)
        elif case == "signed by the agent key":
            await signed(name, exception(agents=[agent_id]), TEST_AGENT_KEY).asave(name)
        elif case == "edited after signing":  # signed to expire in the past, then extended
            issued = now - timedelta(days=2)
            block = signed(
                name, exception(agents=[agent_id], expires_at=now - timedelta(days=1)), now=issued
            )
            block.expires_at = now + timedelta(days=30)
            await block.asave(name)
        elif case == "names the aggregator deny":  # what apply refuses to sign, signed anyway
            block = exception(agents=[agent_id])
            stamped = GovernanceException.model_construct(
                **{**dict(block), "rules": ["prefect.governance.decision.deny", RULE]}
            )
            from prefect_governance.core.exceptions import exception_payload
            from prefect_governance.core.signing import sign

            stamped.issued_at = now
            document = sign(exception_payload(name, stamped), SECURITY)
            stamped.attestation = {k: v for k, v in document.items() if k != "payload"}
            await stamped.asave(name)
        elif case == "another pool":
            await signed(name, exception(agents=[agent_id], pools=["elsewhere"])).asave(name)
        elif case == "another agent":
            scope = {"agents": ["exc-nobody"], "deployments": [f"load-warehouse/exc-{slug}"]}
            await signed(name, exception(**scope)).asave(name)
        elif case == "another deployment":
            scope = {"agents": [agent_id], "deployments": ["load-warehouse/exc-waived"]}
            await signed(name, exception(**scope)).asave(name)
        elif case == "in job variables and parameters":
            forged = {
                "name": name,
                "rules": [RULE],
                "agents": [agent_id],
                "owner": "mallory",
                "reason": "x",
                "ticket": "x",
                "issued_at": now.isoformat(),
                "expires_at": (now + timedelta(days=1)).isoformat(),
            }
            variables["exceptions"] = [forged]
            parameters = {"rows": 500, "exceptions": [forged], "exception": forged}
        elif case == "exception keys in the job environment":  # her own key, pinned by her
            await signed(name, exception(agents=[agent_id]), MALLORY_AS_SECURITY).asave(name)
            pinned = {MALLORY_AS_SECURITY.key_id: MALLORY_AS_SECURITY.public_b64}
            variables["env"] = {"PREFECT_GOVERNANCE_EXCEPTION_KEYS": json.dumps(pinned)}
        deployment_id = await deploy_example(f"exc-{slug}", POOL, variables)
        marker = tmp / f"marker-{slug}"
        if case == "expiring":  # its exception is applied (and its run created) last
            cases[case] = {"marker": marker, "deployment": deployment_id, "name": name}
            cases[case]["agent"] = agent_id
            continue
        async with get_client() as client:
            run = await client.create_flow_run_from_deployment(
                deployment_id,
                parameters={**parameters, "marker": str(marker)},
                labels={"governance.exceptions": name, "exceptions": name},
            )
        cases.setdefault(case, {}).update(
            {"id": run.id, "marker": marker, "deployment": deployment_id, "name": name}
        )
    expiring = cases["expiring"]
    expires = datetime.now(timezone.utc) + timedelta(seconds=EXPIRY_SECONDS)
    document = _document(expiring["name"], expiring["agent"], expires)
    applied = _apply_cli(server, tmp, expiring["name"], document)
    assert applied.returncode == 0, applied.stderr[-3000:]
    expiring["expires_at"] = expires
    async with get_client() as client:
        run = await client.create_flow_run_from_deployment(
            expiring["deployment"], parameters={"rows": 500, "marker": str(expiring["marker"])}
        )
    expiring["id"] = run.id
    return cases


async def _observed(gov: Harness, case: dict[str, Any], run_id) -> dict[str, Any]:
    async with get_client() as client:
        run = await client.read_flow_run(run_id)
        artifacts = await client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        )
    decisions = [e for e in gov.store.recent(50, flow_run_id=str(run_id)) if e.kind == "decision"]
    return {
        "run": run,
        "decision": decisions[0] if decisions else None,
        "artifact": next((a.data for a in artifacts if a.key == "governance-decision"), ""),
    }


@pytest.fixture(scope="module")
def decided(prefect_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exceptions")
    with harness(prefect_server, tmp, lineage_block="exceptions-lineage") as gov:
        cases = asyncio.run(_setup(gov))
        gov.start_worker(POOL, log=tmp / "worker.log", extra_env=exception_keys_env())
        try:
            asyncio.run(wait_final([c["id"] for c in cases.values()], timeout=240))
            for case in cases.values():
                case["first"] = asyncio.run(_observed(gov, case, case["id"]))
            # The same run of the expiring case again, once its exception has expired.
            expiring = cases["expiring"]
            wait = (expiring["expires_at"] - datetime.now(timezone.utc)).total_seconds() + 1
            time.sleep(max(0.0, wait))

            async def again():
                async with get_client() as client:
                    run = await client.create_flow_run_from_deployment(
                        expiring["deployment"],
                        parameters={"rows": 500, "marker": str(expiring["marker"]) + "-again"},
                    )
                await wait_final([run.id], timeout=120)
                return await _observed(gov, expiring, run.id)

            expiring["again"] = asyncio.run(again())
        finally:
            gov.stop_workers()
        yield cases
        assert gov.store.verify() == []


def _waived_as_applied(observed: dict[str, Any], name: str) -> None:
    """The run executed, and its decision, labels and artifact name the exception."""
    run, decision = observed["run"], observed["decision"]
    assert run.state.is_completed(), run.state
    assert decision.verdict == "allowed" and decision.allow
    assert list(decision.reasons) == [], decision.reasons
    assert decision.payload["waived"] == [{"exception": name, "rule": RULE, "message": DENY}]
    assert [e["name"] for e in decision.payload["exceptions"]] == [name]
    assert decision.payload["exceptions"][0]["ticket"] == "SEC-42"
    assert decision.payload["rejected_exceptions"] == []
    assert run.labels["governance.waived"] == "1"
    assert run.labels["governance.exceptions"] == name
    assert "Waived by exception" in observed["artifact"] and name in observed["artifact"]


def test_an_exception_waives_the_deny_and_the_decision_names_it(decided):
    case = decided["waived"]
    assert case["marker"].read_text().count("loaded 500 rows") == 1
    _waived_as_applied(case["first"], case["name"])


def test_an_exception_waives_until_it_expires_then_the_same_run_is_refused(decided):
    case = decided["expiring"]
    first, again = case["first"], case["again"]
    # Before the expiry: waived, executed.
    assert case["marker"].read_text().count("loaded 500 rows") == 1
    _waived_as_applied(first, case["name"])
    decided_at = datetime.fromisoformat(first["decision"].payload["envelope"]["issued_at"])
    assert decided_at < case["expires_at"]
    # After it: the same deployment, the same parameters, refused; nothing ran.
    run, decision = again["run"], again["decision"]
    assert not Path(str(case["marker"]) + "-again").exists(), "the run executed"
    assert run.state.is_cancelled() and run.state.name == "Refused", run.state
    assert DENY in run.state.message
    assert decision.verdict == "refused" and DENY in decision.reasons
    again_at = datetime.fromisoformat(decision.payload["envelope"]["issued_at"])
    assert again_at >= case["expires_at"], "the second run was decided before the expiry"
    assert decision.payload["waived"] == []
    expired = [w for w in decision.warnings if f'exception "{case["name"]}" expired at' in w]
    assert expired and RULE in expired[0] and "SEC-42" in expired[0], decision.warnings
    assert [e["name"] for e in decision.payload["exceptions"]] == [case["name"]]
    assert run.labels["governance.warnings"] == "1"
    assert "governance.waived" not in run.labels


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_forged_misscoped_or_requested_exception_waives_nothing(decided, case):
    observed = decided[case]["first"]
    run, decision = observed["run"], observed["decision"]
    assert not decided[case]["marker"].exists(), f"the run executed ({case})"
    assert run.state.is_cancelled() and run.state.name == "Refused", run.state
    assert decision is not None, "the lineage holds no decision for the refused run"
    assert decision.verdict == "refused"
    if case == "exception keys in the job environment":  # refused before any policy is asked
        assert "PREFECT_GOVERNANCE_EXCEPTION_KEYS" in run.state.message, run.state.message
        assert decision.payload["envelope"] is None
        return
    assert DENY in run.state.message and DENY in decision.reasons
    assert decision.payload["waived"] == [] and decision.payload["exceptions"] == []
    rejected = decision.payload["rejected_exceptions"]
    why = REFUSED[case]
    if why is None:
        assert rejected == [], rejected
    else:
        assert len(rejected) == 1 and why in rejected[0], rejected
        assert f"exception {decided[case]['name']!r}" in rejected[0]
        assert why in run.state.message, "the refusal says why the exception waived nothing"
