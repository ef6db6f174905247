"""Attack: flow code writes the lineage it is recorded in (issue 15, 2).

A governed run's code shares the worker's OS user and Prefect home, so it can open
the default SQLite lineage and append to its own agent's chain with this package's
own code (chained and hashed: `lineage verify` used to say intact), write around the
store, and rewrite the chain's head. Against a real Prefect server and the real
governed worker, a run appends a perfect trust score, writes a second one wearing a
signature the worker made for another record, and rewrites the head's counts:

- the run's environment holds no lineage key, so it can sign nothing;
- `lineage verify` names both records as not vouched for (exit 1), and the worker
  wrote an ``unvouched`` record naming them before its next append;
- the agent's trust, its counts and the next run's trust update ignore them;
- the worker's next append is not blocked by the record written around the store.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from prefect_governance.cli.local import prefect_env
from prefect_governance.core.trust import TrustWeights
from prefect_governance.lineage.auth import UNVOUCHED
from prefect_governance.lineage.memory import MemoryStore
from prefect_governance.testing import wait_outcomes
from prefect_governance.worker.blocks import GovernanceAgent
from prefect_governance.worker.governor import agent_state, trust_history
from tests.agents import harness, signed_agent
from tests.attacks.support import home_lineage_url
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

POOL, AGENT = "attack-lineage", "lineage-forger"
CLI = [sys.executable, "-m", "prefect_governance.cli"]


def test_records_flow_code_writes_into_the_lineage_count_as_absent(prefect_server, tmp_path):
    agent = GovernanceAgent(
        id=AGENT,
        owner="sec@example.com",
        trust_scope=[POOL],
        capabilities=["read:warehouse"],
        trust_baseline=0.3,
        trust_weights=TrustWeights(completed=0.05),
    )
    forger, honest = tmp_path / "forger.json", tmp_path / "honest.json"
    # The pool names no store: the worker and the flow share the default one in the home.
    with harness(
        prefect_server, tmp_path, lineage_url=home_lineage_url(prefect_server.home)
    ) as gov:
        deployment = asyncio.run(
            gov.governed_pool(
                POOL,
                agent,
                job_variables={"capabilities": ["read:warehouse"]},
                flow_name="forge_lineage",
                deployment="lineage-forger",
                directory=ROOT / "tests" / "attacks" / "lineage_flows",
                lineage_store=None,
            )
        )
        gov.start_worker(POOL, log=tmp_path / "w.log")
        store = gov.store
        final = asyncio.run(gov.run(deployment, {"marker": str(forger)}))
        assert final.state.is_completed(), final.state
        asyncio.run(wait_outcomes(store, [final.id], timeout=60))
        final = asyncio.run(gov.run(deployment, {"marker": str(honest), "forge": False}))
        assert final.state.is_completed(), final.state
        asyncio.run(wait_outcomes(store, [final.id], timeout=60))
        gov.stop_workers()
        _assert_ignored(prefect_server, store, signed_agent(agent, AGENT), forger, honest)


def _assert_ignored(prefect_server, store, agent, forger, honest):
    seen = json.loads(forger.read_text())
    assert seen["lineage_key_in_env"] is False and seen["can_sign"] is False, seen
    forged = seen["forged_seqs"]

    # The chain is intact (the forger chained its records), but nobody vouches for them.
    assert store.verify() == []
    assert store.unvouched(AGENT) == [(forged[0], forged[1])]
    chain = store.chain(AGENT)
    marker = next(e for e in chain if e.kind == UNVOUCHED)
    assert (marker.payload["from_seq"], marker.payload["to_seq"]) == tuple(forged)
    assert store.vouched(marker) is not None, "the worker wrote the marker"
    assert marker.seq == forged[1] + 1, "the worker appended after the record written around"
    result = subprocess.run(
        [*CLI, "lineage", "verify"],
        capture_output=True,
        text=True,
        timeout=120,
        env=prefect_env(prefect_server.home, prefect_server.api_url),
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"NOT VOUCHED FOR (ignored): records {forged[0]}..{forged[1]}" in result.stdout

    # Trust, counts and the next run's update are the worker's own.
    scores = trust_history(store, AGENT, 100)
    assert 1.0 not in scores and len(scores) == 2, scores
    trust = [e for e in chain if e.kind == "trust" and store.vouched(e) is not None]
    assert trust[0].payload["previous"] == 0.3, "the run's own update began at the forged 1.0"
    assert trust[-1].payload["previous"] == trust[0].payload["score"], "the forged 1.0 was used"
    state, _ = agent_state(store, MemoryStore(store.engine), agent)
    assert state.score == pytest.approx(scores[-1]) and state.score < 1.0
    assert store.decision_counts(AGENT) == (2, 0)
    assert (state.runs, state.refusals) == (2, 0)
    assert json.loads(honest.read_text())["can_sign"] is False
