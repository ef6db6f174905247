"""Policy exceptions: a signed, scoped waiver of named rules until it expires.

An exception names the rules it waives (the rule ids a decision's reasons carry, such as
``prefect.governance.rules.infrastructure.deny``), optionally narrowed by an RE2 pattern
over the deny message, for which agents, deployments and pools (at least one: an
exception for everything is no exception), who owns it, why, under which ticket, and
until when. ``prefect-governance apply`` stamps ``issued_at`` and signs it with the
security team's key (``PREFECT_GOVERNANCE_EXCEPTION_SIGNING_KEY``, not the pool owner's
agent key); the worker verifies it against the keys it pins
(``PREFECT_GOVERNANCE_EXCEPTION_KEYS``), never against keys read from blocks.

The signed payload is ``{"kind": "governance-exception", "block": NAME, "exception":
FIELDS}``: a signature copied to another block name, an agent's signature (another
kind), or any field edited after signing (a later expiry, a wider scope) no longer
verifies. The worker gives the policy the exceptions that verify and apply to the run
(``input.exceptions``), expired ones included: the policy waives with those active at
``context.time`` and warns about an expired one that would have waived a deny.

Pure functions: no I/O.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from prefect_governance.core.attestation import binds
from prefect_governance.core.errors import GovernanceError
from prefect_governance.core.models import PolicyException, describe_validation
from prefect_governance.core.signing import SignatureError, SigningKey, sign, verify

KIND = "governance-exception"
FIELD = "attestation"
KEYS_ENV = "PREFECT_GOVERNANCE_EXCEPTION_KEYS"
SIGNING_KEY_ENV = "PREFECT_GOVERNANCE_EXCEPTION_SIGNING_KEY"
SIGNING_KEY_ID_ENV = "PREFECT_GOVERNANCE_EXCEPTION_SIGNING_KEY_ID"
DEFAULT_KEY_ID = "security"
DEFAULT_MAX_DAYS = 90
# An exception stamped this far in the future (the signer's clock ahead) still counts.
CLOCK_SKEW = timedelta(seconds=60)
# The rules an exception may name: a deny of a rule module (rules/*). The aggregator's own
# deny (prefect.governance.decision.deny: a malformed input) is never waivable.
RULE_PATTERN = r"^prefect\.governance\.rules\.[A-Za-z_][A-Za-z0-9_]*\.deny$"
AGGREGATOR_DENY = "prefect.governance.decision.deny"
# A person's rejection, or their not answering in time, is theirs to give: no exception
# stands in for an approver (give the agent a longer timeout instead).
APPROVAL_DENY = "prefect.governance.rules.approval.deny"
_GLOB = re.compile(r"[*?\[]")
# Rejected exceptions named per decision at most (the rest are counted).
MAX_REJECTED = 20
_UNSIGNED = (FIELD, "block_type_slug")


class ExceptionRejected(GovernanceError, ValueError):
    """An exception that waives nothing for this run, and why."""


class ExceptionInvalid(ExceptionRejected):
    """A block that does not hold an exception document at all (anybody can write junk)."""


class ExceptionSpec(BaseModel):
    """The fields of an exception document (the governance-exception block's fields)."""

    model_config = ConfigDict(extra="forbid")

    rules: list[str] = Field(
        min_length=1,
        description="Rule ids it waives, e.g. prefect.governance.rules.infrastructure.deny "
        "(a rule module's deny; never the aggregator's prefect.governance.decision.deny).",
    )
    message: str | None = Field(
        None,
        description="Optional RE2 pattern the whole deny message must match to be waived "
        '(anchored: `parameter "rows" is 500` does not waive `... is 5000`); a pattern '
        "RE2 cannot compile waives nothing.",
    )
    agents: list[str] = Field(default_factory=list, description="Agent ids it applies to.")
    deployments: list[str] = Field(
        default_factory=list,
        description="Deployments it applies to: `flow-name/deployment-name`, a glob over the "
        "deployment name of one flow (`flow-name/*`), or a deployment UUID.",
    )
    pools: list[str] = Field(default_factory=list, description="Work pools it applies to.")
    owner: str = Field(min_length=1, description="Who answers for this exception.")
    reason: str = Field(min_length=1, max_length=1000, description="Why it is granted.")
    ticket: str = Field(min_length=1, max_length=200, description="The change or risk ticket.")
    expires_at: AwareDatetime = Field(description="When it stops waiving (with a time zone).")
    issued_at: AwareDatetime | None = Field(
        None, description="When it was signed (written by `prefect-governance apply`)."
    )
    attestation: dict[str, Any] | None = Field(
        None,
        description="The security team's signature over this block's name and every other "
        "field (written by `prefect-governance apply`).",
    )

    @field_validator("rules")
    @classmethod
    def _waivable(cls, rules: list[str]) -> list[str]:
        for rule in rules:
            if rule == AGGREGATOR_DENY:
                raise ValueError(
                    f"{rule} (a malformed input) can never be waived: only a rule module's deny"
                )
            if rule == APPROVAL_DENY:
                raise ValueError(
                    f"{rule} (a rejection, or an approval that timed out) can never be waived: "
                    "no exception stands in for an approver"
                )
            if not re.match(RULE_PATTERN, rule):
                raise ValueError(
                    f"{rule!r} is not a rule module's deny (prefect.governance.rules.NAME.deny)"
                )
        return rules

    @field_validator("message")
    @classmethod
    def _pattern(cls, message: str | None) -> str | None:
        if message is not None:
            try:
                re.compile(message)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
        return message

    @field_validator("deployments")
    @classmethod
    def _one_flow(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            if _as_uuid(pattern):
                continue
            flow, slash, _ = pattern.partition("/")
            if not slash or not flow or _GLOB.search(flow):
                raise ValueError(
                    f"{pattern!r}: a deployment is `flow-name/deployment-name` (a glob only "
                    "over the deployment name of one flow) or a deployment UUID"
                )
        return patterns

    @model_validator(mode="after")
    def _scoped(self) -> ExceptionSpec:
        if not (self.agents or self.deployments or self.pools):
            raise ValueError(
                "an exception names at least one of agents, deployments or pools "
                "(an exception for everything is refused)"
            )
        return self


_Spec = TypeVar("_Spec", bound=ExceptionSpec)


def _as_uuid(text: str) -> str | None:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return None


# --- signing -------------------------------------------------------------------------


def exception_fields(spec: ExceptionSpec) -> dict[str, Any]:
    """Every field as JSON, without the attestation (extra fields included: a field the
    block gained after signing breaks the signature)."""
    dumped = spec.model_dump(mode="json")
    names = [*type(spec).model_fields, *(spec.model_extra or {})]
    return {name: dumped.get(name) for name in names if name not in _UNSIGNED}


def exception_payload(name: str, spec: ExceptionSpec) -> dict[str, Any]:
    """What the security team signs: the block's name and the exception's fields."""
    return {"kind": KIND, "block": name, "exception": exception_fields(spec)}


def check_lifetime(
    expires_at: datetime, issued_at: datetime, max_lifetime: timedelta
) -> str | None:
    """Why an exception issued then and expiring then may not be signed or used, or None."""
    if expires_at <= issued_at:
        return f"it expires at {expires_at.isoformat()}, not after it was issued"
    if expires_at - issued_at > max_lifetime:
        return (
            f"it lives {_days(expires_at - issued_at)}, longer than the maximum "
            f"{_days(max_lifetime)} (PREFECT_GOVERNANCE_EXCEPTION_MAX_DAYS)"
        )
    return None


def _days(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 86400:.4g} days"


def signed_exception(
    name: str, spec: _Spec, key: SigningKey, *, now: datetime, max_lifetime: timedelta
) -> _Spec:
    """A copy stamped ``issued_at=now`` that carries the signature for this block name;
    ValueError if its expiry is past or beyond the maximum lifetime."""
    problem = check_lifetime(spec.expires_at, now, max_lifetime)
    if problem:
        raise ValueError(problem)
    stamped = spec.model_copy(update={"issued_at": now, FIELD: None})
    signed = sign(exception_payload(name, stamped), key)
    return stamped.model_copy(update={FIELD: {k: v for k, v in signed.items() if k != "payload"}})


def verify_exception(name: str, spec: ExceptionSpec, keys: Mapping[str, str]) -> None:
    """Nothing if a pinned exception key signed this exception under this block name as it
    reads now; ExceptionRejected saying why not otherwise."""
    attestation = spec.attestation
    if not attestation:
        raise ExceptionRejected("not signed (apply it with `prefect-governance apply`)")
    if not isinstance(attestation, dict):
        raise ExceptionRejected("a malformed attestation")
    try:
        verify({**attestation, "payload": exception_payload(name, spec)}, keys)
    except SignatureError as exc:
        raise ExceptionRejected(
            f"{exc} (altered after signing, copied from another block, or signed by a key "
            "the worker does not pin for exceptions)"
        ) from None


# --- which exceptions reach the policy ---------------------------------------------------


@dataclass(frozen=True)
class RunScope:
    """What an exception's scope is matched against: the run's agent, deployment, pool."""

    agent_id: str
    pool: str
    flow_name: str | None = None
    deployment_name: str | None = None
    deployment_id: str | None = None


def applies(spec: ExceptionSpec, run: RunScope) -> bool:
    """Every scope the exception names matches the run (an unnamed one matches any)."""
    if spec.agents and run.agent_id not in spec.agents:
        return False
    if spec.pools and run.pool not in spec.pools:
        return False
    return not spec.deployments or binds(
        spec.deployments,
        flow_name=run.flow_name,
        deployment_name=run.deployment_name,
        deployment_id=run.deployment_id,
    )


def _claims(data: Any, run: RunScope) -> bool:
    """Whether a document that waives nothing claims a scope that names this run (to say
    why on this run's decision): its scope as written, however invalid the rest; one
    whose scope cannot be read is named on every run."""
    if not isinstance(data, dict):
        return True
    scope: dict[str, Any] = {
        kind: data.get(kind) or [] for kind in ("agents", "deployments", "pools")
    }
    for values in scope.values():
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            return True
    return applies(ExceptionSpec.model_construct(None, **scope), run)


def _spec_data(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: v for k, v in data.items() if k != "block_type_slug"}
    return data


def policy_exception(name: str, spec: ExceptionSpec) -> PolicyException:
    """An exception as the policy sees it."""
    assert spec.issued_at is not None
    return PolicyException(
        name=name,
        rules=list(spec.rules),
        message=spec.message,
        agents=list(spec.agents),
        deployments=list(spec.deployments),
        pools=list(spec.pools),
        owner=spec.owner,
        reason=spec.reason,
        ticket=spec.ticket,
        issued_at=spec.issued_at,
        expires_at=spec.expires_at,
    )


def check_exception(
    name: str,
    data: Any,
    *,
    keys: Mapping[str, str],
    run: RunScope,
    now: datetime,
    max_lifetime: timedelta,
) -> PolicyException | None:
    """The exception a block's data holds for the policy, None if it does not apply to
    this run, or ExceptionRejected saying why it waives nothing."""
    try:
        spec = ExceptionSpec.model_validate(_spec_data(data))
    except ValidationError as exc:
        raise ExceptionInvalid(f"invalid ({describe_validation(exc, '(document)')})") from None
    verify_exception(name, spec, keys)
    if not applies(spec, run):
        return None
    if spec.issued_at is None:  # signed without a stamp: not by apply
        raise ExceptionRejected("it has no issued_at")
    problem = check_lifetime(spec.expires_at, spec.issued_at, max_lifetime)
    if problem:
        raise ExceptionRejected(problem)
    if now + CLOCK_SKEW < spec.issued_at:
        raise ExceptionRejected(f"not valid before {spec.issued_at.isoformat()}")
    return policy_exception(name, spec)


def check_exceptions(
    documents: Mapping[str, Any],
    *,
    keys: Mapping[str, str],
    run: RunScope,
    now: datetime,
    max_lifetime: timedelta,
) -> tuple[list[PolicyException], list[str]]:
    """The exceptions among block documents (by block name) that verify and apply to this
    run, by name, and why each other one that claims to apply (or cannot be read) waives
    nothing: exception documents first, then the blocks that hold none (so junk blocks,
    which any API client can write, never push a real document's rejection out of the
    first ``MAX_REJECTED``)."""
    found: list[PolicyException] = []
    rejected: list[str] = []
    junk: list[str] = []
    for name in sorted(documents):
        data = documents[name]
        try:
            exception = check_exception(
                name, data, keys=keys, run=run, now=now, max_lifetime=max_lifetime
            )
        except ExceptionRejected as exc:
            if _claims(data, run):
                into = junk if isinstance(exc, ExceptionInvalid) else rejected
                into.append(f"exception {name!r}: {exc}")
        except Exception as exc:  # a hostile document rejects itself, not the others
            junk.append(f"exception {name!r}: unreadable ({type(exc).__name__})")
        else:
            if exception is not None:
                found.append(exception)
    rejected += junk
    if len(rejected) > MAX_REJECTED:
        rejected = [*rejected[:MAX_REJECTED], f"... and {len(rejected) - MAX_REJECTED} more"]
    return found, rejected


def expiring_soon(
    exceptions: list[PolicyException], names: set[str], now: datetime, within: timedelta
) -> list[str]:
    """Notes on the named exceptions (those that waived a deny) that expire within ``within``
    of ``now``: the run's log shows them, ahead of the day they stop waiving."""
    return [
        f"exception {e.name!r} waived a deny of this run and expires at "
        f"{e.expires_at.isoformat()} (ticket {e.ticket}, owner {e.owner})"
        for e in exceptions
        if e.name in names and now < e.expires_at <= now + within
    ]


def status(spec: ExceptionSpec, now: datetime, within: timedelta) -> str:
    """active, expiring (within ``within``) or expired at ``now``."""
    if spec.expires_at <= now:
        return "expired"
    if spec.expires_at <= now + within:
        return "expiring"
    return "active"


# --- what an operator sees ---------------------------------------------------------------


@dataclass(frozen=True)
class Listed:
    """One exception block as `prefect-governance exception list` shows it."""

    name: str
    status: str  # active | expiring | expired | unverified | invalid
    spec: ExceptionSpec | None
    problem: str | None = None

    def row(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "name": self.name,
            "status": self.status,
            "expires_at": spec.expires_at.isoformat() if spec else None,
            "rules": list(spec.rules) if spec else [],
            "agents": list(spec.agents) if spec else [],
            "deployments": list(spec.deployments) if spec else [],
            "pools": list(spec.pools) if spec else [],
            "owner": spec.owner if spec else None,
            "ticket": spec.ticket if spec else None,
            "problem": self.problem,
        }


def listing(
    documents: Mapping[str, Any],
    *,
    keys: Mapping[str, str],
    now: datetime,
    within: timedelta,
    max_lifetime: timedelta,
) -> list[Listed]:
    """Every exception block with its status at ``now``: a verified one is active,
    expiring (within ``within``) or expired; the others are unverified or invalid."""
    listed = []
    for name in sorted(documents):
        try:
            spec = ExceptionSpec.model_validate(_spec_data(documents[name]))
        except (ValidationError, TypeError, ValueError) as exc:
            problem = (
                describe_validation(exc, "(document)")
                if isinstance(exc, ValidationError)
                else type(exc).__name__
            )
            listed.append(Listed(name, "invalid", None, problem))
            continue
        try:
            verify_exception(name, spec, keys)
            if spec.issued_at is None:
                raise ExceptionRejected("it has no issued_at")
            too_long = check_lifetime(spec.expires_at, spec.issued_at, max_lifetime)
            if too_long:
                raise ExceptionRejected(too_long)
        except ExceptionRejected as exc:
            listed.append(Listed(name, "unverified", spec, str(exc)))
            continue
        listed.append(Listed(name, status(spec, now, within), spec))
    return listed
