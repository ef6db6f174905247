"""The agent's posture inside a run: trust and memory moved by each governed task (pure).

Each governed task's end moves the posture with the agent's trust weights: its outcome
(completed, failed, crashed, refused, memory_rejected) and, if a capability was blocked
inside it, ``capability_blocked``. The window is the last k scores, continuing from the
agent's history before the run. A task's memory proposal (a JSON merge patch, RFC 7386)
applies to the run's memory when the result satisfies the agent's memory schema.

The run moves its posture with these functions as its tasks end
(``runtime.posture``); after the run the worker recomputes it from the run's
authenticated reports with the same functions, and keeps its own.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from prefect_governance.core.canonical import sha256_of
from prefect_governance.core.models import MemorySnapshot, TaskPosture, TrustState
from prefect_governance.core.trust import next_score, slope

TaskOutcome = Literal["completed", "failed", "crashed", "refused", "memory_rejected"]
OUTCOMES: tuple[TaskOutcome, ...] = ("completed", "failed", "crashed", "refused", "memory_rejected")


def merge_patch(document: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(document) if isinstance(document, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def schema_errors(content: Any, schema: dict[str, Any]) -> list[str]:
    """Why a document does not satisfy a JSON Schema (empty when it does)."""
    try:
        validator = Draft202012Validator(schema)
        errors = sorted(validator.iter_errors(content), key=lambda e: list(e.absolute_path))
    except SchemaError as exc:
        return [f"the agent's memory schema is invalid: {exc.message}"]
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}" for e in errors]


def start_posture(
    trust: TrustState, memory: MemorySnapshot, *, schema_hash: str, k: int
) -> TaskPosture:
    """The posture the run's first governed task inherits: the agent's as decided."""
    window = list(trust.window[-k:])
    return TaskPosture(
        score=trust.score,
        slope=slope(window),
        window=window,
        k=k,
        tasks=0,
        memory_version=memory.version,
        memory_hash=sha256_of(memory.content),
        schema_hash=schema_hash,
    )


def task_events(outcome: str, *, blocked: bool) -> list[str]:
    """The trust events of one task's end (each outcome is one of core.trust's events)."""
    if outcome not in OUTCOMES:
        raise ValueError(f"not a task outcome: {outcome!r}")
    return [outcome, "capability_blocked"] if blocked else [outcome]


def after_task(
    posture: TaskPosture,
    events: Sequence[str],
    weights: dict[str, float],
    *,
    memory: Any = None,
    applied: bool = False,
) -> TaskPosture:
    """The posture after one task's end; ``applied``: its proposal applied, and ``memory``
    is the run's memory content now."""
    score = next_score(posture.score, events, weights)
    window = [*posture.window, score][-posture.k :]
    update: dict[str, Any] = {
        "score": score,
        "window": window,
        "slope": slope(window),
        "tasks": posture.tasks + 1,
    }
    if applied:
        update["memory_version"] = posture.memory_version + 1
        update["memory_hash"] = sha256_of(memory)
    return posture.model_copy(update=update)


def proposed_fields(patch: Any) -> list[str]:
    """The top-level memory fields a merge patch writes (or deletes)."""
    return sorted(patch) if isinstance(patch, dict) else []


def apply_proposal(content: Any, patch: Any, schema: dict[str, Any]) -> tuple[Any, list[str]]:
    """The memory after a proposal and why it breaks the schema (empty: it applies)."""
    if not isinstance(patch, dict):
        return content, ["a memory proposal is a JSON object (a merge patch)"]
    after = merge_patch(content, patch)
    return after, schema_errors(after, schema)
