"""Agents that persist, end to end: memory, trust and signed envelopes on a real server.

One agent per engine runs four times in a row: it commits memory, has a
proposal rejected by its schema, fails, and is then refused because its trust
fell across three runs. Envelopes that are forged, expired or another run's
are rejected inside a real flow run.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from datetime import timedelta

import pytest
from prefect import get_client

from prefect_governance.cli.local import prefect_env
from prefect_governance.core.keys import GovernanceVerifyKey
from prefect_governance.core.signing import SigningKey, sign
from prefect_governance.lineage.memory import MemoryStore
from prefect_governance.testing import create_pool, deploy_example, run_in_order
from prefect_governance.worker.blocks import GovernanceAgent
from tests.agents import asave_agent, harness
from tests.conftest import ROOT
from tests.grants import example_grant
from tests.test_openlineage import check_event, openlineage_registry

pytestmark = pytest.mark.e2e

MEMORY_SCHEMA = {
    "type": "object",
    "properties": {
        "total_rows": {"type": "integer", "minimum": 0},
        "last_rows": {"type": "integer", "minimum": 0},
    },
    "additionalProperties": False,
}
# Each run's parameters, in order; what should happen is asserted below.
PLAN = [
    {"rows": 100},  # completes, commits memory v1
    {"rows": 5, "report_rows": -1},  # completes, proposal breaks the schema: rejected
    {"rows": 1, "fail": True},  # fails
    {"rows": 1},  # refused: trust fell across the last three runs
]


@pytest.fixture(scope="module")
def learned(prefect_server, opa_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("agents")
    with harness(prefect_server, tmp, lineage_block="agents-lineage") as gov:

        async def setup():
            await gov.save_engine("agents-embedded", kind="embedded")
            await gov.save_engine("agents-opa", kind="opa", opa_url=opa_server.url)
            deployments = {}
            for engine in ("embedded", "opa"):
                agent = GovernanceAgent(
                    id=f"learner-{engine}",
                    owner="ml@example.com",
                    trust_scope=[f"learn-{engine}"],
                    capabilities=["read:warehouse"],
                    memory_schema=MEMORY_SCHEMA,
                    trust_baseline=0.8,
                )
                deployments[engine] = await gov.governed_pool(
                    f"learn-{engine}", agent, flow_name="learn", engine=f"agents-{engine}"
                )
            return deployments

        deployments = asyncio.run(setup())
        for engine in deployments:
            gov.start_worker(f"learn-{engine}", log=tmp / f"worker-{engine}.log")

        async def both():
            return dict(
                zip(
                    deployments,
                    await asyncio.gather(
                        *(
                            run_in_order(deployment_id, PLAN, tmp, gov.store)
                            for engine, deployment_id in deployments.items()
                        )
                    ),
                    strict=True,
                )
            )

        try:
            results = asyncio.run(both())
        finally:
            gov.stop_workers()
        yield results, gov.store


ENGINES = pytest.mark.parametrize("engine", ["embedded", "opa"])


@ENGINES
def test_memory_is_committed_and_visible_to_the_next_run(learned, engine):
    results, store = learned
    (first, seen_first, events_first), (second, seen_second, _), *_ = results[engine]
    assert first.state.is_completed(), first.state
    assert seen_first == {"version": 0, "content": {}}
    commit = events_first["memory_commit"]
    assert commit.payload["version"] == 1
    assert second.state.is_completed()
    assert seen_second == {"version": 1, "content": {"total_rows": 100, "last_rows": 100}}
    memory = MemoryStore(store.engine).latest(f"learner-{engine}")
    assert (memory.version, memory.content) == (1, {"total_rows": 100, "last_rows": 100})
    assert memory.content_hash == commit.payload["content_hash"]


@ENGINES
def test_an_invalid_proposal_is_rejected_with_its_errors(learned, engine):
    results, store = learned
    _, _, events = results[engine][1]
    rejected = events["memory_rejected"]
    assert rejected.reasons == ["total_rows: -1 is less than the minimum of 0"]
    assert "memory_rejected" in events["trust"].payload["events"]
    assert MemoryStore(store.engine).latest(f"learner-{engine}").version == 1


@ENGINES
def test_trust_falls_and_the_fourth_run_is_refused(learned, engine):
    results, _ = learned
    scores = [events["trust"].payload["score"] for _, _, events in results[engine]]
    assert scores[:3] == [pytest.approx(0.82), pytest.approx(0.69), pytest.approx(0.59)]
    fourth, seen, events = results[engine][3]
    assert fourth.state.name == "Refused" and seen is None, "the refused run executed"
    assert "fell across its last three runs" in fourth.state.message
    assert events["decision"].verdict == "refused"
    assert scores[3] == pytest.approx(0.39)  # the refusal itself costs trust


@ENGINES
def test_the_failed_run_is_recorded_and_its_memory_not_committed(learned, engine):
    results, _ = learned
    third, seen, events = results[engine][2]
    assert third.state.is_failed() and seen is not None
    assert events["outcome"].state == "FAILED"
    assert "memory_commit" not in events


# --- envelopes inside a real flow run -------------------------------------------


@pytest.fixture(scope="module")
def unattended(prefect_server):
    """A deployment of the learning flow on a pool no worker polls, and a trusted key."""
    key = SigningKey.generate("test-signer")

    async def setup():
        await GovernanceVerifyKey(public_key=key.public_b64).asave("test-signer", overwrite=True)
        await create_pool("unattended")
        return await deploy_example("unattended", "unattended", {}, flow_name="learn")

    return asyncio.run(setup()), key


def _execute_with(prefect_server, deployment_id, tmp_path, make_envelope):
    """Create a run, hand it an envelope, execute it as a worker would; return its state."""

    async def create():
        async with get_client() as client:
            return await client.create_flow_run_from_deployment(
                deployment_id, parameters={"marker": str(tmp_path / "marker")}
            )

    run = asyncio.run(create())
    env = prefect_env(prefect_server.home, prefect_server.api_url, PREFECT__FLOW_RUN_ID=str(run.id))
    envelope = make_envelope(str(run.id))
    if envelope is not None:
        env["PREFECT_GOVERNANCE_ENVELOPE"] = envelope
    subprocess.run(
        [sys.executable, "-m", "prefect.engine"],
        env=env,
        cwd=ROOT / "examples",
        capture_output=True,
        timeout=120,
    )

    async def read():
        async with get_client() as client:
            return await client.read_flow_run(run.id)

    return asyncio.run(read()).state


def _grant(run_id, *, expires_in=timedelta(minutes=10)):
    return example_grant(run_id, decision_id="d", expires_in=expires_in).model_dump(mode="json")


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("none", "no governance envelope"),
        ("forged", "forged"),
        ("expired", "expired"),
        ("replayed", "replayed"),
        ("valid", None),
    ],
)
def test_envelopes_are_verified_inside_the_run(prefect_server, unattended, tmp_path, case, reason):
    deployment_id, key = unattended
    rogue = SigningKey.generate("test-signer")  # same key id, not the trusted key

    def make(run_id):
        if case == "none":
            return None
        if case == "forged":
            return json.dumps(sign(_grant(run_id), rogue))
        if case == "expired":
            return json.dumps(sign(_grant(run_id, expires_in=timedelta(minutes=-1)), key))
        if case == "replayed":
            return json.dumps(sign(_grant("6f1c2d2e-0000-4000-8000-0000000000aa"), key))
        return json.dumps(sign(_grant(run_id), key))

    state = _execute_with(prefect_server, deployment_id, tmp_path, make)
    marker = tmp_path / "marker"
    if reason is None:
        assert state.is_completed(), state
        assert marker.exists()
    else:
        assert state.is_failed(), state
        assert reason in (state.message or ""), state.message
        assert not marker.exists(), "the flow body ran with a bad envelope"


# --- the commands over what really happened -------------------------------------


def _cli(prefect_server, *args):
    return subprocess.run(
        [sys.executable, "-m", "prefect_governance.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=prefect_env(prefect_server.home, prefect_server.api_url),
    )


def test_agent_show_prints_memory_and_trust(learned, prefect_server):
    _, store = learned
    shown = _cli(prefect_server, "agent", "show", "learner-embedded", "--url", store.url)
    assert shown.returncode == 0, shown.stderr
    assert "memory     version 1" in shown.stdout
    assert '"total_rows": 100' in shown.stdout
    assert "trust      0.39" in shown.stdout and "4 runs decided, 1 refused" in shown.stdout


def test_lineage_show_and_verify_over_real_runs(learned, prefect_server):
    _, store = learned
    shown = _cli(prefect_server, "lineage", "show", "--agent", "learner-opa", "--url", store.url)
    assert shown.returncode == 0, shown.stderr
    for kind in ("decision", "outcome", "memory_commit", "memory_rejected", "trust"):
        assert kind in shown.stdout
    verified = _cli(prefect_server, "lineage", "verify", "--url", store.url)
    assert verified.returncode == 0, verified.stdout
    assert "chains intact" in verified.stdout


def test_lineage_verify_exits_1_when_a_record_is_altered(learned, prefect_server, tmp_path):
    _, store = learned
    copy = tmp_path / "copy.db"
    with (
        sqlite3.connect(store.url.removeprefix("sqlite:///")) as source,
        sqlite3.connect(copy) as target,
    ):
        source.backup(target)  # a consistent copy, WAL included
    with sqlite3.connect(copy) as db:
        db.execute(
            "UPDATE governance_event SET verdict = 'allowed' "
            "WHERE chain = 'learner-embedded' AND verdict = 'refused'"
        )
    verified = _cli(prefect_server, "lineage", "verify", "--url", f"sqlite:///{copy}")
    assert verified.returncode == 1
    assert "learner-embedded" in verified.stdout and "was altered" in verified.stdout


def test_lineage_export_writes_valid_openlineage(learned, prefect_server, tmp_path):
    _, store = learned
    out = tmp_path / "events.jsonl"
    exported = _cli(
        prefect_server,
        "lineage",
        "export",
        "--format",
        "openlineage",
        "--agent",
        "learner-embedded",
        "--url",
        store.url,
        "-o",
        str(out),
    )
    assert exported.returncode == 0, exported.stderr
    events = [json.loads(line) for line in out.read_text().splitlines()]
    registry = openlineage_registry()
    for event in events:
        check_event(registry, event)
    types = [e["eventType"] for e in events]
    assert types.count("START") == 4
    assert sorted(t for t in types if t != "START") == ["ABORT", "COMPLETE", "COMPLETE", "FAIL"]
    written = [e for e in events if e.get("outputs")]
    assert [o["name"] for e in written for o in e["outputs"]] == ["agents/learner-embedded/memory"]


def test_a_memory_schema_change_is_shown_to_the_policy(learned, prefect_server):
    """After the schema changes, the policy sees the old and the new hash (and warns)."""
    _, store = learned

    async def change_schema():
        agent = await GovernanceAgent.aload("learner-embedded")
        old = agent.memory_schema_hash
        agent.memory_schema = {**MEMORY_SCHEMA, "required": ["total_rows"]}
        await asave_agent(agent, "learner-embedded")  # the pool owner re-applies it
        return old, agent.memory_schema_hash

    old, new = asyncio.run(change_schema())
    decided = subprocess.run(
        [sys.executable, "-m", "prefect_governance.cli", "decide", "learn/learn-embedded"],
        capture_output=True,
        text=True,
        timeout=60,
        env=prefect_env(
            prefect_server.home, prefect_server.api_url, PREFECT_GOVERNANCE_LINEAGE_URL=store.url
        ),
    )
    out = json.loads(decided.stdout)
    memory = out["input"]["envelope"]["memory"]
    assert (memory["previous_schema_hash"], memory["schema_hash"], memory["version"]) == (
        old,
        new,
        1,
    )
    assert any("runs under a new memory schema" in w for w in out["decision"]["warn"])
