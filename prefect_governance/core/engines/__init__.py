"""Policy engines: the embedded Rego engine (default) and the OPA sidecar."""

from prefect_governance.core.engines.base import EngineAnswer, EngineError, PolicyEngine
from prefect_governance.core.engines.embedded import EmbeddedEngine
from prefect_governance.core.engines.opa import OpaEngine

__all__ = ["EmbeddedEngine", "EngineAnswer", "EngineError", "OpaEngine", "PolicyEngine"]
