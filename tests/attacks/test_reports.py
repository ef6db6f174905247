"""Attack: forged reports from inside a run (issue 15, 3).

Any Prefect API client can create artifacts on any flow run, and whatever runs in
the run's process can patch its own runtime. Against a real Prefect server and the
real governed worker (its lineage key set, so the test can make a MAC with another
run's secret as an insider who learnt it would):

- while a run waits on a file, another API client creates ``governance-run-events``
  and ``governance-memory-proposal`` artifacts for it: without a MAC, with a MAC made
  with another run's secret, and a copy of another run's authentic report. Memory
  gets only the run's own proposal, no forged capability use enters the lineage, and
  a ``report_problem`` names each forged artifact;
- a run that appends ``delete:warehouse`` to its verified grant in-process and uses
  it (in the flow body and in a task declaring it) gets ``flagged`` capability uses
  and a ``report_problem``, never a ``used``;
- the legitimate run's own reports and memory proposal still count.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from prefect import get_client
from prefect.client.schemas.actions import ArtifactCreate

from prefect_governance.core.handoff import PROPOSAL_KEY, RUN_EVENTS_KEY
from prefect_governance.core.reports import report_secret
from prefect_governance.core.signing import SigningKey
from prefect_governance.lineage.memory import MemoryStore
from prefect_governance.runtime.run_log import sealed
from prefect_governance.testing import wait_final, wait_outcomes
from prefect_governance.worker.blocks import GovernanceAgent
from prefect_governance.worker.governor import report_root
from prefect_governance.worker.run_reports import read_artifacts
from tests.agents import harness
from tests.attacks.support import home_lineage_url

pytestmark = pytest.mark.e2e

POOL, AGENT = "attack-reports", "reports-agent"
LINEAGE_SEED = "cmVwb3J0cy10ZXN0LWxpbmVhZ2Uta2V5LXNlZWQtMDA"  # the worker's, in this test only

FLOWS = """
import time
from pathlib import Path

from prefect import flow

from prefect_governance import capability, governed, runtime


@governed(capabilities=["read:warehouse"])
def read_rows(marker: str) -> None:
    with capability("read:warehouse", use="read rows"):
        Path(marker).write_text("read")


@governed(capabilities=["delete:warehouse"])
def purge(marker: str) -> None:
    with capability("delete:warehouse", use="purge"):
        Path(marker).write_text("purged")


@flow
def reporter(marker_dir: str, release: str = "", patch_grants: bool = False) -> None:
    markers = Path(marker_dir)
    (markers / "started").write_text("")
    deadline = time.monotonic() + 120
    while release and not Path(release).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    if patch_grants:  # the run's own code grants itself what its signed grant lacks
        runtime.current_verified().grant.grants.append("delete:warehouse")
        with capability("delete:warehouse", use="drop everything"):
            (markers / "flow-delete").write_text("")
        purge(str(markers / "task-delete"), return_state=True)
    read_rows(str(markers / "read"))
    if not patch_grants:
        runtime.propose_memory({"note": "legit"})
