"""No way around the gate: a governed pool's runs cannot execute ungoverned.

The governed pool's template starts every run through ``prefect_governance.gate``.
Against a real Prefect server: Prefect's stock process worker on a governed
pool executes nothing; a refused run forced back to Running does not execute;
forged, expired, replayed and other runs' grants do not execute; a key put in
the environment or the verify-key block does not stand in for the trusted one.
Every run that must not execute is proven not to have run: the flow's marker
file stays absent.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from prefect import flow, get_client
from prefect.states import Cancelled, Running

from prefect_governance.cli.automations import (
    REFUSED_AGAIN,
    REFUSED_STAYS_REFUSED,
    _definition,
    apply_guards,
    refused_stays_refused,
    remove_guards,
)
from prefect_governance.cli.local import prefect_env
from prefect_governance.core.handoff import ENVELOPE_ENV, GATE_COMMAND, TRUSTED_KEYS_ENV
from prefect_governance.core.keys import GovernanceVerifyKey
from prefect_governance.core.models import EngineRef, Grant
from prefect_governance.core.signing import SigningKey, sign
from prefect_governance.runtime.gate import (
    REFUSED_EXIT,
    GateRefusal,
    check_grant,
    check_run,
    trusted_keys,
)
from prefect_governance.testing import Harness, create_pool, deploy_example, wait_final
from prefect_governance.worker.blocks import GovernanceAgent
from prefect_governance.worker.process import GovernedProcessWorker
from tests.agents import harness
from tests.conftest import POLICIES, ROOT
from tests.grants import example_grant

KEY = SigningKey.generate("gate-test-signer")
ROGUE = SigningKey.generate("gate-test-signer")  # the same key id, another key
VENV_BIN = str(Path(sys.executable).parent)


def grant(run_id: str, *, decision_id: str = "decision-1", expires_in=timedelta(minutes=10)):
    return example_grant(run_id, decision_id=decision_id, expires_in=expires_in)


def signed(g: Grant, key: SigningKey = KEY) -> str:
    return json.dumps(sign(g.model_dump(mode="json"), key))


# --- the checks, one by one ---------------------------------------------------------


RUN = "6f1c2d2e-0000-4000-8000-0000000000a1"


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("no key", "no trusted key on the command line"),
        ("no envelope", "no governance envelope"),
        ("forged", "forged"),
        ("expired", "expired"),
        ("other run", "replayed"),
    ],
)
def test_the_gate_refuses_a_grant_without_authority(case, reason):
    keys = {} if case == "no key" else trusted_keys([KEY.trusted_key])
    text = {
        "no key": signed(grant(RUN)),
        "no envelope": None,
        "forged": signed(grant(RUN), ROGUE),
        "expired": signed(grant(RUN, expires_in=timedelta(minutes=-1))),
        "other run": signed(grant("6f1c2d2e-0000-4000-8000-0000000000b2")),
    }[case]
    with pytest.raises(GateRefusal, match=reason):
        check_grant(text, flow_run_id=RUN, keys=keys, now=datetime.now(timezone.utc))


def test_the_gate_accepts_a_valid_grant_and_checks_the_run_carries_it():
    verified = check_grant(
        signed(grant(RUN)),
        flow_run_id=RUN,
        keys=trusted_keys([KEY.trusted_key]),
        now=datetime.now(timezone.utc),
    )
    granted = verified.grant
    check_run(granted, {"governance.decision": "allowed", "governance.decision_id": "decision-1"})
    with pytest.raises(GateRefusal, match="refused this flow run"):
        check_run(granted, {"governance.decision": "refused", "governance.decision_id": "x"})
    with pytest.raises(GateRefusal, match="not the grant's"):
        check_run(granted, {"governance.decision": "allowed", "governance.decision_id": "other"})
    with pytest.raises(GateRefusal, match="not the grant's"):
        check_run(granted, {})  # never decided
    with pytest.raises(GateRefusal, match="KID=PUBLIC_KEY"):
        trusted_keys(["no-equals-sign"])


def test_the_governed_template_fixes_the_command():
    template = GovernedProcessWorker.get_default_base_job_template()
    assert template["job_configuration"]["command"] == GATE_COMMAND
    assert "command" not in template["variables"]["properties"], "a deployment could replace it"


# --- against a real server ------------------------------------------------------------


@pytest.fixture(scope="module")
def gated(prefect_server, tmp_path_factory):
    """A governed pool (the default template) and an agent; deployments made per test."""
    tmp = tmp_path_factory.mktemp("gate")

    async def setup():
        await harness(prefect_server, tmp).save_agent(
            GovernanceAgent(
                id="gated-agent",
                owner="sec@example.com",
                trust_scope=["gated"],
                capabilities=["read:warehouse"],
            )
        )
        await create_pool("gated")
        return {
            "plain": await deploy_example("gated-plain", "gated", {"agent": "gated-agent"}),
            # A deployment that asks for Prefect's bare engine as its command.
            "bare": await deploy_example(
                "gated-bare",
                "gated",
                {"agent": "gated-agent", "command": f"{sys.executable} -m prefect.engine"},
            ),
            "refused": await deploy_example(
                "gated-refused",
                "gated",
                {"agent": "gated-agent", "capabilities": ["delete:warehouse"]},
            ),
            "pipeline": await deploy_example(
                "gated-pipeline", "gated", {"agent": "gated-agent"}, flow_name="governed_pipeline"
            ),
        }

    return asyncio.run(setup()), tmp


def _run(deployment_id, marker: Path, **extra):
    async def create():
        async with get_client() as client:
            return await client.create_flow_run_from_deployment(
                deployment_id, parameters={"marker": str(marker), **extra}
            )

    return asyncio.run(create())


def _read(run_id):
    async def read():
        async with get_client() as client:
            return await client.read_flow_run(run_id)

    return asyncio.run(read())


def default_lineage_url_in(home: Path) -> str:
    """The lineage a worker in this Prefect home uses when its pool names no store."""
    (home / "governance").mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'governance' / 'lineage.db'}"


def _stock_worker(gov: Harness, log: Path):
    """Prefect's own process worker, on the governed pool (as a new user might start it)."""
    path = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"  # `python` is this venv's
    return gov.start_worker("gated", log=log, worker_type="process", extra_env={"PATH": path})


