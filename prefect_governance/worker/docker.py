"""The ``governed-docker`` worker: prefect-docker's Docker worker with a policy gate.

Install it with ``pip install 'prefect-governance[docker]'``. Every flow run is
decided before its container is created: a refused run creates no container and
ends CANCELLED named ``Refused``; an allowed run's container starts the gate
(``python -I -m prefect_governance.gate``, the image's ``python``) as its entrypoint,
whatever the job asks for, so an image without the package fails closed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio.abc
from prefect.utilities.processutils import command_to_string
from prefect_docker.worker import (
    DockerWorker,
    DockerWorkerJobConfiguration,
    DockerWorkerResult,
)

from prefect_governance.core.infrastructure import docker_infrastructure
from prefect_governance.core.settings import WORKER_SECRETS
from prefect_governance.worker.base import GovernedJobConfiguration, GovernedWorker, gate_template
from prefect_governance.worker.launch import gate_argv, is_current_gate

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

    from prefect_governance.core.models import Infrastructure
    from prefect_governance.worker.governor import Admission

# The interpreter of the run's image (python:3.11-slim's layout: `python` on PATH).
CONTAINER_PYTHON = "python"


# prefect-docker's job configuration is its variables too (it has no variables class), so
# the governed ones come with the mixin (no docstring: it would describe the pool's schema).
class GovernedDockerJobConfiguration(GovernedJobConfiguration, DockerWorkerJobConfiguration):
    pass


class GovernedDockerWorker(GovernedWorker, DockerWorker):
    type = "governed-docker"
    job_configuration = GovernedDockerJobConfiguration

    _description = (
        "Execute flow runs in Docker containers, each one decided first by a Rego policy "
        "(embedded engine or OPA sidecar) and recorded in a lineage."
    )
    _display_name = "Governed Docker"

    @classmethod
    def get_default_base_job_template(cls) -> dict[str, Any]:
        """prefect-docker's template, with every run started through the governance gate."""
        return gate_template(super().get_default_base_job_template())

    async def run(  # type: ignore[override]  # Prefect builds it from job_configuration
        self,
        flow_run: FlowRun,
        configuration: GovernedDockerJobConfiguration,
        task_status: anyio.abc.TaskStatus[str] | None = None,
    ) -> DockerWorkerResult:
        """Decide the run first; a refused run creates no container, an allowed one runs
        in its container through the gate, and how it ended is recorded."""
        return await self._governed_run(
            flow_run,
            configuration,
            task_status,
            super().run,  # type: ignore[safe-super]  # prefect-docker is untyped: Any to mypy
            refused=DockerWorkerResult(status_code=0, identifier="refused"),
        )

    def _hand_over(
        self,
        configuration: GovernedDockerJobConfiguration,
        admission: Admission,
        logger: Any,
    ) -> None:
        """The container starts the gate, trusting only this worker's key, with the run's
        grant in its environment and none of the worker's secrets.

        The gate is the container's entrypoint and its only command: neither the image's
        entrypoint nor the job's ``container_create_kwargs`` can start something else
        first. No trusted key (nothing to trust) starts an unstartable command instead.
        """
        self._warn_if_stale_gate(is_current_gate(configuration.command), logger)
        env = {k: v for k, v in configuration.env.items() if k not in WORKER_SECRETS}
        env.update(admission.run_environment())
        configuration.env = env
        key = admission.trusted_key
        argv = gate_argv(CONTAINER_PYTHON, key) if key else ["/dev/null/no-trusted-key"]
        kwargs = dict(configuration.container_create_kwargs or {})
        kwargs["entrypoint"] = argv
        configuration.container_create_kwargs = kwargs
        # `command` is a field of the configuration: prefect-docker never lets
        # container_create_kwargs replace it; empty, the entrypoint is the whole command.
        configuration.command = command_to_string([])

    def _infrastructure(self, configuration: GovernedDockerJobConfiguration) -> Infrastructure:
        """What the container would be (image, privileges, mounts, network, limits and
        every ``container_create_kwargs`` key), for the policy."""
        return docker_infrastructure(configuration.model_dump())
