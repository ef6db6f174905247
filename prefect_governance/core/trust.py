"""Trust: a score in [0, 1] per agent, moved by what its runs do, and its slope.

One trust update per run: the weights of the run's events are summed and the
score is clamped to [0, 1]. The window is the scores after the last k runs,
oldest first; the slope is the least-squares slope over it (per run).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict

from prefect_governance.core.models import TrustState

TrustEvent = Literal[
    "completed", "failed", "crashed", "refused", "warned", "memory_rejected", "capability_blocked"
]

# Weights added after the first signed agents: unset (None) in the block so that an agent
# signed before them still verifies (core.attestation), with these values.
NEWER_WEIGHTS: dict[str, float] = {"capability_blocked": -0.10}


class TrustWeights(BaseModel):
    """How much each kind of event moves the score (the agent object may override)."""

    model_config = ConfigDict(extra="forbid")

    completed: float = 0.02
    failed: float = -0.10
    crashed: float = -0.15
    refused: float = -0.20
    warned: float = -0.05
    memory_rejected: float = -0.15
    capability_blocked: float | None = None  # a blocked capability use (None: -0.10)

    def of(self, event: str) -> float:
        """The weight of one event."""
        value = getattr(self, event)
        return NEWER_WEIGHTS[event] if value is None else float(value)

    def effective(self) -> dict[str, float]:
        """Every weight, as the run's grant carries them."""
        return {name: self.of(name) for name in type(self).model_fields}


def next_score(
    score: float, events: Iterable[TrustEvent | str], weights: TrustWeights | dict[str, float]
) -> float:
    """The score after one run (or task) with these events."""
    if isinstance(weights, dict):
        moved = score + sum(weights[event] for event in events)
    else:
        moved = score + sum(weights.of(event) for event in events)
    return round(min(1.0, max(0.0, moved)), 6)


def slope(window: Sequence[float]) -> float:
    """Least-squares slope of the scores per run (0 for fewer than two)."""
    n = len(window)
    if n < 2:
        return 0.0
    mean_x = (n - 1) / 2
    mean_y = sum(window) / n
    num = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(window))
    den = sum((x - mean_x) ** 2 for x in range(n))
    return round(num / den, 6)


def trust_state(
    history: Sequence[float], *, baseline: float, runs: int, refusals: int, k: int
) -> TrustState:
    """What the policy sees: the current score, the last k scores and their slope."""
    window = list(history[-k:]) if k > 0 else []
    return TrustState(
        score=history[-1] if history else baseline,
        slope=slope(window),
        window=window,
        runs=runs,
        refusals=refusals,
    )


def run_events(
    *, verdict: str, state: str | None, warned: bool, memory_rejected: bool
) -> list[TrustEvent]:
    """The trust events of one run, from its decision and how it ended."""
    if verdict == "refused":
        return ["refused"]
    events: list[TrustEvent] = []
    outcome = {"COMPLETED": "completed", "FAILED": "failed", "CRASHED": "crashed"}.get(state or "")
    if outcome:
        events.append(outcome)  # type: ignore[arg-type]
    if warned or verdict == "audited":
        events.append("warned")
    if memory_rejected:
        events.append("memory_rejected")
    return events