def test_a_stock_worker_on_a_governed_pool_executes_nothing(gated, prefect_server):
    deployments, tmp = gated
    markers = {name: tmp / f"stock-{name}" for name in ("plain", "bare")}
    runs = {name: _run(deployments[name], marker) for name, marker in markers.items()}
    with harness(prefect_server, tmp) as gov:
        _stock_worker(gov, tmp / "stock-worker.log")
        finals = asyncio.run(wait_final([r.id for r in runs.values()], timeout=120))
    for name, run in runs.items():
        state = finals[run.id].state
        assert state is not None and state.is_crashed(), (name, state)
        assert not markers[name].exists(), f"the {name} run executed under a stock worker"

    # A governed worker on the pool records each refused start in the agent's chain.
    lineage = default_lineage_url_in(prefect_server.home)
    with harness(prefect_server, tmp, lineage_url=lineage) as gov:
        gov.start_worker("gated", log=tmp / "gr.log")
        store = gov.store
        deadline = time.monotonic() + 60
        while True:
            refusals = {e.flow_run_id: e for e in store.recent(500) if e.kind == "gate_refusal"}
            if {str(r.id) for r in runs.values()} <= set(refusals) or time.monotonic() > deadline:
                break
            time.sleep(1)
        gov.stop_workers()
        for run in runs.values():
            event = refusals[str(run.id)]
            assert event.agent_id == "gated-agent" and event.payload["worker_type"] == "process"
            assert "a worker of type 'process'" in event.reasons[0], event.reasons
            state = _read(run.id).state  # the run's state now says why nothing ran
            assert state.is_crashed() and "prefect-governance gate: refused" in state.message
        assert store.verify() == []


