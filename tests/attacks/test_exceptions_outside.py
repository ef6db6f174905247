"""Attacks on policy exceptions from the outside, against a real Prefect server and the real
governed worker: a deployment author naming things as he likes, an API client writing blocks
and flow runs through the REST API, and what a run's labels say.

Every case's agent refuses ``rows`` above 10 (the parameters rule) and every run asks for
more, so a run executes only if an exception waives that deny. Each case has its own agent
and an exception signed by the security team (the key the worker pins) for a scope that is
*not* the attacker's run, unless the case says otherwise. A held attack leaves the run's
marker file absent and the run Cancelled/"Refused"; an attack that gets through is an
``xfail(strict=True)`` whose reason says what the hole is.

Phase 1 decides every case (a worker on an enforcing pool, one on a fail-open pool);
phase 2 (same workers) floods the server with junk governance-exception blocks and decides
the control's, a refused and the copied exception's deployments again.

Held: deployment names chosen to look like the scope ("*", the target's UUID, upper case),
a revoked exception saved under another block name, a flood of 205 junk blocks (the valid
exception still waives; a refused run's record stays bounded, and still names a tampered
exception's rejection first), a run created through the REST API with another flow's id
(refused: a deployment's run is its flow's), a message pattern matched against the whole
message, a pattern RE2 cannot compile (waives nothing, so the run's other denies hold in a
fail-open pool), the waiver named in the decision event. Open (xfail): planted waiver
labels kept, an exception narrowed by re-applying rolled back by saving the older signed
data.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect import Flow, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.events.filters import EventFilter, EventNameFilter

from prefect_governance.cli.demo import ROOT
from prefect_governance.testing import Harness, create_pool, deploy_example, wait_final
from prefect_governance.worker.blocks import GovernanceAgent
from tests.agents import harness
from tests.exception_keys import exception, exception_keys_env, signed

pytestmark = pytest.mark.e2e

POOL = "exc-outside"
OPEN_POOL = "exc-outside-open"  # fail_mode open: an engine failure runs ungoverned
RULE = "prefect.governance.rules.parameters.deny"
FLOOD = 205  # more than Prefect's default page (PREFECT_API_DEFAULT_LIMIT, 200)


async def _deploy(
    name: str, variables: dict[str, Any], flow_name: str | None = None, pool: str = POOL
) -> UUID:
    """A deployment of examples/flows.py:load_warehouse, registered under ``flow_name``
    (a flow of that name: the deployment author names his flow as he likes)."""
    if flow_name is None:
        return await deploy_example(name, pool, variables)
    source = await Flow.afrom_source(
        source=str(ROOT / "examples"), entrypoint="flows.py:load_warehouse"
    )
    source = source.with_options(name=flow_name)
    with contextlib.redirect_stdout(io.StringIO()):
        return await source.adeploy(
            name=name,
            work_pool_name=pool,
            job_variables=variables,
            build=False,
            push=False,
            print_next_steps=False,
        )


async def _agent(gov: Harness, agent_id: str) -> None:
    await gov.save_agent(
        GovernanceAgent(
            id=agent_id,
            owner="data@example.com",
            trust_scope=[POOL, OPEN_POOL],
            capabilities=["read:warehouse"],
            constraints={"parameters": {"rows": {"type": "integer", "maximum": 10}}},
        ),
        agent_id,
    )


async def _run(deployment_id: UUID, marker: Path, rows: int = 500, **options: Any) -> UUID:
    async with get_client() as client:
        run = await client.create_flow_run_from_deployment(
            deployment_id, parameters={"rows": rows, "marker": str(marker)}, **options
        )
    return run.id


async def _setup(gov: Harness) -> dict[str, Any]:
    tmp = gov.workdir
    await create_pool(POOL, lineage_store=await gov.save_lineage(), overwrite=True)
    cases: dict[str, Any] = {}

    def case(name: str, **data: Any) -> dict[str, Any]:
        cases[name] = {"marker": tmp / f"marker-{name}", **data}
        return cases[name]

    # Control: an exception scoped to this deployment waives its deny (the door exists).
    await _agent(gov, "xo-control")
    control = await _deploy("xo-control", {"agent": "xo-control"})
    await signed(
        "zz-xo-control",  # sorts after the flood of phase 2
        exception(agents=["xo-control"], deployments=["load-warehouse/xo-control"]),
    ).asave("zz-xo-control")
    c = case("control", deployment=control)
    c["id"] = await _run(control, c["marker"])

    # A flow run of the attacker's deployment (flow "xo-evil", his code) created through the
    # REST API with the flow id of the flow the exception names: the worker reads the flow
    # from the run, not from the deployment.
    await _agent(gov, "xo-spoof")
    await signed(
        "xo-spoof", exception(agents=["xo-spoof"], deployments=["load-warehouse/xo-spoof"])
    ).asave("xo-spoof")
    evil = await _deploy("xo-spoof", {"agent": "xo-spoof"}, flow_name="xo-evil")
    async with get_client() as client:
        target_flow = await client.read_flow_by_name("load-warehouse")
    c = case("flow id of another flow", deployment=evil)
    c["id"] = await _spoofed_run(evil, target_flow.id, c["marker"], rows=500)

    # Names the deployment author chooses: a deployment named "*", one named the target
    # deployment's UUID, one in upper case. Each exception names a target deployment of its
    # own. (A "/" in a deployment name, to shift the flow/deployment split, is refused by
    # Prefect's server itself: 500, "String should match pattern '^[^/%&><]*$'".)
    for slug, attacker_name, flow_name in [
        ("star", "*", None),
        ("uuid", None, "xo-evil"),
        ("case", "XO-CASE-TARGET", None),
    ]:
        agent_id = f"xo-{slug}"
        await _agent(gov, agent_id)
        target = await _deploy(f"xo-{slug}-target", {"agent": agent_id})
        scope = str(target) if slug == "uuid" else f"load-warehouse/xo-{slug}-target"
        await signed(agent_id, exception(agents=[agent_id], deployments=[scope])).asave(agent_id)
        attacker = await _deploy(attacker_name or str(target), {"agent": agent_id}, flow_name)
        c = case(f"deployment named {slug}", deployment=attacker)
        c["id"] = await _run(attacker, c["marker"])

    # A revoked exception (its block deleted) saved back under another block name.
    await _agent(gov, "xo-copy")
    copy_target = await _deploy("xo-copy", {"agent": "xo-copy"})
    original = signed("xo-copy", exception(agents=["xo-copy"]))
    await original.asave("xo-copy")
    async with get_client() as client:
        document = await client.read_block_document_by_name("xo-copy", "governance-exception")
        await client.delete_block_document(document.id)
        await client._client.post(
            "/block_documents/",
            json={
                "name": "xo-copy-again",
                "data": document.data,
                "block_schema_id": str(document.block_schema_id),
                "block_type_id": str(document.block_type_id),
            },
        )
    c = case("copied under another name", deployment=copy_target)
    c["id"] = await _run(copy_target, c["marker"])

    # An exception meant for exactly 500 rows ('parameter "rows" is 500'), and a run of
    # 5000: RE2's regex.match is a search, not a full match.
    await _agent(gov, "xo-prefix")
    prefix = await _deploy("xo-prefix", {"agent": "xo-prefix"})
    await signed(
        "xo-prefix", exception(agents=["xo-prefix"], message='parameter "rows" is 500')
    ).asave("xo-prefix")
    c = case("message pattern matched inside the message", deployment=prefix)
    c["id"] = await _run(prefix, c["marker"], rows=5000)

    # A run that needs no exception, created with labels that say it was waived.
    await _agent(gov, "xo-labels")
    labelled = await _deploy("xo-labels", {"agent": "xo-labels"})
    c = case("planted waiver labels", deployment=labelled)
    c["id"] = await _run(
        labelled,
        c["marker"],
        rows=5,
        labels={"governance.waived": "3", "governance.exceptions": "xo-nothing"},
    )

    # The same flow-id trick against an agent's binding: an agent the pool owner bound to
    # load-warehouse/xo-bound only; the attacker's xo-evil/xo-bound asks for it. Its own run
    # is refused (not bound); the run created with load-warehouse's flow id is the attack.
    await gov.save_agent(
        GovernanceAgent(
            id="xo-bound",
            owner="data@example.com",
            trust_scope=[POOL],
            capabilities=["read:warehouse"],
            deployments=["load-warehouse/xo-bound"],
        ),
        "xo-bound",
    )
    await _deploy("xo-bound", {"agent": "xo-bound"})
    evil_bound = await _deploy("xo-bound", {"agent": "xo-bound"}, flow_name="xo-evil")
    c = case("agent bound: the attacker's own run", deployment=evil_bound)
    c["id"] = await _run(evil_bound, c["marker"], rows=5)
    c = case("agent bound: flow id of another flow", deployment=evil_bound)
    c["id"] = await _spoofed_run(evil_bound, target_flow.id, c["marker"], rows=5)

    # Narrowing by re-applying, rolled back: version 1 waives the parameters rule; the
    # security team re-signs it to waive only the scope rule; an API client who kept
    # version 1's data writes it back over the block.
    await _agent(gov, "xo-rollback")
    rollback = await _deploy("xo-rollback", {"agent": "xo-rollback"})
    await signed("xo-rollback", exception(agents=["xo-rollback"])).asave("xo-rollback")
    async with get_client() as client:
        kept = await client.read_block_document_by_name("xo-rollback", "governance-exception")
    narrowed = exception(agents=["xo-rollback"], rules=["prefect.governance.rules.scope.deny"])
    await signed("xo-rollback", narrowed).asave("xo-rollback", overwrite=True)
    async with get_client() as client:
        response = await client._client.patch(
            f"/block_documents/{kept.id}",
            json={"data": kept.data, "merge_existing_data": False},
        )
        response.raise_for_status()
    c = case("narrowed, then the older version saved back", deployment=rollback)
    c["id"] = await _run(rollback, c["marker"])

    # A message pattern Python's re accepts (what apply checks) and RE2 does not (\Z):
    # signed, it makes regex.match fail inside the policy for every run with a deny of
    # its rule. In a fail-open pool the deployment author then asks for 500 rows *and* a
    # capability his agent lacks: the engine fails, and the run goes ungoverned.
    await create_pool(OPEN_POOL, lineage_store=gov.lineage_block, fail_mode="open", overwrite=True)
    await _agent(gov, "xo-re2")
    await signed(
        "xo-re2", exception(agents=["xo-re2"], message=r'parameter "rows" is 500,.*\Z')
    ).asave("xo-re2")
    variables = {"agent": "xo-re2", "capabilities": ["delete:warehouse"]}
    greedy = await _deploy("xo-re2", variables, pool=OPEN_POOL)
    c = case("RE2-invalid pattern: ungranted capability alone", deployment=greedy)
    c["id"] = await _run(greedy, c["marker"], rows=5)
    c = case("RE2-invalid pattern: ungranted capability and 500 rows", deployment=greedy)
    c["id"] = await _run(greedy, c["marker"], rows=500)
    return cases


async def _spoofed_run(deployment_id: UUID, flow_id: UUID, marker: Path, rows: int) -> UUID:
    """A run of the deployment created through the REST API with another flow's id."""
    async with get_client() as client:
        response = await client._client.post(
            "/flow_runs/",
            json={
                "flow_id": str(flow_id),
                "deployment_id": str(deployment_id),
                "work_pool_name": POOL,
                "parameters": {"rows": rows, "marker": str(marker)},
                "state": {"type": "SCHEDULED"},
            },
        )
        response.raise_for_status()
        return UUID(response.json()["id"])


