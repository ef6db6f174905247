"""Build the mutation envelope of a flow run, or of a task inside one: pure functions."""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from prefect_governance.models import (
    CreatedBy,
    DeploymentRef,
    FlowRef,
    FlowRunRef,
    MemoryAccess,
    MutationEnvelope,
    ParentRun,
    TaskEnvelope,
    TaskRef,
    WorkPoolRef,
)

if TYPE_CHECKING:
    from prefect.client.schemas.objects import Flow, FlowRun
    from prefect.client.schemas.responses import DeploymentResponse

REDACTED = "***REDACTED***"
# Limits on the parameter document sent to the policy (settings may change them).
MAX_PARAMETER_BYTES = 1_000_000
MAX_PARAMETER_DEPTH = 64


class ParameterLimitError(ValueError):
    """The run's parameters are too large, too deep or not JSON: the policy is not asked."""


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


def _is_secret_schema(schema: Any) -> bool:
    """A JSON Schema for a secret: pydantic's SecretStr is ``format: password, writeOnly``."""
    return isinstance(schema, dict) and (
        schema.get("writeOnly") is True or schema.get("format") == "password"
    )


def _branches(
    schema: Any, definitions: Mapping[str, Any], seen: frozenset[str] = frozenset()
) -> list[dict[str, Any]]:
    """A schema and its anyOf/oneOf/allOf alternatives, with local ``$ref`` resolved."""
    if isinstance(schema, dict) and isinstance(schema.get("$ref"), str):
        ref = schema["$ref"]
        if ref in seen:  # a reference cycle
            return []
        schema, seen = definitions.get(ref.rsplit("/", 1)[-1]), seen | {ref}
    if not isinstance(schema, dict):
        return []
    out = [schema]
    for key in ("anyOf", "oneOf", "allOf"):
        alternatives = schema.get(key)
        for branch in alternatives if isinstance(alternatives, list) else []:
            out.extend(_branches(branch, definitions, seen))
    return out


def _member_schemas(branches: list[dict[str, Any]], key: Any) -> dict[str, Any]:
    """The schema of one member of an object, from every branch that describes it."""
    found = []
    for branch in branches:
        properties = branch.get("properties")
        member = properties.get(key) if isinstance(properties, dict) else None
        if member is None:
            member = branch.get("additionalProperties")
        if isinstance(member, dict):
            found.append(member)
    return {"anyOf": found}


def redact_by_schema(
    value: Any, schema: Any, path: str = "", definitions: Mapping[str, Any] | None = None
) -> tuple[Any, list[str]]:
    """Replace values the deployment's parameter schema types as secret (e.g. SecretStr)."""
    if definitions is None:
        collected: dict[str, Any] = {}
        for key in ("$defs", "definitions"):
            found = schema.get(key) if isinstance(schema, dict) else None
            collected.update(found if isinstance(found, dict) else {})
        definitions = collected
    branches = _branches(schema, definitions)
    if value is None or (isinstance(value, str) and value == REDACTED) or not branches:
        return value, []
    if any(_is_secret_schema(b) for b in branches):
        return REDACTED, [path]
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        hits: list[str] = []
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            out[key], inner = redact_by_schema(
                item, _member_schemas(branches, key), where, definitions
            )
            hits.extend(inner)
        return out, hits
    if isinstance(value, list):
        subs = [b["items"] for b in branches if isinstance(b.get("items"), dict)]
        pairs = [
            redact_by_schema(item, {"anyOf": subs}, f"{path}[{i}]", definitions)
            for i, item in enumerate(value)
        ]
        return [item for item, _ in pairs], [hit for _, inner in pairs for hit in inner]
    return value, []


def nesting_depth(value: Any, limit: int) -> int:
    """How deeply objects and arrays nest in a document (counted up to just past ``limit``).

    Iterative, so a document nested beyond Python's recursion limit is measured too.
    """
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list, tuple)):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth) for child in children)
    return deepest


def depth_problem(parameters: Any, max_depth: int) -> str | None:
    """Why a parameter document is nested too deeply to send, or None."""
    if nesting_depth(parameters, max_depth) > max_depth:
        return (
            f"the run's parameters nest deeper than {max_depth} levels "
            "(limit PREFECT_GOVERNANCE_MAX_PARAMETER_DEPTH); the policy was not asked"
        )
    return None


