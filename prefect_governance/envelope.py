"""Build the mutation envelope for a flow run: pure functions of Prefect objects."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from prefect_governance.models import (
    CreatedBy,
    DeploymentRef,
    FlowRef,
    FlowRunRef,
    MemoryAccess,
    MutationEnvelope,
    WorkPoolRef,
)

if TYPE_CHECKING:
    from prefect.client.schemas.objects import Flow, FlowRun
    from prefect.client.schemas.responses import DeploymentResponse

REDACTED = "***REDACTED***"


def redact(value: Any, patterns: Iterable[str], path: str = "") -> tuple[Any, list[str]]:
    """Replace values whose key matches a pattern (at any depth); return the paths redacted."""
    lowered = [p.lower() for p in patterns]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        hits: list[str] = []
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if any(p in str(key).lower() for p in lowered):
                out[key] = REDACTED
                hits.append(where)
            else:
                out[key], inner = redact(item, lowered, where)
                hits.extend(inner)
        return out, hits
    if isinstance(value, list):
        items = [redact(item, lowered, f"{path}[{i}]") for i, item in enumerate(value)]
        return [item for item, _ in items], [hit for _, inner in items for hit in inner]
    if hasattr(value, "get_secret_value"):  # pydantic SecretStr / SecretBytes
        return REDACTED, [path]
    return value, []


def build_envelope(
    *,
    flow_run: FlowRun,
    flow: Flow,
    deployment: DeploymentResponse | None,
    work_pool: WorkPoolRef,
    capabilities: list[str],
    memory: MemoryAccess,
    parent_flow_run_id: str | None,
    issued_at: datetime,
    ttl: timedelta,
    redact_patterns: Iterable[str],
) -> MutationEnvelope:
    """What this flow run proposes to do, with secrets redacted."""
    parameters, redacted = redact(dict(flow_run.parameters or {}), redact_patterns)
    created_by = None
    if flow_run.created_by is not None:
        created_by = CreatedBy(
            type=flow_run.created_by.type,
            display_value=flow_run.created_by.display_value,
            id=str(flow_run.created_by.id) if flow_run.created_by.id else None,
        )
    elif flow_run.auto_scheduled:
        # The scheduler records no creator; name it so trigger rules can allow it.
        created_by = CreatedBy(type="SCHEDULE", display_value="schedule")
    return MutationEnvelope(
        id=str(uuid.uuid4()),
        issued_at=issued_at,
        expires_at=issued_at + ttl,
        nonce=secrets.token_hex(16),
        flow_run=FlowRunRef(
            id=str(flow_run.id),
            name=flow_run.name,
            tags=list(flow_run.tags or []),
            labels=dict(flow_run.labels or {}),
            created_by=created_by,
            parent_flow_run_id=parent_flow_run_id,
        ),
        deployment=(
            DeploymentRef(
                id=str(deployment.id),
                name=deployment.name,
                version=deployment.version,
                tags=list(deployment.tags or []),
            )
            if deployment is not None
            else None
        ),
        flow=FlowRef(id=str(flow.id), name=flow.name),
        work_pool=work_pool,
        parameters=parameters,
        redacted=redacted,
        capabilities=sorted(set(capabilities)),
        memory=memory,
    )
