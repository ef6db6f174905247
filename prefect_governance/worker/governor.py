"""The decision path of one flow run: agent, envelope, policy, lineage.

A governed worker of any infrastructure calls two operations: ``Governor.admit``
before anything starts (decide, record, return an ``Admission``; it never raises)
and ``Governor.settle`` after the run (outcome, what the run reported, memory,
trust). ``prefect-governance decide`` uses ``Governor.assess`` without running
anything; the reconciler settles what a stopped worker left.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import anyio
from prefect.exceptions import ObjectNotFound
from pydantic import ValidationError
from sqlalchemy.engine import Connection

from prefect_governance.core.approvals import approvals_for_run
from prefect_governance.core.attestation import (
    AttestationError,
    binds,
    rollback_reason,
    verify_agent,
)
from prefect_governance.core.controls import Controls
from prefect_governance.core.decision import decide, decision_for, for_task, worker_refusal
from prefect_governance.core.engines import EngineError, PolicyEngine, build_engine
from prefect_governance.core.envelope import ParameterLimitError, build_envelope
from prefect_governance.core.errors import GovernanceError
from prefect_governance.core.exceptions import RunScope, check_exceptions, expiring_soon
from prefect_governance.core.handoff import (
    DECISION_ENV,
    ENVELOPE_ENV,
    PROPOSAL_KEY,
    REFUSED_STATE,
    REPORT_SECRET_ENV,
    RUN_EVENTS_KEY,
    prior_refusal,
)
from prefect_governance.core.keys import GovernanceSigningKey, GovernanceVerifyKey
from prefect_governance.core.models import (
    DEFAULT_TASK_POLICY_PATH,
    RUNNABLE,
    Approval,
    Decision,
    EngineRef,
    Grant,
    GrantPosture,
    Infrastructure,
    MemoryAccess,
    MemorySnapshot,
    Mode,
    MutationEnvelope,
    PolicyContext,
    PolicyException,
    PolicyInput,
    TaskPolicyInput,
    TaskPosture,
    TrustState,
    WorkerRef,
    WorkPoolRef,
    describe_validation,
)
from prefect_governance.core.posture import start_posture
from prefect_governance.core.reports import (
    CapabilityUseReport,
    TaskDecisionReport,
    TaskEndReport,
    accepted,
    admitted_declarations,
    complete_proposals,
    report_secret,
    use_check,
)
from prefect_governance.core.settings import (
    GovernanceSettings,
    lineage_signer,
    worker_lineage_url,
    worker_policy_dir,
)
from prefect_governance.core.signing import SigningKey, sign
from prefect_governance.core.trust import next_score, run_events, trust_state
from prefect_governance.lineage.events import (
    LineageEvent,
    capability_use_event,
    decision_event,
    decision_from_event,
    memory_commit_event,
    memory_discarded_event,
    memory_rejected_event,
    outcome_event,
    report_problem_event,
    settle_task_end,
    task_decision_event,
    task_end_event,
    trust_event,
)
from prefect_governance.lineage.memory import CommitResult, MemoryStore, commit_in
from prefect_governance.lineage.parameter_schemas import remembered_schema
from prefect_governance.lineage.store import LineageStore, as_utc
from prefect_governance.worker.blocks import (
    GovernanceAgent,
    GovernanceException,
    GovernanceLineageStore,
    GovernancePolicyEngine,
)
from prefect_governance.worker.launch import unsafe_env, unsafe_env_reason
from prefect_governance.worker.observe import Decided, Observers, Settled
from prefect_governance.worker.posture import PostureWalk, TaskEnd
from prefect_governance.worker.run_reports import (
    read_artifact_data,
    read_artifacts,
    read_ended_task_states,
    reported_events,
)

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import Flow, FlowRun
    from prefect.client.schemas.responses import DeploymentResponse


@dataclass
class Assessment:
    """Everything known about one run's decision."""

    decision: Decision
    agent: GovernanceAgent | None = None
    envelope: MutationEnvelope | None = None
    policy_input: dict[str, Any] | None = None
    memory: MemorySnapshot | None = None
    agent_block: str | None = None  # the governance-agent block's name
    worker: str | None = None  # the name of the worker that decided
    engine: PolicyEngine | None = None  # the engine that decided (and decides the tasks)
    task_policy_path: str = DEFAULT_TASK_POLICY_PATH
    signature: str | None = None  # of the grant the run received
    costs_trust: bool = True  # whether a refusal charges the agent
    # The run's earlier decisions in the lineage (oldest first), and whether this one is a
    # wait the newest of them recorded already (then it is not recorded again).
    earlier: list[LineageEvent] = field(default_factory=list)
    same_wait: bool = False
    notices: list[str] = field(default_factory=list)  # for the run's log (no policy warning)

    def grant(self) -> Grant:
        """What an allowed run receives (to be signed)."""
        assert self.envelope is not None and self.policy_input is not None
        decision = self.decision
        return Grant(
            decision_id=decision.id,
            verdict=decision.verdict,
            envelope=self.envelope,
            agent=self.policy_input["agent"],
            memory=self.memory or MemorySnapshot(),
            grants=decision.granted(self.envelope.capabilities),
            mode=decision.mode,
            fail_mode=decision.fail_mode,
            engine=self.engine.reference() if self.engine is not None else None,
            task_policy_path=self.task_policy_path,
            posture=self.posture(),
        )

    def memory_content(self) -> dict[str, Any]:
        """The agent's memory as the run was granted it."""
        return dict((self.memory or MemorySnapshot()).content)

    def posture(self) -> GrantPosture | None:
        """The agent's posture at the run's start, for its tasks to move."""
        if self.agent is None or self.policy_input is None:
            return None
        agent = self.agent
        return GrantPosture(
            start=start_posture(
                TrustState.model_validate(self.policy_input["agent"]["trust"]),
                self.memory or MemorySnapshot(),
                schema_hash=agent.memory_schema_hash,
                k=agent.trust_window,
            ),
            weights=agent.trust_weights.effective(),
            memory_schema=agent.memory_schema,
        )

    @property
    def agent_id(self) -> str | None:
        return self.agent.id if self.agent else None

    @classmethod
    def refusal(cls, controls: Controls, reason: str) -> Assessment:
        """The worker refuses before (or instead of) asking the policy."""
        return cls(
            worker_refusal(
                reason,
                policy_path=controls.policy_path,
                mode=controls.mode,
                fail_mode=controls.fail_mode,
            )
        )


@dataclass(frozen=True)
class Preemption:
    """A refusal the worker knows is due before any policy is asked."""

    reason: str
    costs_trust: bool = True  # False when it is not a new attempt of the agent's


