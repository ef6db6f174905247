"""Flows whose own code attacks the lineage (deployed by tests/attacks/test_lineage.py).

The run's process shares the worker's OS user and Prefect home, so it can open the
default SQLite lineage and write anything, with this package's own code: what it
cannot do is sign, because the worker keeps its lineage key from its runs.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

from prefect import flow

from prefect_governance.lineage.events import LineageEvent
from prefect_governance.lineage.store import LineageStore, event_hash
from prefect_governance.runtime import current_agent


@flow
def forge_lineage(marker: str, forge: bool = True) -> None:
    """Append forged trust records for this run's agent and rewrite its chain head."""
    agent = current_agent().id
    path = Path(os.environ["PREFECT_HOME"]) / "governance" / "lineage.db"
    store = LineageStore(f"sqlite:///{path}")
    seen = {
        "lineage_key_in_env": "PREFECT_GOVERNANCE_LINEAGE_KEY" in os.environ,
        "can_sign": store.signer is not None,
    }
    if forge:
        perfect = {"score": 1.0, "previous": 0.0, "events": ["completed"]}
        # 1. Appended with the package's own code: chained, hashed, the head moved on.
        store.append(LineageEvent(kind="trust", agent_id=agent, payload=perfect))
        newest = store.chain(agent)[-1]
        vouched = [e for e in store.chain(agent) if e.signature]
        # 2. One more, written around the store (the head left behind), wearing the
        # signature of a record the worker wrote.
        forged = LineageEvent(
            kind="trust",
            agent_id=agent,
            payload=perfect,
            chain=agent,
            seq=(newest.seq or 0) + 1,
            prev_hash=newest.hash,
        )
        forged.hash = event_hash(forged)
        row = forged.model_dump(exclude={"id"})
        row["signature"] = vouched[-1].signature
        row["created_at"] = row["created_at"].strftime("%Y-%m-%d %H:%M:%S.%f")  # as stored
        for name in ("reasons", "warnings", "payload"):
            row[name] = json.dumps(row[name])
        with sqlite3.connect(path) as db:
            db.execute(
                f"INSERT INTO governance_event ({', '.join(row)}) "
                f"VALUES ({', '.join('?' * len(row))})",
                list(row.values()),
            )
            # 3. The chain's counts rewritten: no refusals, many runs.
            db.execute(
                "UPDATE governance_chain_head SET decisions = 999, refusals = 0 WHERE chain = ?",
                (agent,),
            )
        seen["forged_seqs"] = [newest.seq, forged.seq]
    store.dispose()
    Path(marker).write_text(json.dumps(seen))
