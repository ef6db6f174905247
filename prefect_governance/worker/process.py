"""The ``governed-process`` worker: Prefect's process worker with a policy gate.

Every flow run is decided before its process starts. A refused run never
starts: it ends CANCELLED with the state name ``Refused``. An allowed run is
labelled, carries a decision artifact, and runs exactly as under the stock
process worker, through the gate; its outcome is written to the lineage.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import anyio.abc
from prefect.utilities.processutils import command_to_string, get_sys_executable
from prefect.workers.process import (
    ProcessJobConfiguration,
    ProcessVariables,
    ProcessWorker,
    ProcessWorkerResult,
)

from prefect_governance.core.controls import GovernedVariables
from prefect_governance.core.infrastructure import process_infrastructure
from prefect_governance.core.settings import WORKER_SECRETS
from prefect_governance.worker.base import GovernedJobConfiguration, GovernedWorker, gate_template
from prefect_governance.worker.launch import (
    gate_argv,
    gate_environment,
    is_current_gate,
    uses_gate,
)

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

    from prefect_governance.core.models import Infrastructure
    from prefect_governance.worker.governor import Admission


class GovernedProcessJobConfiguration(GovernedJobConfiguration, ProcessJobConfiguration):
    pass


# Prefect's process variables and the governed ones (no docstring: it would become the
# description of the pool's variables schema).
class GovernedProcessVariables(ProcessVariables, GovernedVariables):
    pass


class GovernedProcessWorker(GovernedWorker, ProcessWorker):
    type = "governed-process"
    job_configuration = GovernedProcessJobConfiguration
    # mypy reads ProcessWorker's attribute as None (Prefect types it ProcessVariables | None)
    job_configuration_variables = GovernedProcessVariables  # type: ignore[assignment]

    _description = (
        "Execute flow runs as subprocesses, each one decided first by a Rego policy "
        "(embedded engine or OPA sidecar) and recorded in a lineage."
    )
    _display_name = "Governed Process"

    @classmethod
    def get_default_base_job_template(cls) -> dict[str, Any]:
        """Prefect's process template, with every run started through the governance gate."""
        return gate_template(super().get_default_base_job_template())

    async def run(  # type: ignore[override]  # Prefect builds it from job_configuration
        self,
        flow_run: FlowRun,
        configuration: GovernedProcessJobConfiguration,
        task_status: anyio.abc.TaskStatus[int] | None = None,
    ) -> ProcessWorkerResult:
        """Decide the run first; a refused run never starts, an allowed one runs through
        the gate as under the stock process worker, and how it ended is recorded."""
        return await self._governed_run(
            flow_run,
            configuration,
            task_status,
            super().run,
            refused=ProcessWorkerResult(status_code=0, identifier="refused"),
        )

    def _infrastructure(self, configuration: GovernedProcessJobConfiguration) -> Infrastructure:
        working_dir = configuration.working_dir
        return process_infrastructure(
            configuration.command, str(working_dir) if working_dir else None, configuration.env
        )

    def _hand_over(
        self,
        configuration: GovernedProcessJobConfiguration,
        admission: Admission,
        logger: Any,
    ) -> None:
        """Point the job at the gate, with the run's grant and none of the worker's secrets."""
        current_gate = is_current_gate(configuration.command)
        add = admission.run_environment()
        if uses_gate(configuration.command) and admission.trusted_key is not None:
            # The gate, hermetic, trusting only this worker's key; the run's environment and
            # working directory reach Prefect's engine only after the gate's checks.
            configuration.command = command_to_string(
                gate_argv(get_sys_executable(), admission.trusted_key)
            )
            configuration.env = gate_environment(
                configuration.env,
                os.environ,
                secrets=WORKER_SECRETS,
                add=add,
                working_dir=str(configuration.working_dir) if configuration.working_dir else None,
            )
            configuration.working_dir = None  # the gate starts in a fresh, empty directory
        else:
            for secret in WORKER_SECRETS:  # the worker's credentials never reach the run:
                configuration.env[secret] = None  # None unsets (Prefect merges os.environ)
            configuration.env.update(add)
        self._warn_if_stale_gate(current_gate, logger)
