"""A circuit breaker for the OPA sidecar: stop waiting on an engine that is down.

After ``failures`` consecutive failed decisions (OPA unreachable, timing out or
answering 5xx) the circuit opens: decisions fail at once, without a request,
for ``reset_seconds``. Then one trial request is let through (half-open); if
OPA answers, the circuit closes, otherwise it opens again. Any answer from OPA
(a deny, an error document, a result of the wrong shape) shows OPA is there and
counts as a success here: the decision still fails on its own terms.

Pure logic: time comes from an injectable clock, I/O stays with the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

State = Literal["closed", "open", "half-open"]


class Breaker:
    """Consecutive-failure circuit breaker; ``failures=0`` turns it off."""

    def __init__(
        self,
        failures: int = 3,
        reset_seconds: float = 30.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        if failures < 0 or reset_seconds < 0:
            raise ValueError("breaker failures and reset seconds must not be negative")
        self.failures = failures
        self.reset_seconds = reset_seconds
        self._clock = clock
        self._count = 0
        self._last_error = ""
        self._opened_at: float | None = None
        self._trial = False

    @property
    def state(self) -> State:
        if self._opened_at is None:
            return "closed"
        return "half-open" if self._trial else "open"

    @property
    def consecutive_failures(self) -> int:
        return self._count

    def admit(self) -> str | None:
        """None if a request may go out now; otherwise why not (the circuit is open)."""
        if self._opened_at is None:
            return None
        waited = self._clock() - self._opened_at
        if not self._trial and waited >= self.reset_seconds:
            self._trial = True  # half-open: this caller is the one trial
            return None
        wait = (
            "a trial request is in flight"
            if self._trial
            else (f"next trial in {self.reset_seconds - waited:.1f}s")
        )
        return (
            f"policy engine unavailable (circuit open for {self.reset_seconds:g}s after "
            f"{self._count} failures, {wait}: {self._last_error})"
        )

    def success(self) -> None:
        """The engine answered: close the circuit."""
        self._count = 0
        self._opened_at = None
        self._trial = False

    def abandon(self) -> None:
        """A request ended with no verdict on OPA (cancelled): free the trial slot."""
        self._trial = False

    def failure(self, error: str) -> None:
        """The engine was unavailable; open the circuit at the threshold (or after a trial)."""
        self._count += 1
        self._last_error = error
        if self.failures and (self._trial or self._count >= self.failures):
            self._opened_at = self._clock()
        self._trial = False
