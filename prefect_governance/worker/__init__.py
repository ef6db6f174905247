"""The governed worker: it decides each flow run before anything starts (holds credentials).

Prefect finds the ``governed-process`` worker type, and the package's blocks,
through the ``prefect.collections`` entry point, which names this package; the
``governed-docker`` type too where prefect-docker is installed (``[docker]`` extra).
"""

from importlib.util import find_spec

from prefect_governance.core.keys import GovernanceSigningKey, GovernanceVerifyKey
from prefect_governance.worker.blocks import (
    GovernanceAgent,
    GovernanceLineageStore,
    GovernancePolicyEngine,
)
from prefect_governance.worker.process import GovernedProcessWorker

if find_spec("prefect_docker") is not None:  # the optional extra: prefect-governance[docker]
    from prefect_governance.worker.docker import GovernedDockerWorker  # noqa: F401

__all__ = [
    "GovernanceAgent",
    "GovernanceLineageStore",
    "GovernancePolicyEngine",
    "GovernanceSigningKey",
    "GovernanceVerifyKey",
    "GovernedProcessWorker",
]