async def _flood() -> None:
    """As an API client: FLOOD governance-exception blocks of junk (each claims every run:
    its scope cannot be read), named to sort first."""
    async with get_client() as client:
        block_type = await client.read_block_type_by_slug("governance-exception")
        schema = await client.get_most_recent_block_schema_for_block_type(block_type.id)
        assert schema is not None
        for i in range(FLOOD):
            response = await client._client.post(
                "/block_documents/",
                json={
                    "name": f"aa-junk-{i:04d}",
                    "data": {"rules": "junk"},
                    "block_schema_id": str(schema.id),
                    "block_type_id": str(block_type.id),
                },
            )
            response.raise_for_status()


async def _events(flow_run_id: UUID) -> list[dict[str, Any]]:
    """The server's governance events about this flow run."""
    query = EventFilter(
        event=EventNameFilter(prefix=["prefect-governance."]),
        any_resource={"id": [f"prefect.flow-run.{flow_run_id}"]},
    )
    async with get_client() as client:
        response = await client._client.post(
            "/events/filter", json={"filter": query.model_dump(mode="json"), "limit": 50}
        )
        response.raise_for_status()
        return response.json()["events"]


async def _observed(gov: Harness, run_id: UUID) -> dict[str, Any]:
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
    tmp = tmp_path_factory.mktemp("exceptions-outside")
    with harness(prefect_server, tmp, lineage_block="exceptions-outside-lineage") as gov:
        cases = asyncio.run(_setup(gov))
        gov.start_worker(POOL, log=tmp / "worker.log", extra_env=exception_keys_env())
        gov.start_worker(OPEN_POOL, log=tmp / "worker-open.log", extra_env=exception_keys_env())
        try:
            asyncio.run(wait_final([c["id"] for c in cases.values()], timeout=180))
            for c in cases.values():
                c["first"] = asyncio.run(_observed(gov, c["id"]))
            # Phase 2: the flood, then the control's deployment again.
            asyncio.run(_flood())
            control = cases["control"]
            again = tmp / "marker-control-again"

            async def rerun() -> dict[str, Any]:
                run_id = await _run(control["deployment"], again)
                await wait_final([run_id], timeout=120)
                return await _observed(gov, run_id)

            control["again"] = asyncio.run(rerun())
            control["again_marker"] = again
            # ... and a run that is refused anyway, to see what the junk does to its record.
            star = cases["deployment named star"]

            async def refused_again() -> dict[str, Any]:
                run_id = await _run(star["deployment"], tmp / "marker-star-again")
                await wait_final([run_id], timeout=120)
                return await _observed(gov, run_id)

            star["again"] = asyncio.run(refused_again())
            copied = cases["copied under another name"]

            async def copied_again() -> dict[str, Any]:
                run_id = await _run(copied["deployment"], tmp / "marker-copy-again")
                await wait_final([run_id], timeout=120)
                return await _observed(gov, run_id)

            copied["again"] = asyncio.run(copied_again())
            control["events"] = asyncio.run(_events(control["id"]))
        finally:
            gov.stop_workers()
        yield cases
        assert gov.store.verify() == []


