"""Policy engines: the embedded Rego engine (default) and the OPA sidecar, and the one
place either is built."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect_governance.core.engines.base import EngineAnswer, EngineError, PolicyEngine
from prefect_governance.core.engines.embedded import EmbeddedEngine
from prefect_governance.core.engines.opa import OpaEngine
from prefect_governance.core.models import EngineRef

__all__ = [
    "EmbeddedEngine",
    "EngineAnswer",
    "EngineError",
    "OpaEngine",
    "PolicyEngine",
    "build_engine",
]


def build_engine(
    ref: EngineRef,
    *,
    token: str | None = None,
    client_cert: str | None = None,
    client_key: str | None = None,
    breaker_failures: int = 3,
    breaker_reset_seconds: float = 30.0,
) -> PolicyEngine:
    """The engine a reference describes (the one a grant carries, so a run decides its
    tasks as the worker did), with the credentials only the worker holds.

    An embedded engine without a directory uses the packaged policy library; ValueError
    for an OPA engine without a URL.
    """
    tuning: dict[str, Any] = {} if ref.timeout is None else {"timeout": ref.timeout}
    if ref.kind == "embedded":
        from prefect_governance.core.settings import packaged_policy_dir

        policy_dir = Path(ref.policy_dir) if ref.policy_dir else packaged_policy_dir()
        return EmbeddedEngine(policy_dir, **tuning)
    if not ref.url:
        raise ValueError("a policy engine of kind 'opa' needs opa_url")
    if ref.retries is not None:
        tuning["retries"] = ref.retries
    return OpaEngine(
        ref.url,
        token=token,
        ca_cert=ref.ca_cert,
        client_cert=client_cert,
        client_key=client_key,
        breaker_failures=breaker_failures,
        breaker_reset_seconds=breaker_reset_seconds,
        **tuning,
    )
