"""prefect-governance: every Prefect flow run decided by Rego policy before it executes,
and every governed task inside it before its body runs."""

from prefect_governance.blocks import (
    GovernanceAgent,
    GovernanceLineageStore,
    GovernancePolicyEngine,
)
from prefect_governance.capabilities import (
    CapabilityDenied,
    aload_block,
    capability,
    load_block,
)
from prefect_governance.runtime import current_agent, current_envelope, propose_memory
from prefect_governance.tasks import TaskRefused, govern, governed
from prefect_governance.worker import GovernedProcessWorker

__all__ = [
    "CapabilityDenied",
    "GovernanceAgent",
    "GovernanceLineageStore",
    "GovernancePolicyEngine",
    "GovernedProcessWorker",
    "TaskRefused",
    "aload_block",
    "capability",
    "current_agent",
    "current_envelope",
    "govern",
    "governed",
    "load_block",
    "propose_memory",
]
__version__ = "0.1.0"
