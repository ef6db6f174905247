"""Trust and memory are exact under concurrency (issue 15, 4), on SQLite and PostgreSQL.

The trust update of a refusal used to be computed from the latest score before the
append's transaction, so refusals recorded at once each started from the same score
and the agent was charged once; the memory of a run was committed before, and apart
from, the outcome record, so a worker and a reconciler settling the same run could
both commit it. Both are now computed inside the append's transaction, under the
agent chain's lock, after the once-per-decision check.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid

import pytest

from prefect_governance.core.decision import worker_refusal
from prefect_governance.core.models import Decision, MemorySnapshot
from prefect_governance.core.settings import GovernanceSettings
from prefect_governance.core.trust import TrustWeights
from prefect_governance.lineage.memory import MemoryStore
from prefect_governance.worker.blocks import GovernanceAgent
from prefect_governance.worker.governor import Assessment, Governor, trust_history

REFUSALS = 10
WORKERS = 2  # governors, each with its own store (connection pool, caches), as workers


def _agent() -> GovernanceAgent:
    return GovernanceAgent(
        id=f"exact-{uuid.uuid4().hex[:8]}",
        owner="sec@example.com",
        trust_scope=["pool"],
        capabilities=["read:warehouse"],
        trust_weights=TrustWeights(refused=-0.04, completed=0.01),
        memory_schema={"type": "object", "properties": {"seen": {"type": "integer"}}},
    )


def _governors(url: str) -> list[Governor]:
    return [Governor(GovernanceSettings(lineage_url=url)) for _ in range(WORKERS)]


async def _stores(governors: list[Governor]):
    return [await g.lineage(None, client=None) for g in governors]  # type: ignore[arg-type]


def test_concurrent_refusals_charge_trust_once_each(lineage_url):
    url = lineage_url
    agent = _agent()
    governors = _governors(url)

    async def refuse_all():
        stores = await _stores(governors)
        refusals = [
            Assessment(
                worker_refusal("no", policy_path="p", mode="enforce", fail_mode="closed"),
                agent=agent,
            )
            for _ in range(REFUSALS)
        ]
        await asyncio.gather(
            *(
                governors[i % WORKERS].record_decision(stores[i % WORKERS], a, f"run-{i}")
                for i, a in enumerate(refusals)
            )
        )
        return stores[0]

    store = asyncio.run(refuse_all())
    try:
        trust = [e for e in store.chain(agent.id) if e.kind == "trust"]
        assert len(trust) == REFUSALS
        assert trust[0].payload["previous"] == agent.trust_baseline
        for before, after in itertools.pairwise(trust):
            assert after.payload["previous"] == before.payload["score"], "an update was lost"
        assert trust[-1].payload["score"] == pytest.approx(1.0 - REFUSALS * 0.04)
        assert trust_history(store, agent.id, 100)[-1] == trust[-1].payload["score"]
        assert store.decision_counts(agent.id) == (REFUSALS, REFUSALS)
        assert store.verify() == [] and store.unvouched(agent.id) == []
    finally:
        for g in governors:
            asyncio.run(g.aclose())


def test_a_worker_and_a_reconciler_settling_one_run_commit_its_memory_once(lineage_url):
    url = lineage_url
    agent = _agent()
    governors = _governors(url)
    decision = Decision(
        id=str(uuid.uuid4()),
        verdict="allowed",
        allow=True,
        engine="embedded",
        policy_path="p",
        mode="enforce",
    )
    assessment = Assessment(decision, agent=agent, memory=MemorySnapshot())
    proposals = [{"patch": {"seen": 1}, "base_version": 0, "decision_id": decision.id}]

    async def settle_twice():
        stores = await _stores(governors)
        await governors[0].record_decision(stores[0], assessment, "run-1")
        return stores[0], await asyncio.gather(
            *(
                g.record_run_end(s, assessment, "run-1", "COMPLETED", proposals=proposals)
                for g, s in zip(governors, stores, strict=True)
            )
        )

    store, appended = asyncio.run(settle_twice())
    try:
        assert sorted(appended) == [False, True], "exactly one settler records the run"
        history = MemoryStore(store.engine).history(agent.id)
        assert [(m.version, m.content) for m in history] == [(1, {"seen": 1})]
        kinds = [e.kind for e in store.chain(agent.id)]
        assert kinds == ["decision", "outcome", "memory_commit", "trust"], kinds
        assert store.verify() == [] and store.unvouched(agent.id) == []
    finally:
        for g in governors:
            asyncio.run(g.aclose())
