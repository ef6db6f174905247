"""prefect-governance: every Prefect flow run decided by Rego policy before it executes,
and every governed task inside it before its body runs.

Names are imported on first use, so that an entry point that needs little (the
run-side gate, ``python -m prefect_governance.gate``) does not pay for the rest.
Prefect finds the worker type through the ``prefect.collections`` entry point,
which names ``prefect_governance.worker``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefect_governance.core.errors import GovernanceError
    from prefect_governance.runtime import current_agent, current_envelope, propose_memory
    from prefect_governance.runtime.capabilities import (
        CapabilityDenied,
        aload_block,
        capability,
        load_block,
    )
    from prefect_governance.runtime.posture import MemoryRejected, current_memory, current_posture
    from prefect_governance.runtime.tasks import TaskRefused, govern, governed
    from prefect_governance.worker.blocks import (
        GovernanceAgent,
        GovernanceLineageStore,
        GovernancePolicyEngine,
    )
    from prefect_governance.worker.process import GovernedProcessWorker

_HOME = {
    "GovernanceError": "core.errors",
    "GovernanceAgent": "worker.blocks",
    "GovernanceLineageStore": "worker.blocks",
    "GovernancePolicyEngine": "worker.blocks",
    "CapabilityDenied": "runtime.capabilities",
    "aload_block": "runtime.capabilities",
    "capability": "runtime.capabilities",
    "load_block": "runtime.capabilities",
    "current_agent": "runtime",
    "current_envelope": "runtime",
    "propose_memory": "runtime",
    "MemoryRejected": "runtime.posture",
    "current_memory": "runtime.posture",
    "current_posture": "runtime.posture",
    "TaskRefused": "runtime.tasks",
    "govern": "runtime.tasks",
    "governed": "runtime.tasks",
    "GovernedProcessWorker": "worker.process",
}
__all__ = [
    "CapabilityDenied",
    "GovernanceAgent",
    "GovernanceError",
    "GovernanceLineageStore",
    "GovernancePolicyEngine",
    "GovernedProcessWorker",
    "MemoryRejected",
    "TaskRefused",
    "aload_block",
    "capability",
    "current_agent",
    "current_envelope",
    "current_memory",
    "current_posture",
    "govern",
    "governed",
    "load_block",
    "propose_memory",
]
# The one place the version is written: pyproject.toml reads it (setuptools dynamic
# metadata), and tests/test_version.py checks the copies in the deployment files.
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'prefect_governance' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"prefect_governance.{_HOME[name]}"), name)
    globals()[name] = value
    return value