"""


def _forged_use(seq: int) -> dict:
    return {
        "seq": seq,
        "kind": "capability_use",
        "time": "2026-12-01T00:00:00+00:00",
        "capability": "delete:warehouse",
        "use": "forged",
        "granted": True,
        "reason": None,
        "task": None,
    }


async def _forge(victim, victim_decision: str, other_decision: str, other_run) -> dict[str, str]:
    """Another API client's artifacts on the victim's run; their ids by what they try."""
    other_secret = report_secret(
        report_root(SigningKey.from_seed("lineage", LINEAGE_SEED)), other_decision
    )
    run = str(victim)
    forgeries = {
        "events without a MAC": (
            RUN_EVENTS_KEY,
            {"decision_id": victim_decision, "seq": [1, 1], "events": [_forged_use(1)]},
        ),
        "proposal without a MAC": (
            PROPOSAL_KEY,
            {"decision_id": victim_decision, "seq": 1, "patch": {"note": "attacker"}},
        ),
        "events with another run's secret": (
            RUN_EVENTS_KEY,
            sealed(
                other_secret,
                run,
                victim_decision,
                RUN_EVENTS_KEY,
                {"seq": [1, 1], "events": [_forged_use(1)]},
            ),
        ),
        "proposal with another run's secret": (
            PROPOSAL_KEY,
            sealed(other_secret, run, victim_decision, PROPOSAL_KEY, {"seq": 1, "patch": {"x": 1}}),
        ),
    }
    ids = {}
    async with get_client() as client:
        # A copy of the other run's authentic report, replayed onto the victim's run.
        (_, authentic), *_ = await read_artifacts(client, other_run, RUN_EVENTS_KEY)
        forgeries["another run's authentic report"] = (RUN_EVENTS_KEY, authentic)
        for what, (key, data) in forgeries.items():
            artifact = await client.create_artifact(
                ArtifactCreate(key=key, type="json", data=data, flow_run_id=victim)
            )
            ids[what] = str(artifact.id)
    return ids


def _wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def attacked(prefect_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reports")
    (tmp / "flows").mkdir()
    (tmp / "flows" / "flows.py").write_text(FLOWS)
    victim_dir, patcher_dir = tmp / "victim", tmp / "patcher"
    victim_dir.mkdir()
    patcher_dir.mkdir()
    release = tmp / "release"
    # The pool names no store: the worker keeps the default one in the home.
    gov = harness(prefect_server, tmp, lineage_url=home_lineage_url(prefect_server.home))

    async def setup():
        agent = GovernanceAgent(
            id=AGENT,
            owner="sec@example.com",
            trust_scope=[POOL],
            capabilities=["read:warehouse"],
        )
        deployment = await gov.governed_pool(
            POOL,
            agent,
            job_variables={"capabilities": ["read:warehouse"]},
            flow_name="reporter",
            deployment="reports-attack",
            directory=tmp / "flows",
            lineage_store=None,
        )
        async with get_client() as client:
            victim = await client.create_flow_run_from_deployment(
                deployment, parameters={"marker_dir": str(victim_dir), "release": str(release)}
            )
            patcher = await client.create_flow_run_from_deployment(
                deployment, parameters={"marker_dir": str(patcher_dir), "patch_grants": True}
            )
            return victim.id, patcher.id

    with gov:
        yield _attack(gov, asyncio.run(setup()), victim_dir, patcher_dir, release)


def _attack(gov, runs, victim_dir, patcher_dir, release):
    victim, patcher = runs
    tmp = gov.workdir
    store = gov.store
    gov.start_worker(
        POOL,
        log=tmp / "worker.log",
        extra_env={"PREFECT_GOVERNANCE_LINEAGE_KEY": LINEAGE_SEED},
    )
    try:
        patched = asyncio.run(wait_final([patcher], timeout=120))[patcher]
        # Its events leave as its process exits: settled by the worker, they are all there.
        asyncio.run(wait_outcomes(store, [patcher], timeout=60))
        _wait_for(victim_dir / "started", 60)  # the victim runs, waiting on the file

        async def decisions():
            async with get_client() as client:
                runs = [await client.read_flow_run(i) for i in (victim, patcher)]
            return [r.labels["governance.decision_id"] for r in runs]

        victim_decision, patcher_decision = asyncio.run(decisions())
        forged = asyncio.run(_forge(victim, victim_decision, patcher_decision, patcher))
        release.write_text("")
        final = asyncio.run(wait_final([victim], timeout=120))[victim]
        asyncio.run(wait_outcomes(store, [victim, patcher], timeout=60))
    finally:
        gov.stop_workers()
    chain = store.chain(AGENT)
    return {
        "victim": (final, [e for e in chain if e.flow_run_id == str(victim)], victim_dir),
        "patcher": (patched, [e for e in chain if e.flow_run_id == str(patcher)], patcher_dir),
        "forged": forged,
        "memory": MemoryStore(store.engine).latest(AGENT),
        "store": store,
        "ids": (victim, patcher),
        "decisions": (victim_decision, patcher_decision),
        "worker_log": tmp / "worker.log",
    }


def _of(events, kind):
    return [e for e in events if e.kind == kind]


def test_forged_reports_change_no_memory_and_no_capability_record(attacked):
    final, events, _ = attacked["victim"]
    assert final.state.is_completed(), final.state
    memory = attacked["memory"]
    assert (memory.version, memory.content) == (1, {"note": "legit"}), memory
    uses = _of(events, "capability_use")
    assert all(u.payload["capability"] != "delete:warehouse" for u in uses), uses
    assert all(u.payload.get("use") != "forged" for u in uses)
    assert _of(events, "memory_rejected") == []


def test_each_forged_artifact_is_named_in_a_report_problem(attacked):
    _, events, _ = attacked["victim"]
    (problem,) = _of(events, "report_problem")
    text = "\n".join(problem.reasons)
    for what, artifact_id in attacked["forged"].items():
        line = next((r for r in problem.reasons if artifact_id in r), None)
        assert line is not None, (what, text)
        assert line.startswith("rejected"), line
    assert "no MAC" in text


def test_a_mac_made_with_another_runs_secret_is_rejected(attacked):
    _, events, _ = attacked["victim"]
    (problem,) = _of(events, "report_problem")
    for what in (
        "events with another run's secret",
        "proposal with another run's secret",
        "another run's authentic report",
    ):
        line = next(r for r in problem.reasons if attacked["forged"][what] in r)
        assert "does not verify with this run's report secret" in line, line


def test_a_run_granting_itself_a_capability_gets_flagged_uses_never_used(attacked):
    final, events, markers = attacked["patcher"]
    assert final.state.is_completed(), final.state
    assert (markers / "flow-delete").exists(), "the patched runtime let the body use it"
    deletes = [
        u for u in _of(events, "capability_use") if u.payload["capability"] == "delete:warehouse"
    ]
    assert deletes, [(e.kind, e.verdict) for e in events]
    for use in deletes:
        assert use.verdict == "flagged" and use.allow is False, (use.verdict, use.payload)
        assert use.payload["check"]["verified"] is False
        assert "not among the run's signed grants" in use.payload["check"]["why"]
    (problem,) = _of(events, "report_problem")
    assert any("flagged" in r and "delete:warehouse" in r for r in problem.reasons), problem
    purge = [e for e in _of(events, "task_decision") if e.payload["task"]["name"] == "purge"]
    for decision in purge:  # admitted by the patched runtime: the worker's grant says no
        if decision.verdict == "allowed":
            assert decision.payload["check"]["verified"] is False, decision.payload["check"]


def test_a_legitimate_runs_reports_and_memory_still_count(attacked):
    _, events, markers = attacked["victim"]
    assert (markers / "read").exists()
    (use,) = _of(events, "capability_use")
    assert (use.payload["capability"], use.verdict) == ("read:warehouse", "used")
    assert use.payload["check"] == {"verified": True}
    (task,) = _of(events, "task_decision")
    assert task.verdict == "allowed" and task.payload["check"] == {"verified": True}
    (commit,) = _of(events, "memory_commit")
    assert commit.payload["version"] == 1
    _, patched, _ = attacked["patcher"]
    reads = [
        u for u in _of(patched, "capability_use") if u.payload["capability"] == "read:warehouse"
    ]
    assert [u.verdict for u in reads] == ["used"]
    assert attacked["store"].verify() == []


def test_the_report_secret_never_travels_through_the_api_or_the_logs(attacked):
    root = report_root(SigningKey.from_seed("lineage", LINEAGE_SEED))
    secrets = [report_secret(root, d) for d in attacked["decisions"]]

    async def visible():
        async with get_client() as client:
            seen = []
            for run_id in attacked["ids"]:
                seen.append((await client.read_flow_run(run_id)).model_dump_json())
                for key in (RUN_EVENTS_KEY, PROPOSAL_KEY, "governance-decision"):
                    seen.append(repr(await read_artifacts(client, run_id, key)))
            return "\n".join(seen)

    api = asyncio.run(visible())
    lineage = "\n".join(e.model_dump_json() for e in attacked["store"].chain(AGENT))
    log = attacked["worker_log"].read_text()
    for secret in secrets:
        assert secret not in api and secret not in lineage and secret not in log