_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunRequest:
    """What a worker knows of one flow run when it asks to run it."""

    flow_run: FlowRun
    controls: Controls
    work_pool: WorkPoolRef
    worker_name: str
    # As Prefect read them to build the job configuration; read again when absent.
    flow: Flow | None = None
    deployment: DeploymentResponse | None = None
    # The environment the job variables ask for, before the worker's own is merged in.
    job_env: Mapping[str, str | None] = field(default_factory=dict)
    # What the run would start (the worker type's ``_infrastructure``), for the envelope.
    infrastructure: Infrastructure | None = None
    # Why what the run would start could not be read (the run is refused, closed).
    infrastructure_error: str | None = None


@dataclass(frozen=True)
class Admission:
    """A run's decision, durable in the lineage, and what a runnable run receives.

    ``store`` is None when nothing more may go to the lineage (it failed); ``grant`` is
    the signed grant (JSON) and ``trusted_key`` the key the gate trusts, for a run
    that runs.
    """

    assessment: Assessment
    store: LineageStore | None = None
    grant: str | None = None
    trusted_key: str | None = None
    report_secret: str | None = None

    @property
    def decision(self) -> Decision:
        return self.assessment.decision

    @property
    def runs(self) -> bool:
        return self.assessment.decision.runs

    def run_environment(self) -> dict[str, str]:
        """What the run's environment carries: its decision, report secret and grant (the
        report secret only there: never the API, never the grant)."""
        environment = {DECISION_ENV: self.decision.id}
        if self.report_secret is not None:
            environment[REPORT_SECRET_ENV] = self.report_secret
        if self.grant is not None:
            environment[ENVELOPE_ENV] = self.grant
        return environment


# The state a run waiting for an approval is in (type SCHEDULED), as the UI shows it.
AWAITING_APPROVAL = "AwaitingApproval"
NO_FAIL_OPEN = (
    "the pool is fail-open, but this agent's runs need an approval, which no policy answered: "
    "refused"
)
NO_APPROVER_KEYS = (
    "the worker pins no approver keys (PREFECT_GOVERNANCE_APPROVER_KEYS), so no approval can verify"
)


class AgentUnavailable(GovernanceError):
    """A governance-agent block that does not exist, does not validate, or does not carry
    the pool owner's signature for it as it reads now."""


async def load_agent(client: PrefectClient, name: str, keys: Mapping[str, str]) -> GovernanceAgent:
    """The governance-agent block of this name as the pool owner signed it (verified with
    the pinned ``keys``), or AgentUnavailable saying why not."""
    try:
        document = await client.read_block_document_by_name(
            name, block_type_slug=GovernanceAgent.get_block_type_slug()
        )
    except ObjectNotFound:
        raise AgentUnavailable(f"agent block {name!r} does not exist (governance-agent)") from None
    try:
        agent = GovernanceAgent.model_validate(document.data)
    except ValidationError as exc:
        raise AgentUnavailable(
            f"agent block {name!r} is invalid: {describe_validation(exc, '(document)')}"
        ) from None
    try:
        verify_agent(name, agent, keys)
    except AttestationError as exc:
        raise AgentUnavailable(str(exc)) from None
    agent._block_document_id = document.id  # named by the decision's events
    return agent


async def read_exception_documents(client: PrefectClient) -> dict[str, Any]:
    """Every named governance-exception block's data, by block name, as any API client
    left it (``check_exceptions`` verifies them); none when the block type does not exist."""
    try:
        documents = await client.read_block_documents_by_type(
            GovernanceException.get_block_type_slug()
        )
    except ObjectNotFound:
        return {}
    return {d.name: d.data for d in documents if d.name and not d.is_anonymous}


def _deployment_scope(
    flow: Flow, deployment: DeploymentResponse | None
) -> tuple[str | None, str | None, str | None]:
    """The flow name, deployment name and deployment id an exception's scope matches."""
    if deployment is None:
        return flow.name, None, None
    return flow.name, deployment.name, str(deployment.id)


async def read_proposals(client: PrefectClient, flow_run_id: Any) -> list[dict[str, Any]]:
    """The memory proposals artifacts of a run hold, oldest first, as any API client left
    them (not authenticated: the worker uses ``Governor.run_reports``)."""
    return await read_artifact_data(client, flow_run_id, PROPOSAL_KEY)


async def read_reports(client: PrefectClient, flow_run_id: Any) -> list[dict[str, Any]]:
    """The batches of governance events artifacts of a run hold, as any API client left
    them (not authenticated: the worker uses ``Governor.run_reports``)."""
    return await read_artifact_data(client, flow_run_id, RUN_EVENTS_KEY)


NO_REPORT_SECRET = (
    "no lineage key is set (PREFECT_GOVERNANCE_LINEAGE_KEY) and another worker process "
    "started this run: its report secret lived only in that process, so none of its "
    "reports can be authenticated"
)


def signed_grants(assessment: Assessment) -> list[str] | None:
    """The capabilities the worker granted the run (its own record, never the run's word);
    None when the settling worker does not hold them (a reconciled run's narrowing)."""
    if assessment.envelope is None or assessment.policy_input is None:
        return None
    return assessment.decision.granted(assessment.envelope.capabilities)


class _EventCommon(TypedDict):
    agent_id: str | None
    flow_run_id: str


