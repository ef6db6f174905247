"""The governed worker end to end: a real Prefect server, real workers, real OPA.

Every scenario runs once per pool; the pools differ only in their engine. Runs
write a marker file when their body executes, so a refused run is proven not
to have executed.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect import get_client
from prefect.client.schemas.actions import BlockDocumentCreate
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from prefect_governance.core.trust import TrustWeights
from prefect_governance.lineage.store import LineageStore
from prefect_governance.testing import (
    Harness,
    create_pool,
    deploy_example,
    wait_final,
    wait_outcomes,
)
from prefect_governance.worker.blocks import GovernanceAgent
from tests.agents import harness
from tests.conftest import OpaServer

pytestmark = pytest.mark.e2e

ENGINE_POOLS = {"embedded": "gov-embedded", "opa": "gov-opa"}
# Audit mode is the pool owner's: the audited scenario runs in these pools (mode: audit).
AUDIT_POOLS = {"embedded": "gov-audit-embedded", "opa": "gov-audit-opa"}
ALL_POOLS = [
    *ENGINE_POOLS.values(),
    *AUDIT_POOLS.values(),
    "gov-down",
    "gov-down-open",
    "gov-no-lineage",
]


@dataclass
class Scenario:
    name: str
    job_variables: dict[str, Any]
    parameters: dict[str, Any] = field(default_factory=lambda: {"rows": 10})
    pools: dict[str, str] = field(default_factory=lambda: ENGINE_POOLS)


SCENARIOS = [
    Scenario("allowed", {"agent": "e2e-etl", "capabilities": ["read:warehouse"]}),
    Scenario("refused", {"agent": "e2e-etl", "capabilities": ["delete:warehouse"]}),
    Scenario("fails", {"agent": "e2e-etl"}, {"rows": 10, "fail": True}),
    Scenario("warned", {"agent": "e2e-probation", "capabilities": ["read:warehouse"]}),
    Scenario(
        "audited", {"agent": "e2e-shadow", "capabilities": ["write:warehouse"]}, pools=AUDIT_POOLS
    ),
    Scenario("no-agent", {"capabilities": ["read:warehouse"]}),
    Scenario("unknown-agent", {"agent": "nobody-by-that-name"}),
    Scenario("invalid-agent", {"agent": "e2e-broken"}),
    Scenario("over-limit-parameter", {"agent": "e2e-etl"}, {"rows": 5000}),
    # A deployment that tries to switch governance off from its own job variables.
    Scenario(
        "relaxing-deployment",
        {
            "agent": "e2e-etl",
            "capabilities": ["delete:warehouse"],
            "mode": "audit",
            "fail_mode": "open",
            "policy_path": "prefect/governance/nothing",
        },
    ),
]


@dataclass
class Observed:
    flow_run: Any
    executed: bool
    events: list[Any]
    artifacts: list[Any]

    @property
    def labels(self) -> dict[str, Any]:
        return self.flow_run.labels or {}

    @property
    def state(self):
        return self.flow_run.state

    def event(self, kind: str):
        found = [e for e in self.events if e.kind == kind]
        assert len(found) == 1, f"expected one {kind} event, got {len(found)}"
        return found[0]


async def _setup(
    gov: Harness, opa_url: str, down_url: str
) -> dict[tuple[str, str], tuple[UUID, Path]]:
    tmp, scope = gov.workdir, ALL_POOLS
    await gov.save_lineage()
    # A lineage database that cannot be opened: a directory that does not exist.
    await gov.save_lineage("e2e-no-lineage", f"sqlite:///{tmp / 'missing-dir' / 'lineage.db'}")
    # These tests are about the gate, and many runs share each agent: keep trust still.
    still = TrustWeights(completed=0, failed=0, crashed=0, refused=0, warned=0, memory_rejected=0)
    await gov.save_agent(
        GovernanceAgent(
            id="e2e-etl",
            trust_weights=still,
            owner="data@example.com",
            trust_scope=scope,
            capabilities=["read:warehouse", "write:warehouse"],
            constraints={"parameters": {"rows": {"type": "integer", "maximum": 1000}}},
        )
    )
    await gov.save_agent(
        GovernanceAgent(
            id="e2e-probation",
            trust_weights=still,
            owner="ml@example.com",
            trust_scope=scope,
            capabilities=["read:warehouse"],
            trust_baseline=0.3,
        )
    )
    await gov.save_agent(
        GovernanceAgent(
            id="e2e-shadow",
            trust_weights=still,
            owner="sec@example.com",
            trust_scope=scope,
            capabilities=["read:warehouse"],
        )
    )
    await gov.save_engine("e2e-embedded", kind="embedded")
    await gov.save_engine("e2e-opa", kind="opa", opa_url=opa_url)
    await gov.save_engine("e2e-down", kind="opa", opa_url=down_url, retries=0)

    async with get_client() as client:
        # An agent document that does not validate (as if edited by hand in the UI).
        agent_type = await client.read_block_type_by_slug("governance-agent")
        schema = await client.get_most_recent_block_schema_for_block_type(agent_type.id)
        await client.create_block_document(
            BlockDocumentCreate(
                name="e2e-broken",
                block_type_id=agent_type.id,
                block_schema_id=schema.id,
                data={"id": "no spaces allowed", "owner": "", "trust_scope": "everywhere"},
            )
        )
    pools = {
        "gov-embedded": dict(engine="e2e-embedded"),
        "gov-opa": dict(engine="e2e-opa"),
        "gov-audit-embedded": dict(engine="e2e-embedded", mode="audit"),
        "gov-audit-opa": dict(engine="e2e-opa", mode="audit"),
        "gov-down": dict(engine="e2e-down"),
        "gov-down-open": dict(engine="e2e-down", fail_mode="open"),
        "gov-no-lineage": dict(engine="e2e-embedded", lineage_store="e2e-no-lineage"),
    }
    for name, defaults in pools.items():
        await create_pool(name, **{"lineage_store": gov.lineage_block, **defaults})

    runs: dict[tuple[str, str], tuple[UUID, Path]] = {}
    plan = [(pool, s) for s in SCENARIOS for pool in s.pools.values()]
    plan += [(pool, SCENARIOS[0]) for pool in ("gov-down", "gov-down-open", "gov-no-lineage")]
    async with get_client() as client:
        for pool, scenario in plan:
            deployment_id = await deploy_example(
                f"{pool}-{scenario.name}", pool, scenario.job_variables
            )
            marker = tmp / "markers" / f"{pool}-{scenario.name}"
            run = await client.create_flow_run_from_deployment(
                deployment_id, parameters={**scenario.parameters, "marker": str(marker)}
            )
            runs[(pool, scenario.name)] = (run.id, marker)
    return runs


async def _observe(runs, store: LineageStore) -> dict[tuple[str, str], Observed]:
    ids = [run_id for run_id, _ in runs.values()]
    final = await wait_final(ids, timeout=240)
    executed = [i for i, r in final.items() if r.state and r.state.name != "Refused"]
    await wait_outcomes(store, executed, timeout=60)
    observed = {}
    async with get_client() as client:
        for key, (run_id, marker) in runs.items():
            artifacts = await client.read_artifacts(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
            )
            observed[key] = Observed(
                flow_run=final[run_id],
                executed=marker.exists(),
                events=list(store.recent(50, flow_run_id=str(run_id))),
                artifacts=[a for a in artifacts if a.key == "governance-decision"],
            )
    return observed


@pytest.fixture(scope="module")
def governed(prefect_server, opa_server, opa_bin, tmp_path_factory):
    """All scenarios through four governed workers, observed once."""
    tmp = tmp_path_factory.mktemp("e2e")
    (tmp / "markers").mkdir()
    down = OpaServer(opa_bin, tmp)
    down.stop()  # a real OPA that was there and is gone: its port now refuses
    with harness(prefect_server, tmp, lineage_block="e2e-lineage") as gov:
        runs = asyncio.run(_setup(gov, opa_server.url, down.url))
        store = gov.store
        for pool in ALL_POOLS:
            gov.start_worker(pool)
        started = time.monotonic()
        try:
            observed = asyncio.run(_observe(runs, store))
        finally:
            gov.stop_workers()
        observed["_elapsed"] = time.monotonic() - started
        yield observed


ENGINES = pytest.mark.parametrize("engine", list(ENGINE_POOLS))


def _get(governed, engine_or_pool: str, scenario: str) -> Observed:
    pools = next((s.pools for s in SCENARIOS if s.name == scenario), ENGINE_POOLS)
    pool = pools.get(engine_or_pool, engine_or_pool)
    return governed[(pool, scenario)]


@ENGINES
def test_allowed_run_completes_and_is_labelled(governed, engine):
    run = _get(governed, engine, "allowed")
    assert run.state.is_completed(), run.state
    assert run.executed
    decision = run.event("decision")
    assert decision.verdict == "allowed" and decision.engine == engine
    assert run.labels["governance.decision"] == "allowed"
    assert run.labels["governance.decision_id"] == decision.decision_id
    assert run.labels["governance.engine"] == engine
    assert run.labels["governance.agent"] == "e2e-etl"  # an annotation from the policy
    # Prefect's worker labels, written in the same update as the governance labels
    assert run.labels["prefect.worker.type"] == "governed-process"
    assert run.labels["prefect.work-pool.name"] == ENGINE_POOLS[engine]
    assert run.event("outcome").state == "COMPLETED"
    assert decision.id < run.event("outcome").id, "the decision is recorded before the outcome"
    if engine == "embedded":  # OPA reports a revision only when it serves a bundle
        assert decision.policy_revision.startswith("sha256:"), "the policy revision is recorded"
    assert len(run.artifacts) == 1 and "Allowed" in run.artifacts[0].data


@ENGINES
def test_a_failing_run_is_recorded_as_failed(governed, engine):
    run = _get(governed, engine, "fails")
    assert run.executed and run.state.is_failed(), run.state
    assert run.event("decision").verdict == "allowed"
    assert run.event("outcome").state == "FAILED"


@ENGINES
def test_refused_run_never_executes_and_reads_refused(governed, engine):
    run = _get(governed, engine, "refused")
    assert not run.executed, "the refused run's body ran"
    assert run.state.is_cancelled() and run.state.name == "Refused"
    decision = run.event("decision")
    assert decision.verdict == "refused"
    assert 'capability "delete:warehouse" is not granted' in run.state.message
    assert decision.decision_id in run.state.message
    rule = "prefect.governance.rules.capabilities.deny"
    assert f"[{rule}]" in run.state.message, "the message names the rule that refused"
    assert decision.payload["rules"][0]["rule"] == rule
    assert run.labels["governance.decision"] == "refused"
    assert "delete:warehouse" in run.artifacts[0].data
    assert f"`{rule}`" in run.artifacts[0].data
    assert not [e for e in run.events if e.kind == "outcome"], "a refused run has no run outcome"


@ENGINES
def test_warned_run_carries_labels_artifact_and_warning(governed, engine):
    run = _get(governed, engine, "warned")
    assert run.state.is_completed() and run.executed
    assert run.labels["governance.decision"] == "allowed"
    assert run.labels["governance.warnings"] == "1"
    assert "trust of agent" in run.artifacts[0].data
    assert run.event("decision").warnings == [
        'trust of agent "e2e-probation" is low: 0.3 (below 0.5)'
    ]


@ENGINES
def test_audit_mode_executes_a_denied_run_and_marks_it(governed, engine):
    run = _get(governed, engine, "audited")
    assert run.state.is_completed() and run.executed
    assert run.labels["governance.decision"] == "audited"
    decision = run.event("decision")
    assert decision.verdict == "audited" and decision.mode == "audit"
    assert 'capability "write:warehouse" is not granted' in decision.reasons[0]
    assert "audit mode" in run.artifacts[0].data


@ENGINES
@pytest.mark.parametrize(
    ("scenario", "reason"),
    [
        ("no-agent", "names no agent"),
        ("unknown-agent", "does not exist"),
        ("invalid-agent", "is invalid: id: String should match pattern"),
        ("over-limit-parameter", 'parameter "rows" is 5000, above the maximum 1000'),
    ],
)
def test_bad_configuration_and_odd_input_are_refused_with_a_reason(
    governed, engine, scenario, reason
):
    run = _get(governed, engine, scenario)
    assert not run.executed
    assert run.state.name == "Refused", run.state
    assert reason in run.state.message
    assert run.event("decision").verdict == "refused"


@ENGINES
def test_a_deployment_cannot_switch_governance_off(governed, engine):
    run = _get(governed, engine, "relaxing-deployment")
    assert not run.executed and run.state.name == "Refused"
    decision = run.event("decision")
    assert (decision.mode, decision.policy_path) == ("enforce", "prefect/governance/decision")
    assert any("only the work pool may set it" in w for w in decision.warnings)


def test_opa_stopped_means_refused_as_unreachable(governed):
    run = _get(governed, "gov-down", "allowed")
    assert not run.executed and run.state.name == "Refused"
    assert "unreachable" in run.state.message
    assert run.event("decision").engine == "opa"


def test_fail_open_pool_runs_ungoverned_and_the_lineage_says_so(governed):
    run = _get(governed, "gov-down-open", "allowed")
    assert run.executed and run.state.is_completed()
    decision = run.event("decision")
    assert decision.verdict == "ungoverned"
    assert "unreachable" in decision.payload["error"]
    assert run.labels["governance.decision"] == "ungoverned"


def test_no_lineage_no_run(governed):
    """A decision that cannot be recorded is a refusal: nothing runs unrecorded."""
    run = _get(governed, "gov-no-lineage", "allowed")
    assert not run.executed and run.state.name == "Refused"
    assert "lineage store is unavailable" in run.state.message
    assert run.labels["governance.decision"] == "refused"


def test_engines_decide_the_same_scenarios_alike(governed):
    for scenario in SCENARIOS:
        a = _get(governed, "embedded", scenario.name).event("decision")
        b = _get(governed, "opa", scenario.name).event("decision")
        assert (a.verdict, sorted(a.reasons), sorted(a.warnings)) == (
            b.verdict,
            sorted(b.reasons),
            sorted(b.warnings),
        ), scenario.name
