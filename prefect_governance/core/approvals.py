"""Signed approvals: an approver's statement that one run may go ahead, which the worker
verifies against the approver's key it pins before the policy sees it.

An approval is a document signed (``prefect_governance.core.signing``) with the approver's
Ed25519 key; its key id is the approver's name. It is bound either to one flow run or to
a deployment, and in both cases to the sha256 of the run's parameters (canonical JSON, as
the run holds them): a run whose parameters differ is not approved. It is stored as a
Prefect variable whose name says what it is bound to, so the worker finds it by name.
Anybody who may write variables can write such a variable: what makes an approval is the
signature by a pinned key, never the variable.

Pure functions decide (``check_approval``, ``check_approvals``); reading and writing
variables is at the edges (``store_approval``, ``read_approval_documents``).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from prefect_governance.core.canonical import sha256_of
from prefect_governance.core.errors import GovernanceError
from prefect_governance.core.models import Approval, describe_validation
from prefect_governance.core.signing import SignatureError, SigningKey, sign, verify

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient

# What the signed payload is: a signature over another kind of document is not an approval.
APPROVAL_TYPE: Literal["prefect-governance/approval/v1"] = "prefect-governance/approval/v1"
# Variables holding approvals: <prefix><binding key>-<approval id>.
VARIABLE_PREFIX = "governance-approval-"
VARIABLE_TAG = "governance-approval"
# An approval issued this far in the future (clock skew between approver and worker) is valid.
CLOCK_SKEW = timedelta(seconds=60)
MAX_REASON_LENGTH = 500
# Statements read per binding at most (pages of the server's largest page).
MAX_STATEMENTS = 600
_PAGE = 200

_SHA256 = r"^sha256:[0-9a-f]{64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FlowRunBinding(_Strict):
    """This one flow run, with these parameters."""

    kind: Literal["flow_run"] = "flow_run"
    flow_run_id: str
    parameters_sha256: str = Field(pattern=_SHA256)


class DeploymentBinding(_Strict):
    """Any run of this deployment with exactly these parameters."""

    kind: Literal["deployment"] = "deployment"
    deployment_id: str
    parameters_sha256: str = Field(pattern=_SHA256)


Binding = Annotated[FlowRunBinding | DeploymentBinding, Field(discriminator="kind")]


class ApprovalStatement(_Strict):
    """The signed payload of an approval."""

    type: Literal["prefect-governance/approval/v1"] = APPROVAL_TYPE
    id: str = Field(pattern=r"^[0-9a-f]{32}$")
    approver: str = Field(min_length=1)
    binding: Binding
    issued_at: AwareDatetime
    expires_at: AwareDatetime
    reason: str | None = Field(None, max_length=MAX_REASON_LENGTH)
    # A rejection refuses the run. Left out of the signed payload when "approve", so an
    # approval reads as it did before rejections existed.
    decision: Literal["approve", "reject"] = "approve"


class ApprovalRejected(GovernanceError, ValueError):
    """A statement that does not approve this run, and why."""


# --- pure: binding, hashing, naming ----------------------------------------------------


def parameters_sha256(parameters: Mapping[str, Any]) -> str:
    """``sha256:<hex>`` of a run's parameters (canonical JSON, as the run holds them)."""
    return sha256_of(dict(parameters))


