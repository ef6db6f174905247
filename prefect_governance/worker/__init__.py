"""The governed worker: it decides each flow run before anything starts (holds credentials).

Prefect finds the ``governed-process`` worker type, and the package's blocks,
through the ``prefect.collections`` entry point, which names this package; the
``governed-docker`` type too where prefect-docker is installed (``[docker]`` extra), and
``governed-kubernetes`` where prefect-kubernetes is (``[kubernetes]`` extra).
"""

from importlib import import_module

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


def _optional(module: str, name: str, extra: str) -> None:
    """Import (so register) a worker type whose Prefect collection is an optional extra."""
    try:
        globals()[name] = getattr(import_module(f"{__name__}.{module}"), name)
    except ModuleNotFoundError as missing:  # prefect-governance[extra] is not installed
        if missing.name is None or missing.name.split(".")[0] != extra:
            raise
    else:
        __all__.append(name)


_optional("docker", "GovernedDockerWorker", "prefect_docker")
_optional("kubernetes", "GovernedKubernetesWorker", "prefect_kubernetes")
