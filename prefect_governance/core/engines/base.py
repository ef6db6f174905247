"""The one interface both policy engines implement."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from prefect_governance.core.errors import GovernanceError
from prefect_governance.core.models import EngineFailure, EngineRef

FailureKind = EngineFailure


# datetimes go through ``default`` (str), as with json.dumps(default=str).
_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def encode_input(policy_input: Any) -> bytes:
    """The policy input as JSON; a value JSON lacks is sent as its ``str()``.

    orjson (a tenth of json.dumps's time), falling back to json.dumps for what
    orjson refuses (keys that are not strings, integers beyond 64 bits).
    Non-finite floats become null; the worker refuses such parameters before
    any policy is asked.
    """
    try:
        return orjson.dumps(policy_input, default=str, option=_ORJSON_OPTIONS)
    except TypeError:
        return json.dumps(_finite(policy_input), default=str).encode()


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float as None, as orjson writes it (null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


class EngineError(GovernanceError):
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
    """Evaluate the document at a policy path (``a/b/c``) for one input.

    An in-process engine may also offer ``evaluate_sync`` (the same, without
    awaiting), which :func:`prefect_governance.core.decision.decide` calls directly.
    """

    name: str

    async def evaluate(self, policy_path: str, policy_input: dict[str, Any]) -> EngineAnswer:
        """Return the raw result; raise :class:`EngineError` when there is none."""
        ...

    def reference(self) -> EngineRef:
        """How a governed run's process reaches this engine (no credentials)."""
        ...

    async def aclose(self) -> None: ...