def run_parameters(defaults: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters a run created from a deployment holds: the deployment's defaults,
    overridden by the ones given (what Prefect's server does on creation)."""
    return {**defaults, **given}


def binding_key(binding: FlowRunBinding | DeploymentBinding) -> str:
    """The part of a variable name that says what an approval is bound to."""
    if isinstance(binding, FlowRunBinding):
        return f"run-{_name_part(binding.flow_run_id)}"
    digest = binding.parameters_sha256.removeprefix("sha256:")
    return f"dep-{_name_part(binding.deployment_id)}-{digest}"


def _name_part(value: str) -> str:
    """A value as Prefect allows it in a variable name (lowercase, digits, dashes)."""
    return re.sub(r"[^a-z0-9-]", "-", value.lower())


def variable_name(statement: ApprovalStatement) -> str:
    return f"{VARIABLE_PREFIX}{binding_key(statement.binding)}-{statement.id}"


def lookup_prefixes(
    *, flow_run_id: str, deployment_id: str | None, parameters_hash: str
) -> list[str]:
    """The variable-name prefixes under which approvals of this run are stored."""
    bindings: list[FlowRunBinding | DeploymentBinding] = [
        FlowRunBinding(flow_run_id=flow_run_id, parameters_sha256=parameters_hash)
    ]
    if deployment_id is not None:
        bindings.append(
            DeploymentBinding(deployment_id=deployment_id, parameters_sha256=parameters_hash)
        )
    return [f"{VARIABLE_PREFIX}{binding_key(b)}-" for b in bindings]


def parse_duration(text: str) -> timedelta:
    """``90s``, ``30m``, ``1h``, ``2d`` as a timedelta (positive)."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhd])\s*", text)
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"expected a duration such as 30m, 1h or 2d, got {text!r}")
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
    return timedelta(**{unit: int(match.group(1))})


def new_statement(
    *,
    approver: str,
    binding: FlowRunBinding | DeploymentBinding,
    now: datetime,
    ttl: timedelta,
    reason: str | None = None,
    decision: Literal["approve", "reject"] = "approve",
) -> ApprovalStatement:
    return ApprovalStatement(
        id=uuid.uuid4().hex,
        approver=approver,
        binding=binding,
        issued_at=now,
        expires_at=now + ttl,
        reason=reason,
        decision=decision,
    )


def sign_statement(statement: ApprovalStatement, key: SigningKey) -> dict[str, Any]:
    """The signed approval; the key's id must be the approver's name."""
    if key.key_id != statement.approver:
        raise ValueError(f"the key's id {key.key_id!r} is not the approver {statement.approver!r}")
    payload = statement.model_dump(mode="json")
    if payload["decision"] == "approve":
        del payload["decision"]
    return sign(payload, key)


# --- pure: verification ------------------------------------------------------------------


def check_approval(
    document: Any,
    *,
    keys: Mapping[str, str],
    flow_run_id: str,
    deployment_id: str | None,
    parameters_hash: str,
    now: datetime,
) -> Approval:
    """The verified approval a document holds for this run, or ApprovalRejected saying why.

    Verified: signed by the key pinned for the approver it names, bound to this flow run
    or to this run's deployment, with this run's parameters, and valid at ``now``.
    """
    try:
        payload = verify(document, keys)
    except SignatureError as exc:
        raise ApprovalRejected(str(exc)) from None
    try:
        statement = ApprovalStatement.model_validate(payload)
    except ValidationError as exc:
        problems = describe_validation(exc, "(payload)")
        raise ApprovalRejected(f"not an approval statement ({problems})") from None
    if statement.approver != document["kid"]:
        raise ApprovalRejected(
            f"signed with the key of {document['kid']!r} but names {statement.approver!r} "
            "as the approver"
        )
    binding = statement.binding
    if isinstance(binding, FlowRunBinding):
        if binding.flow_run_id != flow_run_id:
            raise ApprovalRejected(f"bound to another flow run ({binding.flow_run_id})")
    elif deployment_id is None or binding.deployment_id != deployment_id:
        raise ApprovalRejected(f"bound to another deployment ({binding.deployment_id})")
    if binding.parameters_sha256 != parameters_hash:
        raise ApprovalRejected(
            f"bound to other parameters ({binding.parameters_sha256}, the run's are "
            f"{parameters_hash})"
        )
    if now >= statement.expires_at:
        raise ApprovalRejected(f"expired at {statement.expires_at.isoformat()}")
    if now + CLOCK_SKEW < statement.issued_at:
        raise ApprovalRejected(f"not valid before {statement.issued_at.isoformat()}")
    return Approval(
        id=statement.id,
        approver=statement.approver,
        binding=binding.kind,
        issued_at=statement.issued_at,
        expires_at=statement.expires_at,
        decision=statement.decision,
    )


def check_approvals(
    documents: Mapping[str, Any],
    *,
    keys: Mapping[str, str],
    flow_run_id: str,
    deployment_id: str | None,
    parameters_hash: str,
    now: datetime,
) -> tuple[list[Approval], list[str]]:
    """The verified approvals among documents (by where they were found), each id once,
    and why each of the others approves nothing."""
    verified: dict[str, Approval] = {}
    rejected: list[str] = []
    for where in sorted(documents):
        try:
            approval = check_approval(
                documents[where],
                keys=keys,
                flow_run_id=flow_run_id,
                deployment_id=deployment_id,
                parameters_hash=parameters_hash,
                now=now,
            )
        except ApprovalRejected as exc:
            rejected.append(f"{where}: {exc}")
        except Exception as exc:  # a hostile document rejects itself, not the others
            rejected.append(f"{where}: unreadable ({type(exc).__name__})")
        else:
            verified.setdefault(approval.id, approval)
    return sorted(verified.values(), key=lambda a: (a.approver, a.id)), rejected


# --- I/O: Prefect variables --------------------------------------------------------------


async def store_approval(client: PrefectClient, signed: dict[str, Any]) -> str:
    """Store a signed approval as a Prefect variable; return the variable's name."""
    from prefect.client.schemas.actions import VariableCreate

    statement = ApprovalStatement.model_validate(signed["payload"])
    name = variable_name(statement)
    await client.create_variable(VariableCreate(name=name, value=signed, tags=[VARIABLE_TAG]))
    return name


async def read_approval_documents(client: PrefectClient, prefixes: Iterable[str]) -> dict[str, Any]:
    """The values of the variables whose names start with one of the prefixes, by name."""
    found: dict[str, Any] = {}
    for prefix in prefixes:
        offset = 0
        while offset < MAX_STATEMENTS:
            response = await client.request(
                "POST",
                "/variables/filter",
                json={
                    "variables": {"name": {"like_": prefix}},
                    "sort": "NAME_ASC",
                    "offset": offset,
                    "limit": _PAGE,
                },
            )
            response.raise_for_status()
            page = response.json()
            for variable in page:  # `like_` matches anywhere, and `_` is a wildcard
                if variable["name"].startswith(prefix):
                    found[variable["name"]] = variable["value"]
            if len(page) < _PAGE:
                break
            offset += _PAGE
        else:  # fail closed: an unread statement may be a rejection
            raise GovernanceError(
                f"more than {MAX_STATEMENTS} variables match {prefix!r}: the run's approvals "
                "and rejections cannot all be read"
            )
    return found


async def approvals_for_run(
    client: PrefectClient,
    *,
    flow_run_id: str,
    deployment_id: str | None,
    parameters: Mapping[str, Any],
    keys: Mapping[str, str],
    now: datetime,
) -> tuple[list[Approval], list[str]]:
    """Read the approvals stored for a run and verify them: (verified, rejected with why)."""
    parameters_hash = parameters_sha256(parameters)
    prefixes = lookup_prefixes(
        flow_run_id=flow_run_id, deployment_id=deployment_id, parameters_hash=parameters_hash
    )
    documents = await read_approval_documents(client, prefixes)
    return check_approvals(
        documents,
        keys=keys,
        flow_run_id=flow_run_id,
        deployment_id=deployment_id,
        parameters_hash=parameters_hash,
        now=now,
    )


async def binding_for_flow_run(
    client: PrefectClient, flow_run_id: str
) -> tuple[FlowRunBinding, str | None]:
    """The binding to one flow run and the parameters it holds now, and the name of the
    run's state (an approval counts only when it is stored before the run is decided)."""
    run = await client.read_flow_run(uuid.UUID(flow_run_id))
    binding = FlowRunBinding(
        flow_run_id=str(run.id), parameters_sha256=parameters_sha256(run.parameters or {})
    )
    return binding, run.state.type.value if run.state else None


async def binding_for_deployment(
    client: PrefectClient, deployment: str, parameters: Mapping[str, Any]
) -> DeploymentBinding:
    """The binding to a deployment (``FLOW/NAME`` or its id) and the parameters its runs
    hold when created with ``parameters`` (the deployment's defaults filled in)."""
    try:
        deployment_id = uuid.UUID(deployment)
    except ValueError:
        found = await client.read_deployment_by_name(deployment)
    else:
        found = await client.read_deployment(deployment_id)
    return DeploymentBinding(
        deployment_id=str(found.id),
        parameters_sha256=parameters_sha256(run_parameters(found.parameters or {}, parameters)),
    )