def _gate(run_id: str, envelope: str | None, prefect_server, *keys: str, **env: str):
    """Start the pool's command for a run by hand, as a worker would."""
    environment = prefect_env(
        prefect_server.home, prefect_server.api_url, PREFECT__FLOW_RUN_ID=str(run_id), **env
    )
    if envelope is not None:
        environment[ENVELOPE_ENV] = envelope
    args = [a for k in keys for a in ("--trusted-key", k)]
    return subprocess.run(
        [sys.executable, "-m", "prefect_governance.gate", *args],
        env=environment,
        cwd=ROOT / "examples",
        capture_output=True,
        text=True,
        timeout=120,
    )


def _label(run_id, decision_id: str, verdict: str = "allowed"):
    async def label():
        async with get_client() as client:
            await client.update_flow_run_labels(
                run_id, {"governance.decision": verdict, "governance.decision_id": decision_id}
            )

    asyncio.run(label())


def test_a_valid_grant_runs_once_and_its_replay_does_not(gated, prefect_server):
    deployments, tmp = gated
    marker = tmp / "once"
    run = _run(deployments["plain"], marker)
    _label(run.id, "decision-1")
    envelope = signed(grant(str(run.id)))
    first = _gate(run.id, envelope, prefect_server, KEY.trusted_key)
    assert first.returncode == 0, first.stderr[-2000:]
    assert _read(run.id).state.is_completed() and marker.read_text().count("loaded") == 1

    async def rerun():
        async with get_client() as client:
            await client.set_flow_run_state(run.id, Running(), force=True)

    asyncio.run(rerun())
    again = _gate(run.id, envelope, prefect_server, KEY.trusted_key)
    assert again.returncode == REFUSED_EXIT
    assert "was used before" in again.stderr
    assert marker.read_text().count("loaded") == 1, "the replayed grant ran the flow again"
    assert "was used before" in _read(run.id).state.message


@pytest.mark.parametrize("case", ["forged", "expired", "other run", "env key", "block key"])
def test_a_grant_without_authority_does_not_execute(gated, prefect_server, case):
    deployments, tmp = gated
    marker = tmp / f"bad-{case.replace(' ', '-')}"
    run = _run(deployments["plain"], marker)
    _label(run.id, "decision-1")
    env = {}
    if case == "forged":
        envelope = signed(grant(str(run.id)), ROGUE)
    elif case == "expired":
        envelope = signed(grant(str(run.id), expires_in=timedelta(minutes=-1)))
    elif case == "other run":
        envelope = signed(grant("6f1c2d2e-0000-4000-8000-0000000000c3"))
    elif case == "env key":  # the run's author puts their own key in the environment
        envelope = signed(grant(str(run.id)), ROGUE)
        env[TRUSTED_KEYS_ENV] = json.dumps({ROGUE.key_id: ROGUE.public_b64})
    else:  # ... or replaces the published verify-key block
        envelope = signed(grant(str(run.id)), ROGUE)
        GovernanceVerifyKey(public_key=ROGUE.public_b64).save(ROGUE.key_id, overwrite=True)
    result = _gate(run.id, envelope, prefect_server, KEY.trusted_key, **env)
    assert result.returncode == REFUSED_EXIT, result.stderr[-2000:]
    expected = {"expired": "expired", "other run": "replayed"}.get(case, "forged")
    assert expected in result.stderr
    state = _read(run.id).state
    assert state.is_crashed() and expected in state.message
    assert not marker.exists(), f"the flow ran with a {case} grant"


def test_a_refused_run_forced_back_to_running_does_not_execute(gated, prefect_server):
    """The governed worker refuses the run; someone forces it to Running and starts the
    pool's command for it with a grant minted for it: the run stays refused."""
    deployments, tmp = gated
    marker = tmp / "refused"
    run = _run(deployments["refused"], marker)
    with harness(prefect_server, tmp) as gov:
        gov.start_worker("gated", log=tmp / "gw.log")
        final = asyncio.run(wait_final([run.id], timeout=120))[run.id]
    assert final.state.name == "Refused", final.state
    decision_id = final.labels["governance.decision_id"]

    async def force():
        async with get_client() as client:
            await client.set_flow_run_state(run.id, Running(), force=True)

    asyncio.run(force())
    minted = signed(grant(str(run.id), decision_id=decision_id))  # even a valid signature
    result = _gate(run.id, minted, prefect_server, KEY.trusted_key)
    assert result.returncode == REFUSED_EXIT
    assert "governance refused this flow run" in result.stderr
    assert not marker.exists(), "a refused run executed"


