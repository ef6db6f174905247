"""The governed worker: it decides each flow run before anything starts (holds credentials).

Prefect finds the ``governed-process`` worker type, and the package's blocks,
through the ``prefect.collections`` entry point, which names this package.
"""

from prefect_governance.core.keys import GovernanceSigningKey, GovernanceVerifyKey
from prefect_governance.worker.blocks import (
    GovernanceAgent,
    GovernanceLineageStore,
    GovernancePolicyEngine,
)
from prefect_governance.worker.process import GovernedProcessWorker

__all__ = [
    "GovernanceAgent",
    "GovernanceLineageStore",
    "GovernancePolicyEngine",
    "GovernanceSigningKey",
    "GovernanceVerifyKey",
    "GovernedProcessWorker",
]
