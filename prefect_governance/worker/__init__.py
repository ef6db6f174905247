"""The governed worker: it decides each flow run before anything starts (holds credentials).

Prefect finds the ``governed-process`` worker type, and the package's blocks,
through the ``prefect.collections`` entry point, which names this package; the
``governed-kubernetes`` type too where prefect-kubernetes is installed (the
``kubernetes`` extra).
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

try:  # registers the governed-kubernetes type, where its extra is installed
    from prefect_governance.worker.kubernetes import GovernedKubernetesWorker
except ModuleNotFoundError as missing:
    if missing.name != "prefect_kubernetes":
        raise
else:
    __all__ += ["GovernedKubernetesWorker"]