def test_a_run_keeps_the_authority_checked_at_its_start(gated, prefect_server):
    """A grant bounds when a run may start: its tasks, decided after it expired, still run."""
    deployments, tmp = gated
    steps = tmp / "long-run"
    steps.mkdir()

    async def create():
        async with get_client() as client:
            return await client.create_flow_run_from_deployment(
                deployments["pipeline"], parameters={"marker_dir": str(steps), "pause": 20}
            )

    run = asyncio.run(create())
    _label(run.id, "decision-1")
    short = grant(str(run.id), expires_in=timedelta(seconds=15)).model_copy(
        update={
            "grants": ["read:warehouse"],
            "engine": EngineRef(kind="embedded", policy_dir=str(POLICIES)),
        }
    )
    result = _gate(run.id, signed(short), prefect_server, KEY.trusted_key)
    assert result.returncode == 0, result.stderr[-2000:]
    assert datetime.now(timezone.utc) > short.envelope.expires_at, "the test ran too fast"
    assert _read(run.id).state.is_completed()
    assert (steps / "extract").exists() and (steps / "summarize").exists(), "tasks refused"


# --- the server-side guard ------------------------------------------------------------


@pytest.fixture
def guard(prefect_server):
    """The guards `prefect-governance apply` ships, on the server for one test."""

    async def apply():
        async with get_client() as client:
            return await apply_guards(client)

    async def remove():
        async with get_client() as client:
            await remove_guards(client)

    asyncio.run(remove())  # from a clean server: the guard is created
    try:
        yield asyncio.run(apply()), asyncio.run(apply())
    finally:
        asyncio.run(remove())


def test_a_refused_run_moved_back_to_running_is_refused_again_by_the_server(guard):
    first, second = guard
    assert (REFUSED_STAYS_REFUSED, "created") in first
    assert (REFUSED_STAYS_REFUSED, "unchanged") in second

    @flow
    def held() -> None: ...

    async def scenario():
        async with get_client() as client:
            refused = await client.create_flow_run(held)
            control = await client.create_flow_run(held)
            await client.set_flow_run_state(
                refused.id, Cancelled(name="Refused", message="refused by policy"), force=True
            )
            await asyncio.sleep(2)  # the refusal reaches the server's event triggers first
            for run in (refused, control):
                await client.set_flow_run_state(run.id, Running(), force=True)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                again = await client.read_flow_run(refused.id)
                if again.state.type.value == "CANCELLED":
                    break
                await asyncio.sleep(0.5)
            await asyncio.sleep(3)  # time enough for the guard to fire on the control, wrongly
            return again, await client.read_flow_run(control.id)

    again, control = asyncio.run(scenario())
    assert (again.state.type.value, again.state.name) == ("CANCELLED", "Refused"), again.state
    assert again.state.message == REFUSED_AGAIN
    assert control.state.type.value == "RUNNING", "the guard touched a run never refused"


def test_a_guard_reads_the_same_whatever_the_order_of_its_sets():
    """Its event sets come back from the server in the creating process's order."""
    wanted = refused_stays_refused([])
    stored = wanted.model_copy(deep=True)
    stored.trigger.expect = list(reversed(sorted(wanted.trigger.expect)))  # as JSON hands it back
    stored.trigger.after = list(reversed(sorted(wanted.trigger.after)))
    assert _definition(stored) == _definition(wanted)
    changed = wanted.model_copy(deep=True)
    changed.trigger.expect = {"prefect.flow-run.Running"}
    assert _definition(changed) != _definition(wanted), "a real change must show"
