"""Build the mutation envelope of a flow run, or of a task inside one: pure functions."""

from __future__ import annotations

import json
import re
import secrets
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from prefect_governance.core.errors import GovernanceError
from prefect_governance.core.models import (
    CreatedBy,
    DeploymentRef,
    FlowRef,
    FlowRunRef,
    Infrastructure,
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


class ParameterLimitError(GovernanceError, ValueError):
    """The run's parameters are too large, too deep or not JSON: the policy is not asked."""


def _key_matches(key: Any, lowered: list[str]) -> bool:
    text = str(key).lower()
    return any(p in text for p in lowered)


# Values that are secrets whatever their name or schema says (see README, "Redaction").
# Each is anchored on a shape a secret has and ordinary text does not, to keep false
# positives low; a match redacts the whole string. Patterns are linear-time (bounded or
# anchored quantifiers): they run over up to max_parameter_bytes of text.
SECRET_SHAPES: tuple[tuple[str, re.Pattern[str]], ...] = (
    # scheme://user:password@host (a password in a URL's userinfo)
    ("url-password", re.compile(r"\b[A-Za-z][A-Za-z0-9+.\-]{0,30}://[^/\s:@]*:[^/\s@]+@")),
    # an HTTP Authorization value: "Bearer <credential>" (16+ characters, not a plain word)
    ("bearer", re.compile(r"(?i)\bbearer\s+([A-Za-z0-9._~+/\-]{16,}=*)")),
    # "Basic <base64 of user:password>"
    ("basic", re.compile(r"(?i)\bbasic\s+([A-Za-z0-9+/]{4,}={0,2})")),
    # a JWT / JWS: base64url JSON header ("eyJ"), payload, signature
    ("jwt", re.compile(r"\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*")),
    # a PEM private key block (PKCS#1/#8, RSA, EC, DSA, OpenSSH, ENCRYPTED, PGP)
    ("private-key", re.compile(r"-----BEGIN (?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?-----")),
    # provider API keys with a fixed prefix
    ("aws-access-key", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("github-token", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{22})")),
    ("gitlab-token", re.compile(r"\bglpat-[A-Za-z0-9_\-]{20}")),
    ("slack-token", re.compile(r"\bxox[abposr]-[A-Za-z0-9\-]{10}")),
    ("stripe-key", re.compile(r"\b[rs]k_(?:live|test)_[A-Za-z0-9]{16}")),
    ("sk-key", re.compile(r"\bsk-[A-Za-z0-9_\-]{20}")),  # OpenAI, Anthropic, ...
    ("google-api-key", re.compile(r"\bAIza[0-9A-Za-z_\-]{35}")),
    ("prefect-api-key", re.compile(r"\bpn[bu]_[A-Za-z0-9]{36}")),
)


def _credential_like(name: str, match: re.Match[str]) -> bool:
    """Second look at an Authorization value, so prose ("basic settings") is not one."""
    credential = match.group(1)
    if name == "bearer":  # a token has digits or symbols, or mixes case; a word does not
        return not credential.isalpha() or not (credential.islower() or credential.isupper())
    if name == "basic":  # base64 of "user:password"
        import base64
        import binascii

        try:
            decoded = base64.b64decode(credential + "=" * (-len(credential) % 4), validate=True)
        except (binascii.Error, ValueError):
            return False
        return b":" in decoded
    return True


def secret_shape(text: str) -> str | None:
    """The name of the secret shape a string has (``SECRET_SHAPES``), or None."""
    for name, pattern in SECRET_SHAPES:
        for match in pattern.finditer(text) if name in ("bearer", "basic") else ():
            if _credential_like(name, match):
                return name
        if name not in ("bearer", "basic") and pattern.search(text):
            return name
    return None


def redact(value: Any, patterns: Iterable[str], path: str = "") -> tuple[Any, list[str]]:
    """Redact secrets found without a schema; return the value and the paths redacted.

    At any depth of dicts, lists and tuples: a member whose key contains a pattern
    (case-insensitive), a pydantic ``SecretStr``/``SecretBytes``, and a string with a
    secret's shape (``SECRET_SHAPES``). The one implementation for flow-run and task
    parameters.
    """
    lowered = [p.lower() for p in patterns]
    return _redact(value, lowered, path)


def _redact(value: Any, lowered: list[str], path: str) -> tuple[Any, list[str]]:
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        hits: list[str] = []
        for index, (key, item) in enumerate(value.items()):
            if isinstance(key, str) and secret_shape(key):  # a secret used as a key
                key = f"{REDACTED}[{index}]"
                where = f"{path}.{key}" if path else key
                out[key] = REDACTED
                hits.append(where)
                continue
            where = f"{path}.{key}" if path else str(key)
            if _key_matches(key, lowered):
                out[key] = REDACTED
                hits.append(where)
            else:
                out[key], inner = _redact(item, lowered, where)
                hits.extend(inner)
        return out, hits
    if isinstance(value, (list, tuple)):
        items = [_redact(item, lowered, f"{path}[{i}]") for i, item in enumerate(value)]
        return [item for item, _ in items], [hit for _, inner in items for hit in inner]
    if hasattr(value, "get_secret_value"):  # pydantic SecretStr / SecretBytes
        return REDACTED, [path]
    if isinstance(value, str) and value != REDACTED and secret_shape(value):
        return REDACTED, [path]
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value).decode("utf-8", "replace")
        if secret_shape(text):
            return REDACTED, [path]
    return value, []


# --- redaction by JSON Schema ---------------------------------------------------------

# Keywords that only lead to other schemas (followed, not compared) or only annotate.
_STRUCTURE = frozenset(
    {
        "properties",
        "patternProperties",
        "additionalProperties",
        "items",
        "prefixItems",
        "additionalItems",
        "$defs",
        "definitions",
        "anyOf",
        "oneOf",
        "allOf",
        "$ref",
        "required",
    }
)
_ANNOTATION = frozenset({"title", "description", "position", "default", "examples"})


def _is_secret_schema(schema: Any) -> bool:
    """A JSON Schema for a secret: pydantic's SecretStr is ``format: password, writeOnly``."""
    return isinstance(schema, dict) and (
        schema.get("writeOnly") is True or schema.get("format") == "password"
    )


class _Resolver:
    """Follows one parameter schema: local ``$ref`` (JSON pointer or a definition's name),
    ``anyOf``/``oneOf``/``allOf``, members and items."""

    def __init__(self, root: Any):
        self.root = root if isinstance(root, dict) else {}
        self.definitions: dict[str, Any] = {}
        for key in ("definitions", "$defs"):
            found = self.root.get(key)
            self.definitions.update(found if isinstance(found, dict) else {})

    def _ref(self, ref: str) -> Any:
        if ref.startswith("#/"):
            node: Any = self.root
            for part in ref[2:].split("/"):
                part = part.replace("~1", "/").replace("~0", "~")
                if isinstance(node, dict) and part in node:
                    node = node[part]
                elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                    node = node[int(part)]
                else:
                    node = None
                    break
            if node is not None:
                return node
        if ref == "#":
            return self.root
        return self.definitions.get(ref.rsplit("/", 1)[-1])

    def branches(self, schema: Any, seen: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
        """A schema and every alternative it stands for, references resolved."""
        if not isinstance(schema, dict):
            return []
        out = [schema]
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref not in seen:  # a cycle ends here
            out.extend(self.branches(self._ref(ref), seen | {ref}))
        for key in ("anyOf", "oneOf", "allOf"):
            alternatives = schema.get(key)
            for branch in alternatives if isinstance(alternatives, list) else []:
                out.extend(self.branches(branch, seen))
        return out

    def member(self, branches: list[dict[str, Any]], key: Any) -> list[dict[str, Any]]:
        """What every branch says of the object member ``key``."""
        out: list[dict[str, Any]] = []
        for branch in branches:
            properties = branch.get("properties")
            matched = False
            if isinstance(properties, dict) and key in properties:
                out.extend(self.branches(properties[key]))
                matched = True
            patterns = branch.get("patternProperties")
            for pattern, sub in patterns.items() if isinstance(patterns, dict) else []:
                try:
                    hit = re.search(pattern, str(key)) is not None
                except re.error:  # a pattern Python cannot read: assume it matches
                    hit = True
                if hit:
                    out.extend(self.branches(sub))
                    matched = True
            if not matched:
                out.extend(self.branches(branch.get("additionalProperties")))
        return out

    def item(self, branches: list[dict[str, Any]], index: int) -> list[dict[str, Any]]:
        """What every branch says of the array item at ``index`` (tuples: ``prefixItems``,
        or draft-4 ``items`` as a list with ``additionalItems``)."""
        out: list[dict[str, Any]] = []
        for branch in branches:
            prefix = branch.get("prefixItems")
            items = branch.get("items")
            if isinstance(items, list):  # draft 4-7 tuple form
                prefix, items = items, branch.get("additionalItems")
            if isinstance(prefix, list) and index < len(prefix):
                out.extend(self.branches(prefix[index]))
            else:
                out.extend(self.branches(items))
        return out


def _shape(branches: list[dict[str, Any]]) -> str:
    """What a set of branches says of a value itself (not of its members), comparably."""
    views = sorted(
        json.dumps(
            {k: v for k, v in b.items() if k not in _STRUCTURE and k not in _ANNOTATION},
            sort_keys=True,
            default=str,
        )
        for b in branches
    )
    return json.dumps(sorted(set(views)))


def redact_by_schemas(value: Any, schemas: Sequence[Any], path: str = "") -> tuple[Any, list[str]]:
    """Replace values any of the parameter ``schemas`` types as secret, and values whose
    schema differs between them (one says something of a value the other does not).

    Follows ``properties``, ``patternProperties``, ``additionalProperties``, ``items``,
    ``prefixItems``, ``$ref`` into ``$defs``/``definitions`` and ``anyOf``/``oneOf``/
    ``allOf`` at any depth. With one schema only the first rule applies.
    """
    resolvers = [_Resolver(schema) for schema in schemas]
    return _by_schemas(value, [(r, r.branches(r.root)) for r in resolvers], path)


def _by_schemas(
    value: Any, sides: list[tuple[_Resolver, list[dict[str, Any]]]], path: str
) -> tuple[Any, list[str]]:
    if value is None or (isinstance(value, str) and value == REDACTED):
        return value, []
    if any(_is_secret_schema(b) for _, branches in sides for b in branches):
        return REDACTED, [path]
    differs = len({_shape(branches) for _, branches in sides}) > 1
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        hits: list[str] = []
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            members = [(r, r.member(branches, key)) for r, branches in sides]
            out[key], inner = _by_schemas(item, members, where)
            hits.extend(inner)
        return out, hits
    if isinstance(value, (list, tuple)):
        pairs = [
            _by_schemas(item, [(r, r.item(branches, i)) for r, branches in sides], f"{path}[{i}]")
            for i, item in enumerate(value)
        ]
        return [item for item, _ in pairs], [hit for _, inner in pairs for hit in inner]
    if differs:  # a leaf whose schema was changed: it may have been a secret
        return REDACTED, [path]
    return value, []


def redact_by_schema(value: Any, schema: Any, path: str = "") -> tuple[Any, list[str]]:
    """Replace values the deployment's parameter schema types as secret (e.g. SecretStr)."""
    return redact_by_schemas(value, [schema], path)


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
    reference_schema: Any = None,
    max_bytes: int = MAX_PARAMETER_BYTES,
    max_depth: int = MAX_PARAMETER_DEPTH,
) -> tuple[dict[str, Any], list[str]]:
    """The parameters as the policy may see them, and the paths redacted.

    ``schema`` is the deployment's parameter schema now; ``reference_schema`` the one the
    worker first saw for it (``parameter_schemas``). A value is redacted when either
    types it as secret, or when they differ about it.
    Raises ParameterLimitError for a document too deep, too large or not JSON.
    """
    problem = depth_problem(raw, max_depth)  # first: redaction recurses
    if problem:
        raise ParameterLimitError(problem)
    parameters, redacted = redact(dict(raw), redact_patterns)
    schemas = [schema] if reference_schema is None else [schema, reference_schema]
    parameters, typed = redact_by_schemas(parameters, schemas)
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
    reference_schema: Any = None,
    max_parameter_bytes: int = MAX_PARAMETER_BYTES,
    max_parameter_depth: int = MAX_PARAMETER_DEPTH,
    infrastructure: Infrastructure | None = None,
) -> MutationEnvelope:
    """What this flow run proposes to do, with secrets redacted; ``infrastructure`` is
    what it would start (None from a caller that does not say).

    Secrets are found by name (``redact_patterns``), by shape (``SECRET_SHAPES``) and by
    the deployment's parameter schema now and as first seen (``reference_schema``): a
    ``SecretStr`` in either, or a value whose schema changed. Raises ParameterLimitError
    when the parameters exceed a limit.
    """
    parameters, redacted = policy_parameters(
        flow_run.parameters or {},
        redact_patterns=redact_patterns,
        schema=deployment.parameter_openapi_schema if deployment is not None else None,
        reference_schema=reference_schema,
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
        infrastructure=infrastructure,
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
    why it was left out, never refused for it. Secrets are redacted by ``redact``, as
    in a flow run's parameters: by name, by type (``SecretStr``) and by shape.
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
