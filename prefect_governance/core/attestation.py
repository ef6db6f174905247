"""The pool owner's signature over an agent block, and who may act as the agent.

An agent decides what a run may do (capabilities, trust scope, parameter rules,
policy path), so it must come from the pool owner, not from whoever can write a
block. ``prefect-governance apply`` signs each agent with the pool owner's Ed25519
key; the worker verifies it against the keys it pins (``PREFECT_GOVERNANCE_AGENT_KEYS``),
never against keys read from blocks.

The signed payload is ``{"kind": "governance-agent", "block": NAME, "agent": FIELDS}``:
the block's name and every field of the agent (its canonical model dump, without the
attestation itself). So a signature copied to another block name, or any field edited
after signing, no longer verifies. The block stores the signed document without its
payload (``kid``, ``alg``, ``signature``); the verifier rebuilds the payload from the
block it reads.

Pure functions: no I/O.
"""

from __future__ import annotations

import fnmatch
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from prefect_governance.core.errors import GovernanceError
from prefect_governance.core.signing import SignatureError, SigningKey, sign, verify

if TYPE_CHECKING:
    from prefect_governance.worker.blocks import GovernanceAgent

KIND = "governance-agent"
FIELD = "attestation"  # the block field that holds the signature
KEYS_ENV = "PREFECT_GOVERNANCE_AGENT_KEYS"
SIGNING_KEY_ENV = "PREFECT_GOVERNANCE_AGENT_SIGNING_KEY"
SIGNING_KEY_ID_ENV = "PREFECT_GOVERNANCE_AGENT_SIGNING_KEY_ID"
DEFAULT_KEY_ID = "pool-owner"
# Not the agent's: the signature itself, and the marker Prefect's serializer adds to a
# block's dump (read back, it lands among the extra fields).
_UNSIGNED = (FIELD, "block_type_slug")
# Fields newer than the first signed agents: unset (None), they are left out of the payload,
# so an agent signed before they existed still verifies. None and absent mean the same, so
# setting one after signing still breaks the signature.
_NEWER = (
    ("constraints", "infrastructure"),
    ("trust_weights", "capability_blocked"),
    ("constraints", "approval", "timeout_seconds"),
)


class AttestationError(GovernanceError, ValueError):
    """An agent block the pool owner did not sign as it reads now."""


def agent_fields(agent: GovernanceAgent) -> dict[str, Any]:
    """Every field of the agent as JSON, without its attestation (extra fields included:
    a field the block gained after signing breaks the signature)."""
    dumped = agent.model_dump(mode="json")
    names = [*type(agent).model_fields, *(agent.model_extra or {})]
    fields = {name: dumped.get(name) for name in names if name not in _UNSIGNED}
    for *parents, name in _NEWER:
        section: Any = fields
        for parent in parents:
            section = section.get(parent) if isinstance(section, dict) else None
        if isinstance(section, dict) and section.get(name, ...) is None:
            del section[name]
    return fields


def agent_payload(name: str, agent: GovernanceAgent) -> dict[str, Any]:
    """What the pool owner signs: the block's name and the agent's fields."""
    return {"kind": KIND, "block": name, "agent": agent_fields(agent)}


def attest(name: str, agent: GovernanceAgent, key: SigningKey) -> dict[str, Any]:
    """The attestation to store in the block: the signed document minus its payload."""
    signed = sign(agent_payload(name, agent), key)
    return {k: v for k, v in signed.items() if k != "payload"}


def signed(name: str, agent: GovernanceAgent, key: SigningKey) -> GovernanceAgent:
    """A copy of the agent that carries the pool owner's attestation for this block name."""
    return agent.model_copy(update={FIELD: attest(name, agent, key)})


def verify_agent(name: str, agent: GovernanceAgent, keys: Mapping[str, str]) -> None:
    """Nothing if the pool owner signed this agent under this block name with a pinned key;
    AttestationError saying why not otherwise."""
    if not keys:
        raise AttestationError(
            f"agent block {name!r} cannot be verified: the worker pins no agent keys "
            f'(set {KEYS_ENV} to the pool owner\'s {{"KID": "PUBLIC"}}, '
            "printed by `prefect-governance keygen`)"
        )
    attestation = getattr(agent, FIELD, None)
    if not attestation:
        raise AttestationError(
            f"agent block {name!r} is not signed by the pool owner "
            "(apply it with `prefect-governance apply --signing-key ...`)"
        )
    if not isinstance(attestation, dict):
        raise AttestationError(f"agent block {name!r} has a malformed attestation")
    document = {**attestation, "payload": agent_payload(name, agent)}
    try:
        verify(document, keys)
    except SignatureError as exc:
        raise AttestationError(
            f"agent block {name!r} does not carry the pool owner's signature for it as it "
            f"reads now: {exc} (altered, copied from another block, or signed by another key)"
        ) from None


def rollback_reason(name: str, version: int, last_decided: int | None) -> str | None:
    """Why an agent block is refused as a rollback, or None.

    Every version the pool owner signed verifies forever, so an API client could save an
    older signed version (more capabilities, a wider scope) over the current one. The worker
    refuses an agent whose version is below the one it last decided a run of that agent
    with (recorded in the lineage): the pool owner raises ``version`` with every change.
    """
    if last_decided is None or version >= last_decided:
        return None
    return (
        f"agent block {name!r} is version {version}, older than version {last_decided} "
        "this agent's last run was decided with (a signed older version saved again?); "
        "the pool owner applies a version above it"
    )


def binds(
    patterns: Sequence[str],
    *,
    flow_name: str | None,
    deployment_name: str | None,
    deployment_id: str | uuid.UUID | None,
) -> bool:
    """Does the agent's ``deployments`` list name this deployment?

    A pattern is a deployment UUID, an exact ``flow-name/deployment-name``, or an
    fnmatch glob over that name (case-sensitive). An empty list binds nothing, and a
    run without a deployment (an ad-hoc run) is never bound: nobody requested the
    agent through a deployment the pool owner named.
    """
    if deployment_id is None or not flow_name or not deployment_name:
        return False
    full_name = f"{flow_name}/{deployment_name}"
    wanted_id = str(deployment_id).lower()
    for pattern in patterns:
        if _as_uuid(pattern) == wanted_id:
            return True
        if fnmatch.fnmatchcase(full_name, pattern):
            return True
    return False


def _as_uuid(text: str) -> str | None:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return None