def _refused(observed: dict[str, Any], marker: Path) -> None:
    run, decision = observed["run"], observed["decision"]
    assert not marker.exists(), "the run executed"
    assert run.state.is_cancelled() and run.state.name == "Refused", run.state
    assert decision is not None and decision.verdict == "refused"
    assert decision.payload.get("waived", []) == []


def test_control_an_exception_for_this_deployment_waives_its_deny(decided):
    c = decided["control"]
    assert c["marker"].read_text().count("loaded 500 rows") == 1
    decision = c["first"]["decision"]
    assert decision.verdict == "allowed"
    assert [w["exception"] for w in decision.payload["waived"]] == ["zz-xo-control"]


def test_a_run_with_another_flows_id_is_not_waived_as_that_flows_deployment(decided):
    c = decided["flow id of another flow"]
    decision = c["first"]["decision"]
    if decision is not None:  # what the lineage says ran
        envelope = decision.payload["envelope"] or {}
        print("lineage:", envelope.get("flow"), envelope.get("deployment"), decision.verdict)
        print("waived:", decision.payload.get("waived"))
    _refused(c["first"], c["marker"])


@pytest.mark.parametrize("slug", ["star", "uuid", "case"])
def test_a_deployment_name_chosen_to_look_like_the_scope_waives_nothing(decided, slug):
    c = decided[f"deployment named {slug}"]
    _refused(c["first"], c["marker"])
    assert 'parameter "rows" is 500' in c["first"]["run"].state.message