class Governor:
    """Admits and settles one worker's runs; holds the engines, lineage stores and keys
    it reuses."""

    def __init__(self, settings: GovernanceSettings | None = None):
        self.settings = settings or GovernanceSettings()
        self._engines: dict[str | None, PolicyEngine] = {}
        self._stores: dict[str | None, LineageStore] = {}
        self._keys: dict[str | None, SigningKey] = {}
        self._lock = anyio.Lock()
        # The key this worker signs lineage records with: configured, or this process's own.
        signer = lineage_signer(self.settings, ephemeral=True)
        assert signer is not None
        self.lineage_signer: SigningKey = signer
        self.lineage_key_is_ephemeral = self.settings.lineage_key is None
        # The root of the runs' report secrets: the lineage key's seed, else this process's.
        self._report_root = report_root(self.lineage_signer)
        self._issued: set[str] = set()  # decisions this process handed a report secret
        # Who is told of each decision and outcome (metrics, Prefect events, traces).
        self.observers = Observers()

    # --- the runs' report secrets ---------------------------------------------

    def report_secret(self, decision_id: str) -> str:
        """The report secret of a run this worker starts (for its environment only)."""
        self._issued.add(decision_id)
        return report_secret(self._report_root, decision_id)

    def _secret_to_check(self, decision_id: str) -> tuple[str | None, str | None]:
        """The run's report secret as derived again, or why it cannot be."""
        if not self.lineage_key_is_ephemeral or decision_id in self._issued:
            return report_secret(self._report_root, decision_id), None
        return None, NO_REPORT_SECRET

    async def run_reports(
        self, client: PrefectClient, flow_run_id: Any, assessment: Assessment
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, str]]:
        """What a run reported, as ``record_run_end`` takes it: the memory proposals and
        the batches of events whose MAC verifies for this run's secret (every other
        artifact is left out and named, with why, in a ``rejected`` item of the batches);
        and the final state of each of its task runs as Prefect holds it."""
        decision_id = assessment.decision.id
        secret, cannot = self._secret_to_check(decision_id)
        check = partial(
            accepted,
            secret=secret,
            flow_run_id=str(flow_run_id),
            decision_id=decision_id,
            cannot=cannot,
        )
        problems: list[str] = []
        proposals: list[dict[str, Any]] = []
        task_states = await read_ended_task_states(client, flow_run_id)
        if assessment.agent is not None:
            found = await read_artifacts(client, flow_run_id, PROPOSAL_KEY)
            proposals, rejected = check(found, kind=PROPOSAL_KEY)
            proposals, missing = complete_proposals(proposals)
            problems += rejected + missing
        found = await read_artifacts(client, flow_run_id, RUN_EVENTS_KEY)
        batches, rejected = check(found, kind=RUN_EVENTS_KEY)
        problems += rejected
        reported: list[dict[str, Any]] = [
            {"decision_id": b.get("decision_id"), "events": b.get("events")} for b in batches
        ]
        if problems:
            reported.append({"rejected": problems})
        return proposals, reported, task_states

    # --- the parts, built once and reused -----------------------------------

    async def engine(self, block_name: str | None, client: PrefectClient) -> PolicyEngine:
        async with self._lock:
            if block_name not in self._engines:
                if block_name:
                    block: GovernancePolicyEngine = await GovernancePolicyEngine.aload(
                        block_name, client=client
                    )
                    built = block.build()
                elif self.settings.opa_url:
                    token = self.settings.opa_token
                    built = build_engine(
                        EngineRef(kind="opa", url=self.settings.opa_url),
                        token=token.get_secret_value() if token else None,
                        breaker_failures=self.settings.opa_breaker_failures,
                        breaker_reset_seconds=self.settings.opa_breaker_reset_seconds,
                    )
                else:
                    policy_dir = str(worker_policy_dir(self.settings))
                    timeout = self.settings.decision_timeout
                    built = build_engine(
                        EngineRef(kind="embedded", policy_dir=policy_dir, timeout=timeout)
                    )
                self._engines[block_name] = built
            return self._engines[block_name]

    async def lineage(self, block_name: str | None, client: PrefectClient) -> LineageStore:
        async with self._lock:
            if block_name not in self._stores:
                if block_name:
                    block: GovernanceLineageStore = await GovernanceLineageStore.aload(
                        block_name, client=client
                    )
                    url = block.url.get_secret_value()
                else:
                    url = worker_lineage_url(self.settings)
                self._stores[block_name] = await anyio.to_thread.run_sync(
                    partial(
                        LineageStore,
                        url,
                        append_timeout=self.settings.lineage_append_timeout,
                        signer=self.lineage_signer,
                        keys=self.settings.lineage_keys,
                    )
                )
            return self._stores[block_name]

    async def signing_key(self, block_name: str | None, client: PrefectClient) -> SigningKey:
        """The worker's signing key; its public half is published as a verify-key block."""
        async with self._lock:
            if block_name not in self._keys:
                if block_name:
                    block: GovernanceSigningKey = await GovernanceSigningKey.aload(
                        block_name, client=client
                    )
                    key = block.signing_key()
                elif self.settings.signing_key:
                    key = SigningKey.from_seed(
                        self.settings.signing_key_id, self.settings.signing_key.get_secret_value()
                    )
                else:  # an ephemeral key, for this worker process only
                    key = SigningKey.generate(f"worker-{uuid.uuid4().hex[:12]}")
                await _publish(key, client)
                self._keys[block_name] = key
            return self._keys[block_name]

    def built_engines(self) -> dict[str | None, PolicyEngine]:
        """The engines built so far, by block name (None: the worker's own); a copy, safe
        to read from another thread (a metrics scrape)."""
        return dict(self._engines)

    async def aclose(self) -> None:
        for engine in self._engines.values():
            await engine.aclose()
        for store in self._stores.values():
            store.dispose()

    # --- what a worker calls ---------------------------------------------------

    async def admit(
        self,
        client: PrefectClient,
        request: RunRequest,
        logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    ) -> Admission:
        """Decide one run and record the decision before anything starts. Never raises:
        whatever fails (the store, the agent, the engine, the record) is a refusal. The
        observers see the decision once it is recorded (or could not be); a recheck of a
        waiting run that changed nothing is neither recorded nor shown to them."""
        admission, seconds, error = await self._admit(client, request, logger or _logger)
        if admission.assessment.same_wait:  # a recheck that changed nothing: no new decision
            return admission
        self.observers.decided(
            Decided(
                admission.assessment,
                str(request.flow_run.id),
                request.work_pool.name,
                lineage_seconds=seconds,
                lineage_error=error,
            )
        )
        return admission

    async def _admit(
        self,
        client: PrefectClient,
        request: RunRequest,
        logger: logging.Logger | logging.LoggerAdapter[Any],
    ) -> tuple[Admission, float | None, str | None]:
        """``admit``, with the seconds the decision's append took, or why it failed."""
        controls, flow_run_id = request.controls, str(request.flow_run.id)
        try:
            store = await self.lineage(controls.lineage_store, client)
        except Exception as exc:
            reason = f"the lineage store is unavailable: {exc!r}"
            return Admission(Assessment.refusal(controls, reason)), None, repr(exc)
        key: SigningKey | None = None
        try:
            key = await self.signing_key(controls.signing_key, client)
            preempt = await self._preempt(client, request, store)
            assessment = await self._assess_request(client, request, store, preempt)
        except Exception as exc:
            logger.exception("Governance could not decide this run; refusing it.")
            assessment = Assessment.refusal(controls, f"governance failed: {exc!r}")
        started = time.perf_counter()
        try:
            # The decision is durable before anything runs; if it cannot be, nothing runs.
            # A wait the lineage holds already (nothing changed since) is not recorded again.
            assessment.same_wait = same_wait(assessment)
            if not assessment.same_wait:
                await self.record_decision(store, assessment, flow_run_id)
        except Exception as exc:
            logger.exception("The decision could not be recorded; refusing the run.")
            reason = f"the decision could not be recorded in the lineage: {exc!r}"
            return Admission(Assessment.refusal(controls, reason)), None, repr(exc)
        seconds = time.perf_counter() - started
        if not assessment.decision.runs or key is None:
            return Admission(assessment, store), seconds, None
        admission = Admission(
            assessment,
            store,
            grant=self.sign(key, assessment) if assessment.envelope is not None else None,
            trusted_key=key.trusted_key,
            report_secret=self.report_secret(assessment.decision.id),
        )
        return admission, seconds, None

    async def settle(
        self,
        client: PrefectClient,
        admission: Admission,
        flow_run_id: Any,
        status_code: int | None,
        error: BaseException | None = None,
    ) -> None:
        """Record how an admitted run ended (as Prefect holds it), what it reported, its
        memory and its trust. Nothing is recorded where the store failed at admission."""
        store, assessment = admission.store, admission.assessment
        if store is None:
            return
        current = await client.read_flow_run(flow_run_id)
        state = current.state
        if state is not None and state.is_final():
            name, message = state.type.value, state.message
        elif status_code:
            name = "CRASHED"
            message = f"the flow run process exited with status {status_code}"
        else:
            name = "UNKNOWN"
            seen = state.type.value if state else "no state"
            message = f"the worker stopped watching the run while it was {seen}"
            if error is not None:
                message += f" ({type(error).__name__})"
        proposals, reported, task_states = await self.run_reports(client, flow_run_id, assessment)
        await self.record_run_end(
            store,
            assessment,
            str(flow_run_id),
            name,
            by="worker",
            message=message,
            status_code=status_code,
            proposals=proposals,
            reported=reported,
            task_states=task_states,
        )

    async def _preempt(
        self, client: PrefectClient, request: RunRequest, store: LineageStore
    ) -> Preemption | None:
        """A refusal due before any policy is asked: a run refused before (refused is
        final: the state history, the labels or the lineage say so), or a job environment
        that changes what the run's process starts or loads."""
        flow_run = request.flow_run
        earlier = await anyio.to_thread.run_sync(store.refusal_of, str(flow_run.id))
        states = await client.read_flow_run_states(flow_run.id)
        reason = prior_refusal(
            [state.name for state in states],
            (flow_run.labels or {}).get("governance.decision"),
            earlier.decision_id if earlier else None,
        )
        if reason:  # someone moved it back: no new attempt of the agent's, no trust cost
            said = next((s.message for s in states if s.name == REFUSED_STATE and s.message), None)
            if said:  # what the refusal said (an approver's rejection, say), for the record
                reason += f" (its first Refused state says: {said})"
            return Preemption(reason, costs_trust=False)
        unsafe = unsafe_env(request.job_env, os.environ, request.controls.env_allow)
        if unsafe:
            return Preemption(unsafe_env_reason(unsafe))
        if request.infrastructure_error is not None:
            error = request.infrastructure_error
            return Preemption(f"the worker could not read what the run would start: {error}")
        return None

    async def _assess_request(
        self,
        client: PrefectClient,
        request: RunRequest,
        store: LineageStore,
        preempt: Preemption | None,
    ) -> Assessment:
        """``assess`` with the flow and deployment Prefect read moments ago for this run's
        job configuration (the one the controls come from); read only if it lacks them."""
        flow_run, flow, deployment = request.flow_run, request.flow, request.deployment
        if flow is None or flow.id != flow_run.flow_id:
            flow = await client.read_flow(flow_run.flow_id)
        if flow_run.deployment_id is None:
            deployment = None
        elif deployment is None or deployment.id != flow_run.deployment_id:
            deployment = await client.read_deployment(flow_run.deployment_id)
        return await self.assess(
            client=client,
            flow_run=flow_run,
            flow=flow,
            deployment=deployment,
            work_pool=request.work_pool,
            controls=request.controls,
            worker_name=request.worker_name,
            store=store,
            preempt=preempt,
            infrastructure=request.infrastructure,
        )

    # --- one decision -------------------------------------------------------

    async def assess(
        self,
        *,
        client: PrefectClient,
        flow_run: FlowRun,
        flow: Flow,
        deployment: DeploymentResponse | None,
        work_pool: WorkPoolRef,
        controls: Controls,
        worker_name: str,
        store: LineageStore,
        preempt: Preemption | None = None,
        infrastructure: Infrastructure | None = None,
    ) -> Assessment:
        """Decide one run. Never raises for bad input: that is a refusal.

        A ``preempt`` refuses the run as the agent's without asking the policy;
        ``infrastructure`` (what the run would start) goes into its envelope.
        """

        def refuse(reason: str) -> Assessment:
            return Assessment.refusal(controls, reason)

        if not controls.agent:
            return refuse(
                "the deployment names no agent: set the `agent` job variable to the name "
                "of a governance-agent block"
            )
        if deployment is not None and deployment.flow_id != flow_run.flow_id:
            # Prefect's API takes any flow id beside a deployment's: the run would be judged
            # (agent binding, exceptions, lineage) as a flow whose code it does not run.
            return refuse(
                f"the flow run names flow {flow_run.flow_id}, but its deployment "
                f"{deployment.name!r} belongs to flow {deployment.flow_id}: a run of a "
                "deployment is a run of the deployment's flow"
            )
        try:
            agent = await load_agent(client, controls.agent, self.settings.agent_keys)
        except AgentUnavailable as exc:
            return refuse(str(exc))
        if not binds(
            agent.deployments,
            flow_name=flow.name,
            deployment_name=deployment.name if deployment else None,
            deployment_id=deployment.id if deployment else None,
        ):
            # Not the agent's doing: whoever asked for it is not one it acts for (no trust cost).
            who = f"deployment {flow.name}/{deployment.name}" if deployment else "an ad-hoc run"
            return refuse(
                f"{who} may not act as agent block {controls.agent!r}: the agent's signed "
                f"`deployments` do not name it ({', '.join(agent.deployments) or 'none'})"
            )

        # One trip to the store for what it holds of the agent (read for a refusal too).
        last_version, (trust, memory), earlier = await anyio.to_thread.run_sync(
            lambda: (
                last_decided_version(store, agent.id),
                agent_state(store, store.memory, agent),
                sorted(store.decisions_of([str(flow_run.id)])[str(flow_run.id)], key=_order),
            )
        )
        rolled_back = rollback_reason(controls.agent, agent.version, last_version)
        if rolled_back:
            return refuse(rolled_back)
        if preempt is not None:
            return Assessment(
                refuse(preempt.reason).decision,
                agent=agent,
                agent_block=controls.agent,
                worker=worker_name,
                costs_trust=preempt.costs_trust,
            )

        policy_path = agent.policy_ref or controls.policy_path
        mode = effective_mode(controls.mode, agent.mode)

        now = datetime.now(timezone.utc)
        parent_flow_run_id = None
        if flow_run.parent_task_run_id:
            parent = await client.read_task_run(flow_run.parent_task_run_id)
            parent_flow_run_id = str(parent.flow_run_id) if parent.flow_run_id else None
        reference_schema = None
        if deployment is not None:  # the schema first seen for it: an edit unredacts nothing
            try:
                reference_schema = await anyio.to_thread.run_sync(
                    remembered_schema,
                    store.engine,
                    str(deployment.id),
                    deployment.parameter_openapi_schema,
                )
            except Exception as exc:
                return refuse(
                    "the deployment's reference parameter schema could not be read or "
                    f"stored ({type(exc).__name__}); secrets could not be told apart"
                )
        try:
            envelope = build_envelope(
                flow_run=flow_run,
                flow=flow,
                deployment=deployment,
                work_pool=work_pool,
                capabilities=controls.capabilities,
                memory=MemoryAccess(
                    schema_hash=agent.memory_schema_hash,
                    previous_schema_hash=memory.schema_hash,
                    version=memory.version,
                ),
                parent_flow_run_id=parent_flow_run_id,
                issued_at=now,
                ttl=timedelta(seconds=self.settings.envelope_ttl),
                redact_patterns=self.settings.redact_patterns,
                reference_schema=reference_schema,
                max_parameter_bytes=self.settings.max_parameter_bytes,
                max_parameter_depth=self.settings.max_parameter_depth,
                infrastructure=infrastructure,
            )
        except ParameterLimitError as exc:  # refused as the agent's run: it costs trust
            return Assessment(refuse(str(exc)).decision, agent=agent, agent_block=controls.agent)
        verified, rejected_approvals = await self._approvals(
            client, flow_run, now, needed=agent.constraints.approval is not None
        )
        used = used_approvals(earlier)
        envelope.approvals = [a for a in verified if a.decision == "approve" and a.id not in used]
        envelope.rejections = [a for a in verified if a.decision == "reject"]
        rejected_approvals += [
            f"approval {a.id} by {a.approver!r}: this run went ahead on it already (decision "
            f"{used[a.id]}); an approval lets a run go ahead once"
            for a in verified
            if a.id in used
        ]
        waited_from: list[datetime] = []
        if agent.constraints.approval is not None:  # the wait's start where the lineage lost it
            waited_from = [
                as_utc(state.timestamp)
                for state in await client.read_flow_run_states(flow_run.id)
                if state.name == AWAITING_APPROVAL and state.timestamp is not None
            ]
        envelope.approval_requested_at = awaiting_since(earlier, waited_from)
        exceptions, rejected_exceptions, unread = await self._exceptions(
            client, RunScope(agent.id, work_pool.name, *_deployment_scope(flow, deployment)), now
        )
        policy_input = PolicyInput(
            agent=agent.to_agent_object(policy_path, trust),
            envelope=envelope,
            context=PolicyContext(worker=WorkerRef(name=worker_name), time=now, mode=mode),
            exceptions=exceptions,
        ).model_dump(mode="json")

        engine: PolicyEngine | None = None
        try:
            engine = await self.engine(controls.engine, client)
        except Exception as exc:
            decision = _failed_engine(exc, controls, policy_path, mode)
        else:
            decision = await decide(
                engine,
                policy_path,
                policy_input,
                mode=mode,
                fail_mode=controls.fail_mode,
                deadline=self.settings.decision_timeout,
            )
        if controls.notes:
            decision.warn.extend(controls.notes)
        decision.rejected_approvals = rejected_approvals
        if decision.waits and not self.settings.approver_keys:  # nobody could ever approve
            decision = decision.model_copy(
                update={"verdict": "refused", "deny": [NO_APPROVER_KEYS], "approval": []}
            )
        if decision.verdict == "ungoverned" and agent.constraints.approval is not None:
            # Fail-open runs a run whose policy could not answer; never one that needs a person.
            decision = decision.model_copy(
                update={"verdict": "refused", "deny": [f"{decision.error}; {NO_FAIL_OPEN}"]}
            )
        decision.rejected_exceptions = rejected_exceptions
        if unread:
            decision.warn.append(unread)
        notices = expiring_soon(
            exceptions,
            {waiver.exception for waiver in decision.waived},
            now,
            timedelta(days=self.settings.exception_expiring_days),
        )
        return Assessment(
            decision,
            agent=agent,
            envelope=envelope,
            policy_input=policy_input,
            memory=memory,
            agent_block=controls.agent,
            worker=worker_name,
            engine=engine,
            task_policy_path=controls.task_policy_path,
            earlier=earlier,
            notices=notices,
        )

    async def _approvals(
        self, client: PrefectClient, flow_run: FlowRun, now: datetime, *, needed: bool
    ) -> tuple[list[Approval], list[str]]:
        """The run's approvals that verify against the pinned approver keys, and why the
        others (or all, when they cannot be read) approve nothing. Without pinned keys
        nothing can verify: nothing is read (``needed``: say so for an agent that needs one)."""
        if not self.settings.approver_keys:
            return [], [NO_APPROVER_KEYS] if needed else []
        try:
            return await approvals_for_run(
                client,
                flow_run_id=str(flow_run.id),
                deployment_id=str(flow_run.deployment_id) if flow_run.deployment_id else None,
                parameters=flow_run.parameters or {},
                keys=self.settings.approver_keys,
                now=now,
            )
        except Exception as exc:  # no approval is read: a run that needs one is refused
            return [], [f"the approvals could not be read ({type(exc).__name__}: {exc})"]

    async def _exceptions(
        self, client: PrefectClient, run: RunScope, now: datetime
    ) -> tuple[list[PolicyException], list[str], str | None]:
        """The signed exceptions that apply to this run (expired ones too: the policy
        warns of them), why each other one that claims this run waives nothing, and, when
        none can be read at all, a warning: the run is then decided without any. Without
        pinned exception keys nothing can verify, so nothing is read."""
        if not self.settings.exception_keys:
            return [], [], None
        try:
            documents = await read_exception_documents(client)
        except Exception as exc:  # fail closed: no exception waives anything
            return (
                [],
                [],
                (
                    f"the policy exceptions could not be read ({type(exc).__name__}: {exc}); "
                    "the run is decided without any"
                ),
            )
        found, rejected = check_exceptions(
            documents,
            keys=self.settings.exception_keys,
            run=run,
            now=now,
            max_lifetime=timedelta(days=self.settings.exception_max_days),
        )
        return found, rejected, None

    async def record_decision(
        self, store: LineageStore, assessment: Assessment, flow_run_id: str
    ) -> None:
        """Write the decision (and, for a refusal, the trust it costs) before anything runs."""
        envelope = assessment.envelope.model_dump(mode="json") if assessment.envelope else None
        events = [
            decision_event(
                assessment.decision,
                agent_id=assessment.agent_id,
                flow_run_id=flow_run_id,
                envelope=envelope,
                agent_block=assessment.agent_block,
                worker=assessment.worker,
                agent_version=assessment.agent.version if assessment.agent else None,
                exceptions=(assessment.policy_input or {}).get("exceptions"),
            )
        ]
        # A refusal costs the agent trust; an engine that could not answer is not its doing,
        # and waiting for an approval is no refusal.
        decision = assessment.decision
        charged = assessment.costs_trust and decision.error is None and not decision.waits
        derive = None
        if not decision.runs and assessment.agent is not None and charged:

            def derive(connection: Connection) -> list[LineageEvent]:
                return [_trust_event(store, connection, assessment, flow_run_id, ["refused"])]

        await anyio.to_thread.run_sync(partial(store.append, *events, derive=derive))

    def sign(self, key: SigningKey, assessment: Assessment) -> str:
        """The signed grant, as the JSON the run's environment carries."""
        signed = sign(assessment.grant().model_dump(mode="json"), key)
        assessment.signature = signed["signature"]
        return json.dumps(signed)

    async def record_run_end(
        self,
        store: LineageStore,
        assessment: Assessment,
        flow_run_id: str,
        state: str,
        *,
        message: str | None = None,
        status_code: int | None = None,
        proposals: list[dict[str, Any]] | None = None,
        reported: list[dict[str, Any]] | None = None,
        task_states: Mapping[str, str] | None = None,
        by: Literal["worker", "reconciler"] = "reconciler",
    ) -> bool:
        """What happened inside the run (each task's decision, capability uses and end,
        with the memory and trust it moved), its outcome, memory commit or rejection, and
        the trust update of one run; then the observers see it (``by`` settled it).

        Recorded once per decision: returns False when the run's outcome was already
        recorded (by another worker's reconciler) and nothing was appended. A store that
        fails raises, after the observers saw the failure.
        """
        decision_id = assessment.decision.id
        events, ends = await self._inside_events(
            assessment, flow_run_id, reported or [], task_states
        )
        events.append(
            outcome_event(
                agent_id=assessment.agent_id,
                flow_run_id=flow_run_id,
                decision_id=decision_id,
                state=state,
                message=message,
                status_code=status_code,
            )
        )

        def derive(connection: Connection) -> list[LineageEvent]:
            """Memory and trust, settled in the transaction that records the outcome (once
            per decision, under the agent's chain lock)."""
            derived: list[LineageEvent] = []
            rejected = False
            if assessment.agent is None:
                return derived
            before = _settle_task_ends(store, connection, assessment, flow_run_id, ends)
            if proposals:
                memory_event, rejected = _settle_memory(
                    connection, assessment, flow_run_id, state, proposals
                )
                derived.append(memory_event)
            if assessment.decision.verdict != "ungoverned":
                trust_events = run_events(
                    verdict=assessment.decision.verdict,
                    state=state,
                    warned=bool(assessment.decision.warn),
                    memory_rejected=rejected,
                )
                derived.append(
                    _trust_event(store, connection, assessment, flow_run_id, trust_events, before)
                )
            return derived

        started = time.perf_counter()
        recorded, seconds, error = False, None, None
        try:
            recorded = await anyio.to_thread.run_sync(
                partial(store.append, *events, once_per_decision="outcome", derive=derive)
            )
            seconds = time.perf_counter() - started
        except Exception as exc:
            error = repr(exc)
            raise
        finally:
            self.observers.settled(
                Settled(assessment, flow_run_id, state, recorded, by, seconds, error)
            )
        return recorded

    async def _inside_events(
        self,
        assessment: Assessment,
        flow_run_id: str,
        batches: list[dict[str, Any]],
        task_states: Mapping[str, str] | None = None,
    ) -> tuple[list[LineageEvent], list[tuple[LineageEvent, TaskEnd]]]:
        """The run's reported task decisions, capability uses and task ends as lineage
        events, in the run's order; each task decision checked by deciding its input again
        with the posture the worker computed for it, each task end recomputed (see
        ``worker.posture``). Also the task ends, whose trust and memory the settling
        append completes."""
        parent = assessment.decision.id
        common: _EventCommon = {"agent_id": assessment.agent_id, "flow_run_id": flow_run_id}
        reported, problems = reported_events(batches, parent)
        grants = signed_grants(assessment)
        start = assessment.posture()
        walk = None
        if start is not None:
            walk = PostureWalk(start, assessment.memory_content(), dict(task_states or {}))
        last_end = {
            str((item.task or {}).get("run_id")): i
            for i, item in enumerate(reported)
            if isinstance(item, TaskEndReport) and isinstance(item.task, dict)
        }
        admitted: dict[str, dict[str, Any]] = {}  # task run id -> its admission, as checked
        # (task run id, attempt) -> (task, whether it may run): admissions not yet ended
        open_admissions: dict[tuple[str, Any], tuple[Any, bool]] = {}
        events: list[LineageEvent] = []
        ends: list[tuple[LineageEvent, TaskEnd]] = []

        def unmoved(item: TaskEndReport, check: dict[str, Any], posture: Any) -> None:
            """Record an end that moves no trust and commits no memory, and why."""
            events.append(
                task_end_event(
                    item,
                    parent_decision_id=parent,
                    outcome=str(item.outcome),
                    events=[],
                    posture=posture if isinstance(posture, dict) else {},
                    check=check,
                    **common,
                )
            )

        def end_of(item: TaskEndReport, last: bool, why: str | None = None) -> None:
            if walk is None:
                cannot = {"verified": None, "why": "the worker cannot recompute this run's posture"}
                unmoved(item, cannot, item.posture)
                return
            end = walk.ended(item, last=last)
            if why is not None:
                end.check = {"verified": False, "why": why}
            event = task_end_event(
                item,
                parent_decision_id=parent,
                outcome=end.outcome,
                events=end.events,
                posture=end.posture.model_dump(mode="json"),
                check=end.check,
                **common,
            )
            events.append(event)
            ends.append((event, end))

        for index, item in enumerate(reported):
            if isinstance(item, CapabilityUseReport):
                use = use_check(item, grants=grants, admitted=admitted)
                events.append(
                    capability_use_event(item, parent_decision_id=parent, check=use, **common)
                )
                if use is not None and use["verified"] is False:
                    problems.append(
                        f"capability use seq {item.seq} ({item.capability!r}) flagged: {use['why']}"
                    )
                if walk is not None:
                    walk.used(item)
            elif isinstance(item, TaskEndReport):
                task = item.task if isinstance(item.task, dict) else {}
                key = (str(task.get("run_id")), task.get("attempt"))
                last = last_end.get(key[0]) == index
                if key not in open_admissions:  # an end the worker did not see admitted
                    why = (
                        f"no task decision admitted task run {key[0]} (attempt {key[1]}) "
                        "before this end: it moves no trust and commits no memory"
                    )
                    problems.append(f"task end seq {item.seq} ignored: {why}")
                    now = walk.now.model_dump(mode="json") if walk else None
                    unmoved(item, {"verified": False, "why": why}, now)
                    continue
                _, runs = open_admissions.pop(key)
                if not runs and item.outcome != "refused":
                    said = item.outcome
                    refused = item.model_copy(update={"outcome": "refused"})
                    end_of(refused, last, why=f"its admission was refused; it reports {said}")
                else:
                    end_of(item, last=last)
            else:
                expected, why = (None, None)
                if walk is not None:
                    expected, why = walk.inherited(item.posture)
                check = await self._check_task_decision(assessment, item, expected)
                if why is not None and check.get("verified") is not False:
                    check = {**check, "verified": False, "why": why}
                events.append(
                    task_decision_event(item, parent_decision_id=parent, check=check, **common)
                )
                runs = item.decided.get("verdict") in RUNNABLE
                if check.get("verified") is False and "worker_verdict" in check:
                    runs = check["worker_verdict"] in RUNNABLE
                task = item.task if isinstance(item.task, dict) else {}
                key = (str(task.get("run_id")), task.get("attempt"))
                if item.purpose == "commit":
                    # Only the commit of a task the worker saw admitted (and not ended) counts.
                    if walk is not None and open_admissions.get(key, (None, False))[1]:
                        memory = item.task_envelope.get("memory") or {}
                        walk.commit_decided(task, runs, memory.get("proposed"))
                else:
                    run_id, admission = admitted_declarations(item, check)
                    if admission["runs"] or run_id not in admitted:
                        admitted[run_id] = admission
                    if item.purpose != "retry":  # a re-ask admits nothing by itself
                        open_admissions[key] = (task, runs)
        for task, runs in open_admissions.values():  # no end reported: Prefect's word
            state = (task_states or {}).get(str(task.get("run_id")))
            outcome = {"COMPLETED": "completed", "FAILED": "failed"}.get(state or "", "crashed")
            missing = TaskEndReport.model_validate(
                {"task": task, "outcome": outcome if runs else "refused"}
            )
            end_of(missing, last=True, why="the run reported no end for this task")
        if problems:
            events.append(report_problem_event(problems, parent_decision_id=parent, **common))
        return events, ends

    async def _check_task_decision(
        self, assessment: Assessment, item: TaskDecisionReport, posture: TaskPosture | None
    ) -> dict[str, Any]:
        """Decide a reported task input again, with the posture the worker computed for
        it (``posture``): does the run's report hold?

        ``{"verified": True}`` when the worker's engine gives the same verdict and
        reasons; False with what differs; None when it cannot tell (the deciding worker
        is gone, or the policy changed since).
        """
        engine, envelope = assessment.engine, assessment.envelope
        if engine is None or envelope is None or assessment.policy_input is None:
            return {"verified": None, "why": "the worker that decided the run cannot check it"}
        reported = item.decided
        try:
            parent = dict(item.task_envelope.get("parent") or {})
            if assessment.signature is not None and parent.get("signature") != assessment.signature:
                return {"verified": False, "why": "it names another grant than the run's"}
            parent["envelope"] = envelope.model_dump(mode="json")
            # The grants are the worker's own, never what the run's runtime says it holds.
            parent["grants"] = signed_grants(assessment) or []
            policy_input = TaskPolicyInput.model_validate(
                {
                    "agent": assessment.policy_input["agent"],
                    "envelope": {**item.envelope, "parent": parent},
                    "context": item.context,
                    "posture": posture.model_dump(mode="json") if posture else item.posture,
                }
            ).model_dump(mode="json")
        except (ValidationError, KeyError, TypeError) as exc:
            return {"verified": False, "why": f"the reported input is malformed: {exc}"}
        again = for_task(
            await decide(
                engine,
                assessment.task_policy_path,
                policy_input,
                mode=assessment.decision.mode,
                fail_mode=assessment.decision.fail_mode,
                deadline=self.settings.decision_timeout,
            )
        )
        if again.error is not None or reported.get("error"):
            return {"verified": None, "why": "an engine failed to decide", "error": again.error}
        if again.policy_revision != reported.get("policy_revision"):
            return {"verified": None, "why": "the policy changed since the run decided"}
        same = again.verdict == reported.get("verdict") and sorted(again.deny) == sorted(
            reported.get("deny") or []
        )
        if same:
            return {"verified": True}
        return {
            "verified": False,
            "why": "the worker's engine decides this input otherwise",
            "worker_verdict": again.verdict,
            "worker_deny": again.deny,
        }


