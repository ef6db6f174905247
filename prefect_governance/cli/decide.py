"""Decide a deployment's run without running it (``prefect-governance decide``)."""

from __future__ import annotations

import socket
import uuid
from typing import Any

from prefect import get_client
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import Flow, FlowRun, WorkPool
from prefect.client.schemas.responses import DeploymentResponse
from prefect.workers.base import BaseWorker

from prefect_governance.core.approvals import run_parameters
from prefect_governance.core.controls import controls_for, pool_defaults
from prefect_governance.core.infrastructure import job_infrastructure
from prefect_governance.core.models import Infrastructure, WorkPoolRef
from prefect_governance.worker.governor import Assessment, Governor


async def dry_run_infrastructure(
    client: PrefectClient,
    pool: WorkPool,
    deployment: DeploymentResponse,
    flow: Flow,
    flow_run: FlowRun,
) -> Infrastructure | None:
    """What the run would start: the pool type's job configuration from the pool's
    template and the deployment's job variables, prepared for the run as a worker
    prepares it. None when the pool's worker type is not installed here."""
    worker = BaseWorker.get_worker_class_from_type(pool.type)
    if worker is None:
        return None
    configuration = await worker.job_configuration.from_template_and_values(
        pool.base_job_template, deployment.job_variables or {}, client=client
    )
    configuration.prepare_for_flow_run(flow_run, deployment=deployment, flow=flow, work_pool=pool)
    return job_infrastructure(configuration.model_dump())


async def decide_deployment(
    name: str, parameters: dict[str, Any]
) -> tuple[Assessment, Infrastructure | None]:
    """The decision a governed worker would make for a run of this deployment now, and
    what the run would start (as the policy was shown it)."""
    governor = Governor()
    try:
        async with get_client() as client:
            deployment = await client.read_deployment_by_name(name)
            flow = await client.read_flow(deployment.flow_id)
            if not deployment.work_pool_name:
                raise ValueError(f"deployment {name!r} has no work pool")
            pool = await client.read_work_pool(deployment.work_pool_name)
            requested = {
                **pool_defaults(pool.base_job_template),
                **(deployment.job_variables or {}),
            }
            controls = controls_for(pool.base_job_template, requested)
            flow_run = FlowRun(
                id=uuid.uuid4(),
                name="decide-dry-run",
                flow_id=flow.id,
                deployment_id=deployment.id,
                parameters=run_parameters(deployment.parameters or {}, parameters),
                tags=list(deployment.tags or []),
            )
            infrastructure = await dry_run_infrastructure(client, pool, deployment, flow, flow_run)
            store = await governor.lineage(controls.lineage_store, client)
            assessment = await governor.assess(
                client=client,
                flow_run=flow_run,
                flow=flow,
                deployment=deployment,
                work_pool=WorkPoolRef(name=pool.name, type=pool.type),
                controls=controls,
                worker_name=f"decide@{socket.gethostname()}",
                store=store,
                infrastructure=infrastructure,
            )
            return assessment, infrastructure
    finally:
        await governor.aclose()
