"""Decide a deployment's run without running it (``prefect-governance decide``)."""

from __future__ import annotations

import socket
import uuid
from typing import Any

from prefect import get_client
from prefect.client.schemas.objects import FlowRun

from prefect_governance.core.approvals import run_parameters
from prefect_governance.core.controls import controls_for, pool_defaults
from prefect_governance.core.models import WorkPoolRef
from prefect_governance.worker.governor import Assessment, Governor


async def decide_deployment(name: str, parameters: dict[str, Any]) -> Assessment:
    """The decision a governed worker would make for a run of this deployment now."""
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
            store = await governor.lineage(controls.lineage_store, client)
            return await governor.assess(
                client=client,
                flow_run=flow_run,
                flow=flow,
                deployment=deployment,
                work_pool=WorkPoolRef(name=pool.name, type=pool.type),
                controls=controls,
                worker_name=f"decide@{socket.gethostname()}",
                store=store,
            )
    finally:
        await governor.aclose()