def test_a_revoked_exception_saved_under_another_block_name_waives_nothing(decided):
    c = decided["copied under another name"]
    _refused(c["first"], c["marker"])
    rejected = c["first"]["decision"].payload["rejected_exceptions"]
    assert any("xo-copy-again" in r for r in rejected), rejected


def test_a_message_pattern_waives_only_the_message_it_spells(decided):
    c = decided["message pattern matched inside the message"]
    _refused(c["first"], c["marker"])


@pytest.mark.xfail(
    strict=True,
    reason=(
        "OPEN: the worker leaves governance.waived / governance.exceptions labels the run "
        "was created with when it writes its decision's labels: an allowed run no exception "
        "waived shows 'governance.waived=3, governance.exceptions=xo-nothing' while its "
        "decision has waived=[]"
    ),
)
def test_a_run_created_with_waiver_labels_does_not_show_them(decided):
    c = decided["planted waiver labels"]
    run, decision = c["first"]["run"], c["first"]["decision"]
    assert c["marker"].exists() and decision.verdict == "allowed"
    assert decision.payload["waived"] == []
    assert "governance.waived" not in run.labels, run.labels
    assert "governance.exceptions" not in run.labels, run.labels


def test_a_flood_of_junk_exception_blocks_does_not_hide_a_valid_one(decided):
    c = decided["control"]
    again = c["again"]
    assert again["decision"] is not None
    assert c["again_marker"].exists(), again["run"].state
    assert [w["exception"] for w in again["decision"].payload["waived"]] == ["zz-xo-control"]


