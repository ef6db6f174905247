"""The ``governed-kubernetes`` worker: prefect-kubernetes's worker with a policy gate.

Install it with ``pip install 'prefect-governance[kubernetes]'``. Every flow run is
decided before its Job exists: a refused run creates no Job and ends CANCELLED
(``Refused``). An allowed run's Job starts its container through the gate
(``python -I -m prefect_governance.gate --trusted-key ...``, the image's ``python``),
with the run's grant, decision id and report secret in its environment and none of the
worker's secrets. The pool's job manifest fixes the container's ``command`` to the
gate's unstartable path (``args`` empty): no deployment can replace it, and a stock
Kubernetes worker on the pool starts a container that cannot start.

Prefect's Kubernetes worker returns once the Job is created, so the run's outcome,
memory and trust are settled from Prefect's final state: this worker looks at the runs
it handed over on each poll and settles those that ended; a run it could not watch to
its end (the worker stopped) is settled by the reconciler of the pool's next worker.
The lineage records each outcome once per decision, whoever settles it.
"""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Any

import anyio.abc
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect_kubernetes.worker import (
    KubernetesWorker,
    KubernetesWorkerJobConfiguration,
    KubernetesWorkerResult,
    KubernetesWorkerVariables,
)

from prefect_governance.core.controls import GovernedVariables
from prefect_governance.core.handoff import GATE_COMMAND
from prefect_governance.core.infrastructure import kubernetes_infrastructure
from prefect_governance.core.settings import WORKER_SECRETS
from prefect_governance.worker.base import GovernedJobConfiguration, GovernedWorker, gate_template
from prefect_governance.worker.launch import gate_argv, is_current_gate, uses_gate

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

    from prefect_governance.core.models import Infrastructure
    from prefect_governance.worker.governor import Admission

# The interpreter the gate starts with inside the run's container: the image's own.
CONTAINER_PYTHON = "python"
FLOW_RUN_LABEL = "prefect.io/flow-run-id"


def _container(manifest: dict[str, Any]) -> dict[str, Any]:
    """The Job's first container: the one Prefect's worker fills in and starts the run."""
    return manifest["spec"]["template"]["spec"]["containers"][0]


class GovernedKubernetesJobConfiguration(
    GovernedJobConfiguration, KubernetesWorkerJobConfiguration
):
    pass


# Prefect's Kubernetes variables and the governed ones (no docstring: it would become the
# description of the pool's variables schema).
class GovernedKubernetesVariables(KubernetesWorkerVariables, GovernedVariables):
    pass


class GovernedKubernetesWorker(GovernedWorker, KubernetesWorker):
    type = "governed-kubernetes"
    job_configuration = GovernedKubernetesJobConfiguration
    job_configuration_variables = GovernedKubernetesVariables
    # KubernetesWorker.run returns once the Job exists; the outcome comes later.
    settles_on_return = False

    _description = (
        "Execute flow runs as Kubernetes Jobs, each one decided first by a Rego policy "
        "(embedded engine or OPA sidecar) and recorded in a lineage."
    )
    _display_name = "Governed Kubernetes"

    @classmethod
    def get_default_base_job_template(cls) -> dict[str, Any]:
        """Prefect's Kubernetes template, with the Job's container started through the
        governance gate (its ``command``, fixed in the manifest; no ``args``)."""
        template = gate_template(super().get_default_base_job_template())
        container = _container(template["job_configuration"]["job_manifest"])
        container["command"] = shlex.split(GATE_COMMAND)
        container["args"] = []
        return template

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # Runs whose Job this worker created, until their outcome is recorded.
        self._handed_over: dict[str, Admission] = {}

    async def run(
        self,
        flow_run: FlowRun,
        configuration: GovernedKubernetesJobConfiguration,
        task_status: anyio.abc.TaskStatus[int] | None = None,
    ) -> KubernetesWorkerResult:
        """Decide the run first; a refused run creates no Job, an allowed one's Job starts
        through the gate. Returns once the Job exists (its outcome is settled later)."""
        try:
            result = await self._governed_run(
                flow_run,
                configuration,
                task_status,
                # prefect-kubernetes' run (untyped: mypy sees BaseWorker's abstract one)
                super().run,  # type: ignore[safe-super]
                refused=KubernetesWorkerResult(status_code=0, identifier="refused"),
            )
        except BaseException:
            # Settled where it failed (the base's start error path): nothing to watch.
            self._handed_over.pop(str(flow_run.id), None)
            raise
        if str(flow_run.id) in self._handed_over:
            # Still this worker's to settle: the reconciler leaves it alone meanwhile.
            self._in_flight.add(str(flow_run.id))
        return result

    def _hand_over(
        self,
        configuration: GovernedKubernetesJobConfiguration,
        admission: Admission,
        logger: Any,
    ) -> None:
        """Point the Job's container at the gate, with the run's grant, decision id and
        report secret in its environment and none of the worker's secrets."""
        container = _container(configuration.job_manifest)
        command = shlex.join(str(part) for part in container.get("command") or [])
        current_gate = is_current_gate(command)
        if uses_gate(command) and admission.trusted_key is not None:
            container["command"] = gate_argv(CONTAINER_PYTHON, admission.trusted_key)
            container["args"] = []
        add = admission.run_environment()
        hidden = {*WORKER_SECRETS, *add}
        env = [entry for entry in container.get("env") or [] if entry.get("name") not in hidden]
        container["env"] = [*env, *({"name": k, "value": v} for k, v in add.items())]
        if isinstance(configuration.env, dict):  # what Prefect's env holds, kept in step
            for secret in WORKER_SECRETS:
                configuration.env.pop(secret, None)
            configuration.env.update(add)
        self._handed_over[configuration.labels[FLOW_RUN_LABEL]] = admission
        self._warn_if_stale_gate(current_gate, logger)

    def _infrastructure(self, configuration: GovernedKubernetesJobConfiguration) -> Infrastructure:
        """The Job as the policy sees it: namespace, images, service account, host paths,
        host namespaces and security context of every container (variable names only)."""
        return kubernetes_infrastructure(
            configuration.job_manifest, configuration.namespace, configuration._job_env
        )

    # --- the outcome, from Prefect's final state ---------------------------------

    async def get_and_submit_flow_runs(self) -> list[FlowRun]:
        """Prefect's poll (and the reconcile pass), then the outcome of each handed-over
        run that has ended."""
        submitted = await super().get_and_submit_flow_runs()
        await self._settle_ended()
        return submitted

    async def _settle_ended(self) -> None:
        """Record the outcome of the runs this worker started that are now final."""
        if not self._handed_over:
            return
        try:
            runs = await self.client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(self._handed_over)))
            )
        except Exception as exc:
            self._logger.warning("Could not read the started runs' states: %s", exc)
            return
        for flow_run in runs:
            if not (flow_run.state and flow_run.state.is_final()):
                continue
            run_id = str(flow_run.id)
            admission = self._handed_over.pop(run_id, None)
            if admission is None:
                continue
            try:
                await self.governor.settle(self.client, admission, flow_run.id, None)
            except Exception:
                # Left to the reconciler (the lineage still lacks the outcome).
                self._logger.exception("Could not record the outcome of %s", run_id)
            finally:
                self._in_flight.discard(run_id)
