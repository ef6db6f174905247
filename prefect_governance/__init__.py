"""prefect-governance: every Prefect flow run decided by Rego policy before it executes."""

from prefect_governance.blocks import (
    GovernanceAgent,
    GovernanceLineageStore,
    GovernancePolicyEngine,
)
from prefect_governance.worker import GovernedProcessWorker

__all__ = [
    "GovernanceAgent",
    "GovernanceLineageStore",
    "GovernancePolicyEngine",
    "GovernedProcessWorker",
]
__version__ = "0.1.0"
