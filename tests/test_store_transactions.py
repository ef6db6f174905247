"""How many transactions the worker's side of one allowed run commits (issue 17, 3).

Two: the decision, before anything runs, and what happened after (the run's reported
events, the outcome, the memory commit and the trust update, under the agent chain's
lock). A deployment's first run commits one more: its reference parameter schema.
"""

from __future__ import annotations

import asyncio
import collections
import uuid
from pathlib import Path

from sqlalchemy import event

from prefect_governance.core.models import Decision, MemorySnapshot
from prefect_governance.core.settings import GovernanceSettings
from prefect_governance.lineage.parameter_schemas import remembered_schema
from prefect_governance.worker.blocks import GovernanceAgent
from prefect_governance.worker.governor import (
    Assessment,
    Governor,
    agent_state,
    last_decided_version,
)


def test_one_allowed_run_commits_twice(tmp_path: Path):
    counts: collections.Counter[str] = collections.Counter()
    agent = GovernanceAgent(
        id="txn-agent",
        owner="o",
        trust_scope=["p"],
        capabilities=[],
        memory_schema={"type": "object"},
    )

    async def runs() -> list[dict[str, int]]:
        governor = Governor(GovernanceSettings(lineage_url=f"sqlite:///{tmp_path}/l.db"))
        store = await governor.lineage(None, client=None)  # type: ignore[arg-type]
        for engine in (store.engine, store._appender):
            for name in ("commit", "rollback"):
                event.listen(engine, name, lambda _c, name=name: counts.update([name]))
        seen = []
        for n in range(3):
            counts.clear()
            decision = Decision(
                id=str(uuid.uuid4()), verdict="allowed", allow=True, engine="e", policy_path="p"
            )
            assessment = Assessment(decision, agent=agent, memory=MemorySnapshot())
            run = f"run-{n}"
            # What the worker reads before it decides (ProcessWorker, Governor.assess) ...
            store.refusal_of(run)
            last_decided_version(store, agent.id)
            agent_state(store, store.memory, agent)
            remembered_schema(store.engine, "deployment", {"type": "object"})
            # ... and writes.
            await governor.record_decision(store, assessment, run)
            proposal = {"seq": 1, "patch": {"n": n}, "base_version": 0, "decision_id": decision.id}
            await governor.record_run_end(store, assessment, run, "COMPLETED", proposals=[proposal])
            seen.append(dict(counts))
        kinds = [e.kind for e in store.chain(agent.id)]
        assert kinds == ["decision", "outcome", "memory_commit", "trust"] * 3
        await governor.aclose()
        return seen

    first, *later = asyncio.run(runs())
    assert first["commit"] == 3  # the deployment's reference schema, first seen
    assert [c["commit"] for c in later] == [2, 2]
