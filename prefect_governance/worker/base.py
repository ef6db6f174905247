"""What every governed worker type shares: decide before anything starts, settle after.

A governed worker type is Prefect's stock worker of its infrastructure with two
mixins listed first: ``GovernedJobConfiguration`` on its job configuration and
``GovernedWorker`` on the worker. Its ``run`` hands Prefect's ``run`` to
``GovernedWorker._governed_run``; what differs per infrastructure is how an
allowed run is pointed at the gate (``_hand_over``) and what the policy is told
the run would start (``_infrastructure``).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import anyio
import anyio.abc
from prefect.client.schemas.actions import ArtifactCreate
from prefect.states import Cancelled, Scheduled
from pydantic import PrivateAttr

from prefect_governance.core.controls import GovernedVariables, controls_for
from prefect_governance.core.errors import GovernanceError
from prefect_governance.core.handoff import GATE_COMMAND
from prefect_governance.core.models import Infrastructure, WorkPoolRef
from prefect_governance.worker.events import PrefectEvents
from prefect_governance.worker.governor import (
    AWAITING_APPROVAL,
    Admission,
    Assessment,
    Governor,
    RunRequest,
)
from prefect_governance.worker.metrics import WorkerMetrics
from prefect_governance.worker.reconcile import reconcile, record_gate_refusals
from prefect_governance.worker.report import (
    approval_deadline,
    approvers_of,
    awaiting_message,
    decision_markdown,
    refusal_message,
)
from prefect_governance.worker.traces import DecisionSpans

if TYPE_CHECKING:
    from uuid import UUID

    from prefect.client.schemas.objects import Flow, FlowRun, WorkPool
    from prefect.client.schemas.responses import DeploymentResponse
    from prefect.workers.base import BaseWorker

    _Worker = BaseWorker[Any, Any, Any]
else:
    _Worker = object

R = TypeVar("R")


# What a job's environment entry without a literal value (Kubernetes' ``valueFrom``) counts
# as: a value the worker cannot see, never the worker's own.
UNSEEN_VALUE = "<set from elsewhere>"


def job_env(env: Any) -> dict[str, str | None]:
    """A job's environment as a mapping: Prefect's ``{NAME: value}``, or Kubernetes'
    ``[{name, value | valueFrom}]`` (an entry set from elsewhere counts as set)."""
    if isinstance(env, Mapping):
        return {str(k): None if v is None else str(v) for k, v in env.items()}
    mapping: dict[str, str | None] = {}
    for entry in env if isinstance(env, list) else []:
        if isinstance(entry, Mapping) and entry.get("name"):
            value = entry.get("value")
            mapping[str(entry["name"])] = UNSEEN_VALUE if value is None else str(value)
    return mapping


class GovernedJobConfiguration(GovernedVariables):
    """Mixin for a governed job configuration (listed first): it keeps the flow and
    deployment Prefect read to prepare it, and the environment the job variables ask
    for before Prefect merges the worker's own into it."""

    _flow: Flow | None = PrivateAttr(default=None)
    _deployment: DeploymentResponse | None = PrivateAttr(default=None)
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
        """Prefect's preparation, recording what it was given and the job's own env."""
        self._job_env = job_env(getattr(self, "env", None))
        super().prepare_for_flow_run(  # type: ignore[misc]  # Prefect's job configuration
            flow_run, deployment, flow, work_pool, worker_name, worker_id=worker_id
        )
        self._flow, self._deployment = flow, deployment


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
    """Handed to the worker's task status so the slot is released and nothing is started."""


def gate_template(template: dict[str, Any]) -> dict[str, Any]:
    """A stock template whose ``command`` is the gate's, fixed in the job configuration
    and no longer a job variable: no deployment or flow run can replace it, and a stock
    worker that takes the pool's runs starts them through the gate too (which refuses)."""
    template["job_configuration"]["command"] = GATE_COMMAND
    template["variables"]["properties"].pop("command", None)
    return template


