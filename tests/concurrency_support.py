"""The flow the concurrency test deploys: leave a marker, propose one memory entry.

Kept free of test imports: the flow run's own process loads this file.
"""

from __future__ import annotations

from prefect import flow

# Each run adds its own key under "runs": merge patches (RFC 7386) merge objects, so a
# commit re-based on a newer version keeps every earlier run's key. A lost update
# would show as a missing key.
MEMORY_SCHEMA = {
    "type": "object",
    "properties": {"runs": {"type": "object", "additionalProperties": {"const": True}}},
    "additionalProperties": False,
}


@flow
def counted_run(marker: str) -> str:
    """Append a line to the marker (one line per execution) and propose this run's key."""
    from prefect.runtime import flow_run

    from prefect_governance import runtime

    with open(marker, "a") as out:
        out.write("ran\n")
    runtime.propose_memory({"runs": {str(flow_run.id): True}})
    return str(flow_run.id)