def test_a_flood_of_junk_blocks_does_not_swamp_a_refused_runs_record(decided):
    again = decided["deployment named star"]["again"]
    _refused(again, decided["deployment named star"]["marker"].with_name("marker-star-again"))
    rejected = again["decision"].payload["rejected_exceptions"]
    message = again["run"].state.message
    print(f"rejected: {len(rejected)}, state message: {len(message)} chars")
    assert len(message) < 20_000, f"{len(rejected)} rejected exceptions in the message"


def test_a_run_with_another_flows_id_does_not_borrow_an_agent_bound_to_that_flow(decided):
    own = decided["agent bound: the attacker's own run"]
    _refused(own["first"], own["marker"])  # the control: not bound
    c = decided["agent bound: flow id of another flow"]
    assert not c["marker"].exists(), "the run executed"
    assert c["first"]["run"].state.name == "Refused", c["first"]["run"].state


@pytest.mark.xfail(
    strict=True,
    reason=(
        "OPEN (documented only for deletion): an exception narrowed by re-applying it is "
        "widened again by any API client who kept the older signed data: no version or "
        "rollback check as agents have (`version`, the last decided version)"
    ),
)
def test_an_exception_narrowed_by_the_security_team_cannot_be_rolled_back(decided):
    c = decided["narrowed, then the older version saved back"]
    _refused(c["first"], c["marker"])


def test_the_event_of_a_waived_run_names_the_exception(decided):
    events = [
        e
        for e in decided["control"]["events"]
        if e["event"] == "prefect-governance.decision.allowed"
    ]
    assert events, decided["control"]["events"]
    assert "zz-xo-control" in json.dumps(events[0]["payload"]), events[0]["payload"]


def test_a_flood_of_junk_blocks_does_not_hide_why_a_tampered_exception_was_rejected(decided):
    c = decided["copied under another name"]
    again = c["again"]
    _refused(again, c["marker"].with_name("marker-copy-again"))
    rejected = again["decision"].payload["rejected_exceptions"]
    assert any("xo-copy-again" in r for r in rejected), rejected[-3:]


def test_a_pattern_re2_rejects_does_not_let_a_run_skip_its_other_denies(decided):
    alone = decided["RE2-invalid pattern: ungranted capability alone"]
    _refused(alone["first"], alone["marker"])  # the control: the capability deny holds
    assert 'capability "delete:warehouse" is not granted' in alone["first"]["run"].state.message
    c = decided["RE2-invalid pattern: ungranted capability and 500 rows"]
    decision = c["first"]["decision"]
    print(
        "verdict:",
        decision.verdict if decision else None,
        decision.payload["error"] if decision else "",
    )
    _refused(c["first"], c["marker"])