class GovernedWorker(_Worker):
    """Mixin for a governed worker type, listed before Prefect's worker class."""

    # False where Prefect's run returns before the run ends (Kubernetes: once the Job
    # exists): its outcome is settled from Prefect's final state by the reconciler.
    settles_on_return: ClassVar[bool] = True
    # Prefect's worker metadata, the same for every governed type (before the stock class's).
    _documentation_url = "https://github.com/prefect-governance/prefect-governance"
    _logo_url = "https://raw.githubusercontent.com/open-policy-agent/opa/main/logo/logo.png"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.governor = Governor()
        self.governor.observers.add(PrefectEvents(self, self.governor.settings.redact_patterns))
        self.governor.observers.add(DecisionSpans())
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
        self.metrics = WorkerMetrics(
            worker=self.name,
            pool=self._work_pool_name,
            worker_type=self.type,
            in_flight=lambda: len(self._in_flight),
            engines=self.governor.built_engines,
        )
        self.governor.observers.add(self.metrics)

    # --- per infrastructure ----------------------------------------------------

    def _hand_over(self, configuration: Any, admission: Admission, logger: Any) -> None:
        """Point the allowed run at the gate, with ``admission.run_environment()`` and none
        of the worker's secrets."""
        raise NotImplementedError

    def _infrastructure(self, configuration: Any) -> Infrastructure | None:
        """What the run would start, as the policy sees it."""
        return None

    # --- one run ---------------------------------------------------------------

    async def _governed_run(
        self,
        flow_run: FlowRun,
        configuration: Any,
        task_status: anyio.abc.TaskStatus[Any] | None,
        start: Callable[[FlowRun, Any, Any], Awaitable[R]],
        refused: R,
    ) -> R:
        """Decide the run first: a refused run never starts (``refused`` is returned), an
        allowed one is handed over and started by ``start`` (Prefect's ``run``), and how it
        ended is recorded (by the reconciler where Prefect's run does not wait for it)."""
        self._in_flight.add(str(flow_run.id))
        logger = self.get_flow_run_logger(flow_run)
        try:
            admission = await self.governor.admit(
                self.client, self._request(flow_run, configuration), logger
            )
            if admission.decision.waits:
                message = await self._await_approval(flow_run, admission.assessment)
                logger.info(message)
                if task_status is not None:
                    task_status.started(RunRefused(message))
                return refused
            if not admission.runs:
                await self._refuse(flow_run, admission.assessment)
                logger.warning(refusal_message(admission.decision))
                if task_status is not None:
                    task_status.started(RunRefused(refusal_message(admission.decision)))
                return refused
            await self._annotate(flow_run, admission.assessment)
            decision = admission.decision
            for warning in decision.warn:
                logger.warning("Governance warning: %s", warning)
            for waiver in decision.waived:
                logger.warning("Governance: waived by exception %s", waiver.model_dump())
            for notice in admission.assessment.notices:
                logger.warning("Governance: %s", notice)
            if decision.verdict == "audited":
                logger.warning(
                    "Audit mode: this run would be refused: %s", "; ".join(decision.deny)
                )
            self._hand_over(configuration, admission, logger)
            try:
                result = await start(flow_run, configuration, task_status)
            except BaseException as exc:
                with anyio.CancelScope(shield=True), anyio.move_on_after(15):
                    await self.governor.settle(self.client, admission, flow_run.id, None, exc)
                raise
            if self.settles_on_return:
                status_code = getattr(result, "status_code", None)
                await self.governor.settle(self.client, admission, flow_run.id, status_code)
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

    def _request(self, flow_run: FlowRun, configuration: Any) -> RunRequest:
        """The run as the governor takes it: the controls the pool lets the job ask for."""
        work_pool = self.work_pool
        assert work_pool is not None  # Prefect reads the pool before it submits runs
        infrastructure, error = None, None
        try:
            infrastructure = self._infrastructure(configuration)
        except Exception as exc:  # closed: the policy cannot judge what it is not shown
            error = f"{type(exc).__name__}: {exc}"
        return RunRequest(
            flow_run=flow_run,
            controls=controls_for(work_pool.base_job_template, configuration.requested()),
            work_pool=WorkPoolRef(name=work_pool.name, type=work_pool.type),
            worker_name=self.name,
            flow=configuration._flow,
            deployment=configuration._deployment,
            job_env=configuration._job_env,
            infrastructure=infrastructure,
            infrastructure_error=error,
        )

    def _warn_if_stale_gate(self, current: bool, logger: Any) -> None:
        if not current:
            logger.warning(
                "This pool's template does not start runs through today's governance gate "
                "(%s): a stock worker on the pool could run them ungoverned. Update the "
                "pool's base job template from `prefect work-pool get-default-base-job-"
                "template --type %s`.",
                GATE_COMMAND,
                self.type,
            )

    # --- Prefect's worker, governed ---------------------------------------------

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
        """Settle runs whose decision the lineage holds but whose outcome it lacks."""
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
            refusals = await record_gate_refusals(
                self.client,
                store,
                pool=self._work_pool_name,
                known=self._gate_refusals,
                governed_type=self.type,
                agent_keys=self.governor.settings.agent_keys,
            )
            self.metrics.gate_refusals_found(len(refusals))
            settled += refusals
        except Exception:
            self.metrics.reconcile_failed()
            logger.exception("Reconciling unsettled runs failed; trying again next interval.")
            return
        for line in settled:
            logger.warning("Reconciled: %s", line)

    async def __aenter__(self) -> Any:
        entered = await super().__aenter__()
        settings = self.governor.settings
        self.metrics.serve(settings.metrics_port, settings.metrics_host)
        return entered

    async def __aexit__(self, *exc_info: Any) -> None:
        try:
            self.metrics.stop()
            await self.governor.aclose()
        finally:
            await super().__aexit__(*exc_info)

    async def _give_worker_labels_to_flow_run(self, flow_run_id: UUID) -> None:
        """Prefect's worker labels, kept to be written with the governance labels.

        Prefect's label update reads the run, then writes it; on a SQLite server a
        concurrent write makes it answer 503, which the client retries after about
        2 s. One label update per run, as under the stock worker, instead of two.
        The labels are those of ``BaseWorker._give_worker_labels_to_flow_run`` (the same in
        Prefect 3.8.8 and 3.9.1).
        """
        labels: dict[str, Any] = {
            "prefect.worker.name": self.name,
            "prefect.worker.type": self.type,
        }
        if self._work_pool:
            labels["prefect.work-pool.name"] = self._work_pool.name
            labels["prefect.work-pool.id"] = str(self._work_pool.id)
        self._worker_labels[str(flow_run_id)] = labels

    # --- the decision on the run ------------------------------------------------

    async def _refuse(self, flow_run: FlowRun, assessment: Assessment) -> None:
        """Annotate, then refuse. The refusal does not wait on its annotations: if the
        API keeps failing them (a locked SQLite server answers 503 past the client's
        retries), the run is still set Refused with its reasons (they are in the
        lineage already), rather than left for Prefect to call Crashed."""
        try:
            await self._annotate(flow_run, assessment)
        except Exception as exc:
            self._logger.warning("Could not annotate refused flow run %s: %s", flow_run.id, exc)
        await self.client.set_flow_run_state(
            flow_run.id,
            Cancelled(name="Refused", message=refusal_message(assessment.decision)),
            force=True,
        )

    async def _await_approval(self, flow_run: FlowRun, assessment: Assessment) -> str:
        """Start nothing; set the run Scheduled, named AwaitingApproval, to be decided again
        after the recheck interval (annotated when the wait is new or changed). Returns the
        state's message: who may approve, until when, the command."""
        decision, now = assessment.decision, datetime.now(timezone.utc)
        since = (assessment.envelope.approval_requested_at if assessment.envelope else None) or now
        deadline = approval_deadline(decision, since)
        message = awaiting_message(decision, str(flow_run.id), deadline)
        if not assessment.same_wait:
            try:
                await self._label(
                    flow_run,
                    assessment,
                    {
                        "governance.approvers": ",".join(approvers_of(decision)),
                        "governance.approval_deadline": deadline.isoformat(),
                    },
                )
                await self._artifact(flow_run, assessment, message)
            except Exception as exc:
                self._logger.warning("Could not annotate flow run %s: %s", flow_run.id, exc)
        else:  # labelled when the wait was recorded: no label update at every recheck
            self._worker_labels.pop(str(flow_run.id), None)
        recheck = timedelta(seconds=self.governor.settings.approval_recheck_seconds)
        await self.client.set_flow_run_state(
            flow_run.id,
            Scheduled(
                name=AWAITING_APPROVAL,
                scheduled_time=min(now + recheck, max(deadline, now)),
                message=message,
            ),
            force=True,
        )
        return message

    async def _annotate(self, flow_run: FlowRun, assessment: Assessment) -> None:
        """Labels, then the decision artifact (not at once: on SQLite the label update,
        a read then a write, fails with 503 when another write lands between the two)."""
        await self._label(flow_run, assessment)
        await self._artifact(flow_run, assessment)

    async def _label(
        self, flow_run: FlowRun, assessment: Assessment, extra: Mapping[str, str] | None = None
    ) -> None:
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
        if decision.waived:
            labels["governance.waived"] = str(len(decision.waived))
            labels["governance.exceptions"] = ",".join(
                sorted({waiver.exception for waiver in decision.waived})
            )
        labels.update(extra or {})
        await self.client.update_flow_run_labels(flow_run.id, labels)
        self._worker_labels.pop(str(flow_run.id), None)

    async def _artifact(
        self, flow_run: FlowRun, assessment: Assessment, awaiting: str | None = None
    ) -> None:
        await self.client.create_artifact(
            ArtifactCreate(
                type="markdown",
                key="governance-decision",
                description=f"Governance decision {assessment.decision.id}",
                data=decision_markdown(assessment.decision, assessment.agent_id, awaiting),
                flow_run_id=flow_run.id,
            )
        )
