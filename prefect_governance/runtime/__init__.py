"""Inside a governed flow run: the verified envelope, the agent, memory proposals.

The governed worker hands an allowed run a signed grant (decision, envelope,
agent, memory snapshot) in ``PREFECT_GOVERNANCE_ENVELOPE``. These functions
verify it before trusting any of it: the signature (with a public key from
``PREFECT_GOVERNANCE_TRUSTED_KEYS`` or the ``governance-verify-key`` block named
by the key id), that it was issued for this very flow run, and its expiry.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, cast

from pydantic import ValidationError

from prefect_governance.core.errors import GovernanceError
from prefect_governance.core.handoff import (
    ENVELOPE_ENV,
    PROPOSAL_KEY,
    STARTED_AT_ENV,
    TRUSTED_KEYS_ENV,
)
from prefect_governance.core.models import (
    AgentObject,
    Grant,
    MemorySnapshot,
    MutationEnvelope,
    ParentRun,
)
from prefect_governance.core.signing import SignatureError, verify


class EnvelopeError(GovernanceError, RuntimeError):
    """This run's governance envelope is missing, forged, expired or not its own."""


@dataclass(frozen=True)
class CurrentAgent:
    """The agent this run acts as, as decided: identity, trust and memory."""

    agent: AgentObject
    memory: MemorySnapshot
    decision_id: str

    @property
    def id(self) -> str:
        return self.agent.id


@dataclass(frozen=True)
class Verified:
    """A verified grant and the signature it came with."""

    grant: Grant
    kid: str
    signature: str

    def parent(self) -> ParentRun:
        """The flow run as its tasks' envelopes name it: the signed envelope and the grants."""
        grant = self.grant
        return ParentRun(
            envelope=grant.envelope,
            decision_id=grant.decision_id,
            verdict=grant.verdict,
            grants=list(grant.grants),
            kid=self.kid,
            signature=self.signature,
        )


def verify_grant(
    signed_text: str | None,
    *,
    flow_run_id: str | None,
    now: datetime,
    public_key: Callable[[str], str | None],
) -> Grant:
    """Verify a signed grant for one flow run, or raise EnvelopeError saying why."""
    return verify_signed_grant(
        signed_text, flow_run_id=flow_run_id, now=now, public_key=public_key
    ).grant


def verify_signed_grant(
    signed_text: str | None,
    *,
    flow_run_id: str | None,
    now: datetime,
    public_key: Callable[[str], str | None],
) -> Verified:
    """Verify a signed grant for one flow run (keeping its signature), or raise EnvelopeError."""
    if not signed_text:
        raise EnvelopeError(
            f"this run has no governance envelope ({ENVELOPE_ENV} is not set): "
            "it was not started by a governed worker"
        )
    try:
        signed = json.loads(signed_text)
    except json.JSONDecodeError as exc:
        raise EnvelopeError(f"the governance envelope is not JSON: {exc}") from exc
    kid = signed.get("kid") if isinstance(signed, dict) else None
    key = public_key(kid) if isinstance(kid, str) else None
    try:
        payload = verify(signed, {kid: key} if isinstance(kid, str) and key else {})
    except SignatureError as exc:
        raise EnvelopeError(f"the governance envelope is forged or damaged: {exc}") from exc
    try:
        grant = Grant.model_validate(payload)
    except ValidationError as exc:
        raise EnvelopeError(f"the governance envelope is malformed: {exc}") from exc
    issued_for = grant.envelope.flow_run.id
    if flow_run_id is None or issued_for != str(flow_run_id):
        raise EnvelopeError(
            f"the governance envelope was issued for flow run {issued_for}, "
            f"not for this one ({flow_run_id}): it is replayed"
        )
    if now >= grant.envelope.expires_at:
        raise EnvelopeError(f"the governance envelope expired at {grant.envelope.expires_at}")
    return Verified(grant, str(kid), str(signed["signature"]))


def _trusted_keys() -> Mapping[str, str]:
    raw = os.environ.get(TRUSTED_KEYS_ENV)
    if not raw:
        return {}
    try:
        keys = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise EnvelopeError(f"{TRUSTED_KEYS_ENV} is not a JSON object of key id to key") from exc
    return keys if isinstance(keys, dict) else {}


