"""The one interface both policy engines implement."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

FailureKind = Literal["unreachable", "timeout", "http", "evaluation", "undefined", "shape"]


class EngineError(Exception):
    """The engine gave no usable answer. ``kind`` says why, for the refusal reason."""

    def __init__(self, kind: FailureKind, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


@dataclass(frozen=True)
class EngineAnswer:
    """The raw result document at the policy path, and where it came from."""

    result: Any
    decision_id: str | None = None
    revision: str | None = None


class PolicyEngine(Protocol):
    """Evaluate the document at a policy path (``a/b/c``) for one input."""

    name: str

    async def evaluate(self, policy_path: str, policy_input: dict[str, Any]) -> EngineAnswer:
        """Return the raw result; raise :class:`EngineError` when there is none."""
        ...

    async def aclose(self) -> None: ...
