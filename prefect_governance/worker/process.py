"""The ``governed-process`` worker: Prefect's process worker with a policy gate.

Every flow run is decided before its process starts. A refused run never
starts: it ends CANCELLED with the state name ``Refused``. An allowed run is
labelled, carries a decision artifact, and runs exactly as under the stock
process worker; its outcome is written to the lineage.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import anyio.abc
from prefect.client.schemas.actions import ArtifactCreate
from prefect.states import Cancelled
from prefect.utilities.processutils import command_to_string, get_sys_executable
from prefect.workers.process import (
    ProcessJobConfiguration,
    ProcessVariables,
    ProcessWorker,
    ProcessWorkerResult,
)
from pydantic import PrivateAttr

from prefect_governance.core.controls import (
    GovernedVariables,
    controls_for,
)
from prefect_governance.core.errors import GovernanceError
from prefect_governance.core.handoff import (
    GATE_COMMAND,
)
from prefect_governance.core.models import (
    WorkPoolRef,
)
from prefect_governance.core.settings import WORKER_SECRETS
from prefect_governance.worker.governor import Admission, Assessment, Governor, RunRequest
from prefect_governance.worker.launch import (
    gate_argv,
    gate_environment,
    is_current_gate,
    uses_gate,
)
from prefect_governance.worker.reconcile import reconcile, record_gate_refusals
from prefect_governance.worker.report import decision_markdown, refusal_message

if TYPE_CHECKING:
    from uuid import UUID

    from prefect.client.schemas.objects import Flow, FlowRun, WorkPool
    from prefect.client.schemas.responses import DeploymentResponse


class GovernedProcessJobConfiguration(ProcessJobConfiguration, GovernedVariables):
    # The flow and deployment Prefect read to build this configuration, reused by the decision.
    _flow: Flow | None = PrivateAttr(default=None)
    _deployment: DeploymentResponse | None = PrivateAttr(default=None)
    # The environment the job variables ask for (pool, deployment, run), before Prefect
    # merges the worker's own into it.
    _job_env: dict[str, str | None] = PrivateAttr(default_factory=dict)

    def prepare_for_flow_run(
        self,
        flow_run: FlowRun,
        deployment: DeploymentResponse | None = None,
        flow: Flow | None = None,
        work_pool: WorkPool | None = None,
        worker_name: str | None = None,
        worker_id: UUID | None = None,
    ) -> None:
        """Prefect's preparation; keeps the flow and deployment it was given, and the job's
        own environment."""
        self._job_env = dict(self.env)
        super().prepare_for_flow_run(
            flow_run, deployment, flow, work_pool, worker_name, worker_id=worker_id
        )
        self._flow, self._deployment = flow, deployment


# Prefect's process variables and the governed ones (no docstring: it would become the
# description of the pool's variables schema).
class GovernedProcessVariables(ProcessVariables, GovernedVariables):
    pass


def _not_dumpable() -> None:
    """Keep other processes of this OS user (a flow run's code among them) out of the
    worker's memory and environment, where its keys are: Linux's PR_SET_DUMPABLE 0 makes
    /proc/PID/{mem,environ} and ptrace root's only (root itself is not kept out)."""
    if sys.platform != "linux":
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0


class RunRefused(GovernanceError):
    """Handed to the worker's task status so the slot is released and no PID is set."""


class GovernedProcessWorker(ProcessWorker):
    type = "governed-process"
    job_configuration = GovernedProcessJobConfiguration
    # mypy reads ProcessWorker's attribute as None (Prefect types it ProcessVariables | None)
    job_configuration_variables = GovernedProcessVariables  # type: ignore[assignment]

    _description = (
        "Execute flow runs as subprocesses, each one decided first by a Rego policy "
        "(embedded engine or OPA sidecar) and recorded in a lineage."
    )
    _display_name = "Governed Process"
    _documentation_url = "https://github.com/prefect-governance/prefect-governance"
    _logo_url = "https://raw.githubusercontent.com/open-policy-agent/opa/main/logo/logo.png"

    @classmethod
    def get_default_base_job_template(cls) -> dict[str, Any]:
        """Prefect's process template, with every run started through the governance gate.

        The command is fixed in the job configuration, not a job variable: no
        deployment or flow run can replace it, and a stock worker that takes this
        pool's runs starts them through the gate too (which refuses them).
        """
        template = super().get_default_base_job_template()
        template["job_configuration"]["command"] = GATE_COMMAND
        template["variables"]["properties"].pop("command", None)
        return template

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.governor = Governor()
        _not_dumpable()
        if self.governor.lineage_key_is_ephemeral:
            self._logger.warning(
                "No PREFECT_GOVERNANCE_LINEAGE_KEY: lineage records are signed with key %r, "
                "made for this worker process only, which no verifier pins (`prefect-governance "
                "keygen` makes one to set here and pin in PREFECT_GOVERNANCE_LINEAGE_KEYS)",
                self.governor.lineage_signer.key_id,
            )
        self._reconciled_at: float | None = None
        self._in_flight: set[str] = set()  # flow runs this worker is handling
        self._gate_refusals: set[str] = set()  # refused starts known to be in the lineage
        # Prefect's worker labels of each run, written with its governance labels.
        self._worker_labels: dict[str, dict[str, Any]] = {}

    async def get_and_submit_flow_runs(self) -> list[FlowRun]:
        """Prefect's poll, then (at start and every reconcile_interval) a reconcile pass."""
        submitted = await super().get_and_submit_flow_runs()
        now = time.monotonic()
        interval = self.governor.settings.reconcile_interval
        if self._reconciled_at is None or now - self._reconciled_at >= interval:
            self._reconciled_at = now
            await self._reconcile()
        return submitted

    async def _reconcile(self) -> None:
        """Settle runs decided by a worker that stopped before recording their outcome."""
        logger = self._logger
        try:
            template = self.work_pool.base_job_template if self.work_pool else None
            controls = controls_for(template, {})
            store = await self.governor.lineage(controls.lineage_store, self.client)
            settled = await reconcile(
                self.governor,
                self.client,
                store,
                pool=self._work_pool_name,
                worker=self.name,
                in_flight=self._in_flight,
            )
            settled += await record_gate_refusals(
                self.client,
                store,
                pool=self._work_pool_name,
                known=self._gate_refusals,
                governed_type=self.type,
                agent_keys=self.governor.settings.agent_keys,
            )
        except Exception:
            logger.exception("Reconciling unsettled runs failed; trying again next interval.")
            return
        for line in settled:
            logger.warning("Reconciled: %s", line)

    async def __aexit__(self, *exc_info: Any) -> None:
        try:
            await self.governor.aclose()
        finally:
            await super().__aexit__(*exc_info)

    async def run(  # type: ignore[override]  # Prefect builds it from job_configuration
        self,
        flow_run: FlowRun,
        configuration: GovernedProcessJobConfiguration,
        task_status: anyio.abc.TaskStatus[int] | None = None,
    ) -> ProcessWorkerResult:
        """Decide the run first; a refused run never starts, an allowed one runs through
        the gate as under the stock process worker, and how it ended is recorded."""
        self._in_flight.add(str(flow_run.id))
        logger = self.get_flow_run_logger(flow_run)
        try:
            admission = await self.governor.admit(
                self.client, self._request(flow_run, configuration), logger
            )
            if not admission.runs:
                await self._refuse(flow_run, admission.assessment)
                logger.warning(refusal_message(admission.decision))
                if task_status is not None:
                    # typed int, but Prefect's own caller hands exceptions too (int | Exception)
                    refused = RunRefused(refusal_message(admission.decision))
                    task_status.started(refused)  # type: ignore[arg-type]
                return ProcessWorkerResult(status_code=0, identifier="refused")
            await self._annotate(flow_run, admission.assessment)
            self._hand_over(configuration, admission, logger)
            try:
                result = await super().run(flow_run, configuration, task_status)
            except BaseException as exc:
                with anyio.CancelScope(shield=True), anyio.move_on_after(15):
                    await self.governor.settle(self.client, admission, flow_run.id, None, exc)
                raise
            await self.governor.settle(self.client, admission, flow_run.id, result.status_code)
            return result
        finally:
            self._in_flight.discard(str(flow_run.id))
            unwritten = self._worker_labels.pop(str(flow_run.id), None)
            if unwritten:  # governance stopped before labelling the run: Prefect's labels only
                with anyio.CancelScope(shield=True), anyio.move_on_after(15):
                    try:
                        await self.client.update_flow_run_labels(flow_run.id, unwritten)
                    except Exception:
                        self._logger.warning("Could not label flow run %s", flow_run.id)

    async def _give_worker_labels_to_flow_run(self, flow_run_id: UUID) -> None:
        """Prefect's worker labels, kept to be written with the governance labels.

        Prefect's label update reads the run, then writes it; on a SQLite server a
        concurrent write makes it answer 503, which the client retries after about
        2 s. One label update per run, as under the stock worker, instead of two.
        The labels are those of Prefect 3.8's ``BaseWorker._give_worker_labels_to_flow_run``.
        """
        labels: dict[str, Any] = {
            "prefect.worker.name": self.name,
            "prefect.worker.type": self.type,
        }
        if self._work_pool:
            labels["prefect.work-pool.name"] = self._work_pool.name
            labels["prefect.work-pool.id"] = str(self._work_pool.id)
        self._worker_labels[str(flow_run_id)] = labels

    # --- steps --------------------------------------------------------------

    def _request(
        self, flow_run: FlowRun, configuration: GovernedProcessJobConfiguration
    ) -> RunRequest:
        """The run as the governor takes it: the controls the pool lets the job ask for."""
        template = self.work_pool.base_job_template if self.work_pool else None
        return RunRequest(
            flow_run=flow_run,
            controls=controls_for(template, configuration.requested()),
            work_pool=WorkPoolRef(name=self.work_pool.name, type=self.work_pool.type),
            worker_name=self.name,
            flow=configuration._flow,
            deployment=configuration._deployment,
            job_env=configuration._job_env,
        )

    def _hand_over(
        self,
        configuration: GovernedProcessJobConfiguration,
        admission: Admission,
        logger: Any,
    ) -> None:
        """Point the job at the gate, with the run's grant and none of the worker's secrets."""
        decision = admission.decision
        for warning in decision.warn:
            logger.warning("Governance warning: %s", warning)
        if decision.verdict == "audited":
            logger.warning("Audit mode: this run would be refused: %s", "; ".join(decision.deny))
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
        if not current_gate:
            logger.warning(
                "This pool's template does not start runs through today's governance gate "
                "(%s): a stock worker on the pool could run them ungoverned. Update the "
                "pool's base job template from `prefect work-pool get-default-base-job-"
                "template --type %s`.",
                GATE_COMMAND,
                self.type,
            )

    async def _refuse(self, flow_run: FlowRun, assessment: Assessment) -> None:
        """Annotate, then refuse. The refusal does not wait on its annotations: if the
        API keeps failing them (a locked SQLite server answers 503 past the client's
        retries), the run is still set Refused with its reasons (they are in the
        lineage already), rather than left for Prefect to call Crashed."""
        decision = assessment.decision
        try:
            await self._annotate(flow_run, assessment)
        except Exception as exc:
            self._logger.warning("Could not annotate refused flow run %s: %s", flow_run.id, exc)
        await self.client.set_flow_run_state(
            flow_run.id,
            Cancelled(name="Refused", message=refusal_message(decision)),
            force=True,
        )

    async def _annotate(self, flow_run: FlowRun, assessment: Assessment) -> None:
        """Labels, then the decision artifact (not at once: on SQLite the label update,
        a read then a write, fails with 503 when another write lands between the two)."""
        await self._label(flow_run, assessment)
        await self._artifact(flow_run, assessment)

    async def _label(self, flow_run: FlowRun, assessment: Assessment) -> None:
        decision = assessment.decision
        labels: dict[str, Any] = {
            **self._worker_labels.get(str(flow_run.id), {}),
            **decision.annotations,
            "governance.decision": decision.verdict,
            "governance.decision_id": decision.id,
            "governance.engine": decision.engine,
            "governance.policy_path": decision.policy_path,
        }
        if assessment.agent_id:
            labels["governance.agent"] = assessment.agent_id
        if decision.warn:
            labels["governance.warnings"] = str(len(decision.warn))
        await self.client.update_flow_run_labels(flow_run.id, labels)
        self._worker_labels.pop(str(flow_run.id), None)

    async def _artifact(self, flow_run: FlowRun, assessment: Assessment) -> None:
        await self.client.create_artifact(
            ArtifactCreate(
                type="markdown",
                key="governance-decision",
                description=f"Governance decision {assessment.decision.id}",
                data=decision_markdown(assessment.decision, assessment.agent_id),
                flow_run_id=flow_run.id,
            )
        )