def _public_key(kid: str) -> str | None:
    """The trusted public key for a key id: from the environment, else the Prefect block."""
    trusted = _trusted_keys()
    if trusted:
        return trusted.get(kid)
    from prefect_governance.core.keys import GovernanceVerifyKey

    try:
        # _sync: this is sync code, also when a governed task of an async flow calls it
        # (which would otherwise get a coroutine); async_dispatch's types omit _sync.
        block = GovernanceVerifyKey.load(kid, _sync=True)  # type: ignore[call-arg]
        return cast(GovernanceVerifyKey, block).public_key
    except (ValueError, ValidationError):
        return None


_verified: dict[str, Verified] = {}


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.id


def _started_at() -> datetime:
    """When the gate started this run (its grant's expiry bounds that), else now."""
    raw = os.environ.get(STARTED_AT_ENV)
    try:
        started = datetime.fromisoformat(raw) if raw else None
    except ValueError:
        started = None
    if started is None or started.tzinfo is None:
        return datetime.now(timezone.utc)
    return min(started, datetime.now(timezone.utc))


def current_verified() -> Verified:
    """This flow run's verified grant and signature (verified once per run, then cached).

    The expiry bounds when a run may start: a run the gate started in time keeps its
    authority, however long it takes before its first governed task.
    """
    run_id = _flow_run_id()
    if run_id and run_id in _verified:
        return _verified[run_id]
    verified = verify_signed_grant(
        os.environ.get(ENVELOPE_ENV),
        flow_run_id=run_id,
        now=_started_at(),
        public_key=_public_key,
    )
    _verified[str(run_id)] = verified
    return verified


def current_grant() -> Grant:
    """The verified grant of this flow run."""
    return current_verified().grant


def current_envelope() -> MutationEnvelope:
    """What this run was allowed to do, verified."""
    return current_grant().envelope


def current_agent() -> CurrentAgent:
    """Who this run acts as: identity, trust and the memory at decision time, verified."""
    grant = current_grant()
    return CurrentAgent(agent=grant.agent, memory=grant.memory, decision_id=grant.decision_id)


_proposals: dict[str, int] = {}  # proposals numbered per flow run, in order
_proposals_lock = threading.Lock()


def propose_memory(patch: dict[str, Any]) -> None:
    """Propose a change to the agent's memory (a JSON merge patch, RFC 7386).

    Inside a governed task, the proposal belongs to the task: when the task ends it is
    checked against the agent's memory schema (and the task policy, purpose ``commit``),
    and if accepted applies to the run's memory (``current_memory``) at once; the worker
    commits it after the run, in task order. Outside a governed task, it travels back to
    the worker as an artifact of this run, numbered and authenticated with the run's
    report secret (``prefect_governance.core.reports``); after the run completes, the
    worker validates it against the agent's memory schema and commits it, or rejects it.
    """
    if not isinstance(patch, dict):
        raise TypeError("a memory proposal is a JSON object (a merge patch)")
    patch = json.loads(json.dumps(patch))  # must be JSON (TypeError otherwise); a copy
    grant = current_grant()
    from prefect_governance.runtime.tasks import current_task

    task = current_task.get()
    if task is not None:
        task.state.proposals.append(patch)
        return
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate

    from prefect_governance.core.handoff import REPORT_SECRET_ENV
    from prefect_governance.core.reports import MemoryProposal
    from prefect_governance.runtime.run_log import sealed

    run_id = grant.envelope.flow_run.id
    # Numbered once sent: a proposal Prefect did not take leaves no gap for the next one.
    with _proposals_lock, get_client(sync_client=True) as client:
        seq = _proposals.get(run_id, 0) + 1
        data = sealed(
            os.environ.get(REPORT_SECRET_ENV),
            run_id,
            grant.decision_id,
            PROPOSAL_KEY,
            MemoryProposal(seq=seq, patch=patch, base_version=grant.memory.version),
        )
        client.create_artifact(
            ArtifactCreate(
                key=PROPOSAL_KEY,
                type="json",
                description=f"Memory proposal for agent {grant.agent.id}",
                data=data,
                flow_run_id=run_id,
            )
        )
        _proposals[run_id] = seq