def size_problem(parameters: Any, max_bytes: int) -> str | None:
    """Why a parameter document is not JSON or too large to send, or None.

    Encodes incrementally and stops at the limit, so a huge document costs no more than that.
    """
    encoder = json.JSONEncoder(allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    size = 0
    try:
        for chunk in encoder.iterencode(parameters):
            size += len(chunk.encode())
            if size > max_bytes:
                return (
                    f"the run's parameters are larger than {max_bytes} bytes as JSON "
                    "(limit PREFECT_GOVERNANCE_MAX_PARAMETER_BYTES); the policy was not asked"
                )
    except (TypeError, ValueError) as exc:
        return f"the run's parameters are not JSON-serializable ({exc}); the policy was not asked"
    return None


def policy_parameters(
    raw: Mapping[str, Any],
    *,
    redact_patterns: Iterable[str],
    schema: Any = None,
    max_bytes: int = MAX_PARAMETER_BYTES,
    max_depth: int = MAX_PARAMETER_DEPTH,
) -> tuple[dict[str, Any], list[str]]:
    """The parameters as the policy may see them, and the paths redacted.

    Raises ParameterLimitError for a document too deep, too large or not JSON.
    """
    problem = depth_problem(raw, max_depth)  # first: redaction recurses
    if problem:
        raise ParameterLimitError(problem)
    parameters, redacted = redact(dict(raw), redact_patterns)
    parameters, typed = redact_by_schema(parameters, schema)
    problem = size_problem(parameters, max_bytes)
    if problem:
        raise ParameterLimitError(problem)
    return parameters, redacted + typed


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
    max_parameter_bytes: int = MAX_PARAMETER_BYTES,
    max_parameter_depth: int = MAX_PARAMETER_DEPTH,
) -> MutationEnvelope:
    """What this flow run proposes to do, with secrets redacted.

    Secrets are found by name (``redact_patterns``) and by the deployment's parameter
    schema (a ``SecretStr`` parameter). Raises ParameterLimitError when the parameters
    exceed a limit.
    """
    parameters, redacted = policy_parameters(
        flow_run.parameters or {},
        redact_patterns=redact_patterns,
        schema=deployment.parameter_openapi_schema if deployment is not None else None,
        max_bytes=max_parameter_bytes,
        max_depth=max_parameter_depth,
    )
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


def task_parameters(
    raw: Mapping[str, Any],
    *,
    redact_patterns: Iterable[str],
    max_bytes: int = MAX_PARAMETER_BYTES,
    max_depth: int = MAX_PARAMETER_DEPTH,
) -> tuple[dict[str, Any], list[str]]:
    """A task's parameters as the policy may see them, and the paths redacted.

    Task parameters are Python objects (a data frame, a client): a value that is
    not JSON, or nests or weighs more than the limits, is sent as its type and
    why it was left out, never refused for it. Secrets are redacted by name.
    """
    parameters: dict[str, Any] = {}
    redacted: list[str] = []
    budget = max_bytes
    for name, value in raw.items():
        omitted = None
        if nesting_depth(value, max_depth) > max_depth:
            omitted = f"nests deeper than {max_depth} levels"
        else:
            cleaned, hits = redact({name: value}, redact_patterns)
            try:
                size = len(json.dumps(cleaned[name], allow_nan=False))
            except (TypeError, ValueError):
                omitted = "not JSON"
            else:
                if size > budget:
                    omitted = f"larger than the {budget} bytes left of {max_bytes}"
        if omitted is not None:
            parameters[name] = {"$type": _type_name(value), "$omitted": omitted}
            continue
        parameters[name] = cleaned[name]
        redacted.extend(hits)
        budget -= size
    return parameters, redacted


def _type_name(value: Any) -> str:
    kind = type(value)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


def build_task_envelope(
    *,
    task: TaskRef,
    parameters: Mapping[str, Any],
    capabilities: Iterable[str],
    parent: ParentRun,
    issued_at: datetime,
    redact_patterns: Iterable[str],
    max_parameter_bytes: int = MAX_PARAMETER_BYTES,
    max_parameter_depth: int = MAX_PARAMETER_DEPTH,
) -> TaskEnvelope:
    """What one task run proposes to do, with secrets redacted."""
    values, redacted = task_parameters(
        parameters,
        redact_patterns=redact_patterns,
        max_bytes=max_parameter_bytes,
        max_depth=max_parameter_depth,
    )
    return TaskEnvelope(
        id=str(uuid.uuid4()),
        issued_at=issued_at,
        task=task,
        parameters=values,
        redacted=redacted,
        capabilities=sorted(set(capabilities)),
        parent=parent,
    )
