"""The decision path of one flow run: agent, envelope, policy, lineage.

Used by the worker (before any infrastructure starts) and by the
``prefect-governance decide`` command (without running anything).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import anyio
from prefect.exceptions import ObjectNotFound
from pydantic import ValidationError

from prefect_governance.blocks import (
    GovernanceAgent,
    GovernanceLineageStore,
    GovernancePolicyEngine,
)
from prefect_governance.controls import Controls
from prefect_governance.decision import decide, settle, worker_refusal
from prefect_governance.engines import EmbeddedEngine, EngineError, OpaEngine, PolicyEngine
from prefect_governance.envelope import build_envelope
from prefect_governance.lineage import LineageStore, decision_event, outcome_event
from prefect_governance.models import (
    Decision,
    MutationEnvelope,
    PolicyContext,
    PolicyInput,
    TrustState,
    WorkerRef,
    WorkPoolRef,
)
from prefect_governance.settings import (
    GovernanceSettings,
    default_lineage_url,
    packaged_policy_dir,
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


def describe_validation(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(document)'}: {e['msg']}" for e in error.errors()
    )


class Governor:
    """Holds the compiled engines and lineage connections one worker reuses."""

    def __init__(self, settings: GovernanceSettings | None = None):
        self.settings = settings or GovernanceSettings()
        self._engines: dict[str | None, PolicyEngine] = {}
        self._stores: dict[str | None, LineageStore] = {}
        self._lock = anyio.Lock()

    # --- the parts, built once and reused -----------------------------------

    async def engine(self, block_name: str | None, client: PrefectClient) -> PolicyEngine:
        async with self._lock:
            if block_name not in self._engines:
                if block_name:
                    block = await GovernancePolicyEngine.aload(block_name, client=client)
                    built = block.build()
                elif self.settings.opa_url:
                    token = self.settings.opa_token
                    built = OpaEngine(
                        self.settings.opa_url,
                        token=token.get_secret_value() if token else None,
                    )
                else:
                    built = EmbeddedEngine(self.settings.policy_dir or packaged_policy_dir())
                self._engines[block_name] = built
            return self._engines[block_name]

    async def lineage(self, block_name: str | None, client: PrefectClient) -> LineageStore:
        async with self._lock:
            if block_name not in self._stores:
                if block_name:
                    block = await GovernanceLineageStore.aload(block_name, client=client)
                    url = block.url.get_secret_value()
                elif self.settings.lineage_url:
                    url = self.settings.lineage_url.get_secret_value()
                else:
                    url = default_lineage_url()
                self._stores[block_name] = await anyio.to_thread.run_sync(LineageStore, url)
            return self._stores[block_name]

    async def aclose(self) -> None:
        for engine in self._engines.values():
            await engine.aclose()
        for store in self._stores.values():
            store.dispose()

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
        store: LineageStore | None,
    ) -> Assessment:
        """Decide one run. Never raises for bad input: that is a refusal."""

        def refuse(reason: str) -> Assessment:
            return Assessment.refusal(controls, reason)

        if not controls.agent:
            return refuse(
                "the deployment names no agent: set the `agent` job variable to the name "
                "of a governance-agent block"
            )
        try:
            document = await client.read_block_document_by_name(
                controls.agent, block_type_slug=GovernanceAgent.get_block_type_slug()
            )
        except ObjectNotFound:
            return refuse(f"agent block {controls.agent!r} does not exist (governance-agent)")
        try:
            agent = GovernanceAgent.model_validate(document.data)
        except ValidationError as exc:
            return refuse(f"agent block {controls.agent!r} is invalid: {describe_validation(exc)}")

        policy_path = agent.policy_ref or controls.policy_path
        mode = "audit" if agent.mode == "audit" else controls.mode
        runs, refusals = (
            await anyio.to_thread.run_sync(store.decision_counts, agent.id) if store else (0, 0)
        )
        trust = TrustState(score=agent.trust_baseline, runs=runs, refusals=refusals)

        now = datetime.now(timezone.utc)
        parent_flow_run_id = None
        if flow_run.parent_task_run_id:
            parent = await client.read_task_run(flow_run.parent_task_run_id)
            parent_flow_run_id = str(parent.flow_run_id) if parent.flow_run_id else None
        envelope = build_envelope(
            flow_run=flow_run,
            flow=flow,
            deployment=deployment,
            work_pool=work_pool,
            capabilities=controls.capabilities,
            memory_schema_hash=agent.memory_schema_hash,
            parent_flow_run_id=parent_flow_run_id,
            issued_at=now,
            ttl=timedelta(seconds=self.settings.envelope_ttl),
            redact_patterns=self.settings.redact_patterns,
        )
        policy_input = PolicyInput(
            agent=agent.to_agent_object(policy_path, trust),
            envelope=envelope,
            context=PolicyContext(worker=WorkerRef(name=worker_name), time=now, mode=mode),
        ).model_dump(mode="json")

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
        return Assessment(decision, agent=agent, envelope=envelope, policy_input=policy_input)

    async def record_decision(
        self, store: LineageStore, assessment: Assessment, flow_run_id: str
    ) -> None:
        envelope = assessment.envelope.model_dump(mode="json") if assessment.envelope else None
        event = decision_event(
            assessment.decision,
            agent_id=assessment.agent_id,
            flow_run_id=flow_run_id,
            envelope=envelope,
        )
        await anyio.to_thread.run_sync(store.append, event)

    async def record_outcome(
        self,
        store: LineageStore,
        assessment: Assessment,
        flow_run_id: str,
        state: str,
        *,
        message: str | None = None,
        status_code: int | None = None,
    ) -> None:
        event = outcome_event(
            agent_id=assessment.agent_id,
            flow_run_id=flow_run_id,
            decision_id=assessment.decision.id,
            state=state,
            message=message,
            status_code=status_code,
        )
        await anyio.to_thread.run_sync(store.append, event)


def _failed_engine(exc: Exception, controls: Controls, policy_path: str, mode: Any) -> Decision:
    """An engine that cannot even be set up is a failure to decide (closed or open)."""
    return settle(
        EngineError("unreachable", f"the policy engine cannot be set up: {exc}"),
        engine=controls.engine or "default",
        policy_path=policy_path,
        mode=mode,
        fail_mode=controls.fail_mode,
    )