def _settle_memory(
    connection: Connection,
    assessment: Assessment,
    flow_run_id: str,
    state: str,
    proposals: list[dict[str, Any]],
) -> tuple[LineageEvent, bool]:
    """Commit the run's memory proposals inside ``connection``'s transaction, or reject
    them; return the event and whether they were rejected."""
    agent = assessment.agent
    assert agent is not None
    base = assessment.memory.version if assessment.memory else 0
    common = {
        "agent_id": agent.id,
        "flow_run_id": flow_run_id,
        "decision_id": assessment.decision.id,
    }
    patches, problems = _proposal_patches(proposals, assessment.decision.id)
    if state != "COMPLETED":
        return memory_discarded_event(
            f"the run ended {state}, not COMPLETED", **common, base_version=base
        ), False
    result: CommitResult | None = None
    if not problems:
        result = commit_in(
            connection,
            agent.id,
            patches,
            base_version=base,
            schema=agent.memory_schema,
            decision_id=assessment.decision.id,
            flow_run_id=flow_run_id,
        )
        problems = list(result.errors)
    if problems or result is None or not result.committed:
        return memory_rejected_event(problems, **common, base_version=base), True
    return memory_commit_event(
        result, **common, schema_hash=agent.memory_schema_hash, base_version=base
    ), False


def _proposal_patches(
    proposals: list[dict[str, Any]], decision_id: str
) -> tuple[list[dict[str, Any]], list[str]]:
    """The merge patches of a run's proposals, and why any of them is unusable."""
    patches, problems = [], []
    for i, proposal in enumerate(proposals):
        patch = proposal.get("patch") if isinstance(proposal, dict) else None
        if not isinstance(patch, dict):
            problems.append(f"proposal {i + 1}: not a memory proposal (no patch object)")
        elif proposal.get("decision_id") != decision_id:
            problems.append(f"proposal {i + 1}: made under another decision")
        else:
            patches.append(patch)
    return patches, problems


def report_root(lineage_key: SigningKey) -> bytes:
    """The root the runs' report secrets derive from: the worker's lineage key's seed (a
    worker without a configured key has one for its process only, and so a root too)."""
    return lineage_key.seed


def _latest_score(store: LineageStore, connection: Connection, agent: GovernanceAgent) -> float:
    """The agent's latest vouched score, as the append's transaction reads it under the
    chain's lock (not the decision-time one, which another run may have moved since)."""
    latest = store.scores(agent.id, 1, connection=connection)
    return latest[-1] if latest else agent.trust_baseline


def _settle_task_ends(
    store: LineageStore,
    connection: Connection,
    assessment: Assessment,
    flow_run_id: str,
    ends: Sequence[tuple[LineageEvent, TaskEnd]],
) -> float | None:
    """Each task's trust from the agent's latest score, and its accepted proposals
    committed as the next memory versions, in task order, inside the settling
    transaction; the score after the last task (None: no task ended)."""
    agent = assessment.agent
    assert agent is not None
    if not ends:
        return None
    score = _latest_score(store, connection, agent)
    for event, end in ends:
        previous, score = score, next_score(score, end.events, agent.trust_weights)
        memory = end.memory
        if end.patches is not None and memory is not None:
            result = commit_in(
                connection,
                agent.id,
                end.patches,
                base_version=end.posture.memory_version - 1,
                schema=agent.memory_schema,
                decision_id=assessment.decision.id,
                flow_run_id=flow_run_id,
            )
            if result.committed:
                memory = {
                    **memory,
                    "status": "committed",
                    "version": result.version,
                    "content_hash": result.content_hash,
                    "rebased": result.rebased,
                }
            else:
                memory = {**memory, "status": "rejected", "errors": list(result.errors)}
        settle_task_end(event, previous=previous, score=score, memory=memory)
    return score


def _trust_event(
    store: LineageStore,
    connection: Connection,
    assessment: Assessment,
    flow_run_id: str,
    events: Sequence[str],
    before: float | None = None,
) -> LineageEvent:
    """The trust update of one run, from the score after its tasks (``before``) or else
    the agent's latest vouched score under the chain's lock."""
    agent = assessment.agent
    assert agent is not None
    if before is None:
        before = _latest_score(store, connection, agent)
    after = next_score(before, events, agent.trust_weights)
    return trust_event(
        agent_id=agent.id,
        flow_run_id=flow_run_id,
        decision_id=assessment.decision.id,
        score=after,
        previous=before,
        events=events,
    )


def agent_state(
    store: LineageStore, memory: MemoryStore, agent: GovernanceAgent
) -> tuple[TrustState, MemorySnapshot]:
    """The agent's trust (score, window, slope, counts) and committed memory, from the lineage."""
    runs, refusals = store.decision_counts(agent.id)
    trust = trust_state(
        trust_history(store, agent.id, agent.trust_window),
        baseline=agent.trust_baseline,
        runs=runs,
        refusals=refusals,
        k=agent.trust_window,
    )
    return trust, memory.latest(agent.id)


def last_decided_version(store: LineageStore, agent_id: str) -> int | None:
    """The agent version the agent's latest vouched decision was made with (None: none)."""
    return store.last_decided_version(agent_id)


def trust_history(store: LineageStore, agent_id: str, k: int) -> list[float]:
    """The agent's last k vouched trust scores, oldest first."""
    return store.scores(agent_id, k)


async def _publish(key: SigningKey, client: PrefectClient) -> None:
    """Publish the public key as a verify-key block, refusing to replace another key."""
    try:
        existing = await GovernanceVerifyKey.aload(key.key_id, client=client)
    except ValueError:
        existing = None
    if existing is not None and existing.public_key != key.public_b64:
        raise RuntimeError(
            f"verify key {key.key_id!r} already holds another public key; "
            "rotate to a new key id instead of replacing it"
        )
    if existing is None:
        await GovernanceVerifyKey(public_key=key.public_b64).asave(key.key_id, client=client)


def _order(event: LineageEvent) -> int:
    return event.id or 0


def awaiting_since(
    earlier: Sequence[LineageEvent], waited_from: Sequence[datetime] = ()
) -> datetime | None:
    """When the run was first decided awaiting approval, as the lineage holds it (the
    worker's own clock, never anything a run's author or an API client writes), or its
    first AwaitingApproval state when that is earlier: a worker restarted without a lineage
    key cannot vouch for its predecessor's records, and the wait must not start again. An
    API client can only add states, so it can only make the wait shorter."""
    first = next((e for e in earlier if e.verdict == "awaiting_approval"), None)
    starts = [*waited_from, *([as_utc(first.created_at)] if first is not None else [])]
    return min(starts) if starts else None


def used_approvals(earlier: Sequence[LineageEvent]) -> dict[str, str]:
    """The approvals (by id) this run already went ahead on, with the decision that used each."""
    return {
        str(approval.get("id")): str(event.decision_id)
        for event in earlier
        if event.verdict in RUNNABLE
        for approval in ((event.payload or {}).get("envelope") or {}).get("approvals") or []
        if isinstance(approval, dict)
    }


def same_wait(assessment: Assessment) -> bool:
    """Whether this decision is a wait that the run's newest recorded decision is already:
    awaiting, asking the same approvals for the same reasons, with the same approval
    statements found (verified and not)."""
    decision, envelope = assessment.decision, assessment.envelope
    if not decision.waits or not assessment.earlier or envelope is None:
        return False
    previous = assessment.earlier[-1]
    if previous.verdict != "awaiting_approval":
        return False
    before = decision_from_event(previous)
    seen = (previous.payload or {}).get("envelope") or {}

    def ids(items: Sequence[Any]) -> list[str]:
        return sorted(str(dict(item).get("id")) for item in items)

    return (
        before.approval == decision.approval
        and before.warn == decision.warn
        and before.rejected_approvals == decision.rejected_approvals
        and ids(seen.get("approvals") or []) == ids([a.model_dump() for a in envelope.approvals])
        and ids(seen.get("rejections") or []) == ids([a.model_dump() for a in envelope.rejections])
    )


def effective_mode(pool_mode: Mode, agent_mode: Mode | None) -> Mode:
    """The run's mode: the pool's, which an agent can only make stricter (``enforce``)."""
    return "enforce" if agent_mode == "enforce" else pool_mode


def _failed_engine(exc: Exception, controls: Controls, policy_path: str, mode: Any) -> Decision:
    """An engine that cannot even be set up is a failure to decide (closed or open)."""
    return decision_for(
        EngineError("unreachable", f"the policy engine cannot be set up: {exc}"),
        engine=controls.engine or "default",
        policy_path=policy_path,
        mode=mode,
        fail_mode=controls.fail_mode,
    )
