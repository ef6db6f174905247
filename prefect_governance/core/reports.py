"""Authenticated reports from inside a run (pure; imported by the run's untrusted side).

Any Prefect API client can create artifacts on any flow run, so an artifact proves
nothing by itself. The governed worker derives a secret for each run it starts from
a root only it holds and the run's decision id (:func:`report_secret`), and hands it
to the run in its environment only (never through the Prefect API, never in the
signed grant, which is not secret). The run authenticates each report it sends
(:func:`seal`): an HMAC-SHA256 over the canonical JSON of the report, its flow run,
its decision, its kind (the artifact key) and its sequence numbers. The worker
accepts a report only when that MAC verifies with the secret it derives again
(:func:`check_seal`).

What a MAC proves: the report was made by the process that received this run's
secret (the run itself) or by the worker. It does not prove the run told the truth:
the run's code holds its own secret, so what it reports is still checked against
the worker's own record (the signed grant, the re-decided task decisions).

The reports are pydantic models (:class:`TaskDecisionReport`, :class:`CapabilityUseReport`,
:class:`RunEventsReport`, :class:`MemoryProposal`): the run builds them, and the worker
reads what it accepted through them. A model keeps every key the run sent, and dumps only
the keys that were set (``report``), so the wire format, and the MAC over it, is what it
was. What the worker reads is the run's word: the fields that the checks below look at
are typed ``Any`` there, and the checks say what is wrong with them.

This module holds no credentials and imports no storage: only ``hmac``/``hashlib`` and
pydantic.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

from prefect_governance.core.canonical import canonical_json
from prefect_governance.core.models import RUNNABLE

MAC_FIELD = "mac"
VERSION = 1
_LABEL = b"prefect-governance report secret v1\x00"


class Report(BaseModel):
    """A report (or one event of a batch) as the run sent it: every key it sent is kept."""

    model_config = ConfigDict(extra="allow", frozen=True)

    def report(self) -> dict[str, Any]:
        """The JSON object sent: the keys that were set, and no others."""
        return self.model_dump(mode="json", exclude_unset=True)


class TaskDecisionReport(Report):
    """A governed task's decision inside the run (``runtime.tasks``)."""

    kind: Literal["task_decision"] = "task_decision"
    seq: Any = None  # 1, 2, ... within the run's events
    time: Any = None  # ISO time the run numbered it
    purpose: Any = None
    task: Any = None  # the task (name, run id, attempt)
    envelope: Any = None  # the task's envelope, without the parent's (the worker has it)
    context: Any = None
    posture: Any = None  # the posture the task inherited (TaskPosture), as the run saw it
    decision: Any = None  # the run's Decision, as JSON

    @property
    def decided(self) -> dict[str, Any]:
        """The reported decision (an object, or nothing)."""
        return self.decision if isinstance(self.decision, dict) else {}

    @property
    def task_envelope(self) -> dict[str, Any]:
        return self.envelope if isinstance(self.envelope, dict) else {}


class CapabilityUseReport(Report):
    """One use of a capability inside the run, allowed or blocked (``runtime.capabilities``)."""

    kind: Literal["capability_use"] = "capability_use"
    seq: Any = None
    time: Any = None
    capability: Any = None
    use: Any = None
    granted: Any = None  # True when the run's runtime allowed it
    reason: Any = None  # why it was blocked
    task: Any = None  # the task that used it (None: the flow itself)


class TaskEndReport(Report):
    """How a governed task ended and how it moved the run's posture (``runtime.posture``)."""

    kind: Literal["task_end"] = "task_end"
    seq: Any = None
    time: Any = None
    task: Any = None  # the task (name, run id, key, attempt)
    outcome: Any = None  # core.posture.OUTCOMES
    blocked: Any = None  # True when a capability use was blocked inside it
    writes: Any = None  # the memory fields the task declared
    proposals: Any = None  # its memory proposals (merge patches, in order), if any
    accepted: Any = None  # True when the run applied them
    errors: Any = None  # why the run rejected it
    posture: Any = None  # the posture after it, as the run computed it (TaskPosture)


RunEvent = TaskDecisionReport | CapabilityUseReport | TaskEndReport
_EVENT_MODELS: dict[str, type[RunEvent]] = {
    "task_decision": TaskDecisionReport,
    "capability_use": CapabilityUseReport,
    "task_end": TaskEndReport,
}


def run_event(kind: str, fields: Mapping[str, Any]) -> RunEvent:
    """One event of the run as its model (``kind`` one of ``handoff.EVENT_KINDS``)."""
    return _EVENT_MODELS[kind].model_validate({"kind": kind, **fields})


class RunEventsReport(Report):
    """One batch of the run's events (``runtime.run_log``): its decision, the [first, last]
    range of its numbers, the events."""

    decision_id: Any = None
    seq: Any = None
    events: Any = None


class MemoryProposal(Report):
    """A proposed change to the agent's memory (``runtime.propose_memory``)."""

    decision_id: Any = None
    seq: Any = None  # 1, 2, ... within the run's proposals
    patch: Any = None  # a JSON merge patch (RFC 7386)
    base_version: Any = None  # the memory version the run was granted


_R = TypeVar("_R", bound=Report)


def as_report(model: type[_R], value: _R | Mapping[str, Any]) -> _R:
    """A report as its model (a model is taken as it is; a mapping is read into one)."""
    return value if isinstance(value, model) else model.model_validate(dict(value))


def report_secret(root: bytes, decision_id: str) -> str:
    """The report secret of one run: HMAC-SHA256(root, label || decision id), base64url.

    The worker's root is its lineage key's seed (``PREFECT_GOVERNANCE_LINEAGE_KEY``), so a
    restarted worker or its reconciler derives the same secret again.
    """
    if not root:
        raise ValueError("a report secret needs a root")
    digest = hmac.new(root, _LABEL + decision_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def _mac(secret: str, *, flow_run_id: str, kind: str, body: dict[str, Any]) -> str:
    message = canonical_json(
        {"v": VERSION, "flow_run_id": str(flow_run_id), "kind": kind, "body": body}
    )
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def seal(secret: str, *, flow_run_id: str, kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """The report as sent: the body (which names its decision id and sequence numbers)
    with its MAC."""
    body = {k: v for k, v in body.items() if k != MAC_FIELD}
    return {**body, MAC_FIELD: _mac(secret, flow_run_id=flow_run_id, kind=kind, body=body)}


def check_seal(
    secret: str | None,
    data: Any,
    *,
    flow_run_id: str,
    decision_id: str,
    kind: str,
) -> str | None:
    """Why a report may not be believed, or None when its MAC verifies for this run.

    ``secret`` is the run's secret as the worker derives it (None: it cannot);
    ``flow_run_id``, ``decision_id`` and ``kind`` are what the worker knows of the run
    and of where it read the report, never what the report says.
    """
    if not isinstance(data, dict):
        return "it is not a JSON object"
    mac = data.get(MAC_FIELD)
    if not isinstance(mac, str) or not mac:
        return "it carries no MAC: it was not made with this run's report secret"
    if secret is None:
        return "the worker cannot derive this run's report secret"
    body = {k: v for k, v in data.items() if k != MAC_FIELD}
    expected = _mac(secret, flow_run_id=flow_run_id, kind=kind, body=body)
    if not hmac.compare_digest(mac, expected):
        return (
            "its MAC does not verify with this run's report secret (forged, altered, or made "
            "for another run, decision or kind)"
        )
    if body.get("decision_id") != decision_id:  # bound by the secret too; said plainly
        return f"it names another decision ({body.get('decision_id')!r})"
    return None


# --- the worker's side (pure) ----------------------------------------------------------


def accepted(
    artifacts: list[tuple[str, Any]],
    *,
    secret: str | None,
    flow_run_id: str,
    decision_id: str,
    kind: str,
    cannot: str | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """The reports of one kind whose MAC verifies for this run, each once, in their order;
    and, for every other artifact, what was rejected and why.

    ``artifacts`` are (artifact id, data) as Prefect holds them, oldest first. A report is
    numbered (``seq``: an int, or the [first, last] range of a batch of events); a second
    artifact with numbers already seen (a retried send, or a copy replayed) counts once.
    ``cannot``: why the worker has no secret for this run, said for each artifact.
    """
    seen: dict[str, str] = {}  # numbers -> the artifact that carried them first
    reports: list[dict[str, Any]] = []
    problems: list[str] = []
    for artifact_id, data in artifacts:
        why = (
            cannot
            if secret is None and cannot
            else check_seal(
                secret, data, flow_run_id=flow_run_id, decision_id=decision_id, kind=kind
            )
        )
        if why is None and not _numbered(data.get("seq")):
            why = "it carries no sequence numbers"
        if why is not None:
            problems.append(f"rejected {kind} artifact {artifact_id}: {why}")
            continue
        numbers = str(data["seq"])
        if numbers in seen:
            problems.append(
                f"ignored {kind} artifact {artifact_id}: it repeats seq {numbers} of artifact "
                f"{seen[numbers]} (a retried send or a replay; counted once)"
            )
            continue
        seen[numbers] = artifact_id
        reports.append({k: v for k, v in data.items() if k != MAC_FIELD})
    return reports, problems


def _numbered(seq: Any) -> bool:
    if isinstance(seq, bool):
        return False
    if isinstance(seq, int):
        return seq >= 1
    return (
        isinstance(seq, list)
        and len(seq) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) for n in seq)
        and 1 <= seq[0] <= seq[1]
    )


def complete_proposals(
    proposals: list[MemoryProposal] | list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[str]]:
    """Authenticated memory proposals in their order, or none when some are missing
    (a deleted proposal would change what the others mean: nothing is committed)."""
    read = [as_report(MemoryProposal, p) for p in proposals]
    odd = [p.seq for p in read if not isinstance(p.seq, int)]
    if odd:
        return [], [f"memory proposals not numbered one by one (seq {odd}): none is used"]
    ordered = sorted(read, key=lambda p: p.seq)
    numbers = [p.seq for p in ordered]
    if numbers != list(range(1, len(numbers) + 1)):
        missing = sorted(set(range(1, max(numbers, default=0) + 1)) - set(numbers))
        return [], [
            f"memory proposals missing from the run's report (seq {missing}): none of its "
            "proposals is used"
        ]
    return [p.report() for p in ordered], []


def admitted_declarations(
    item: TaskDecisionReport | dict[str, Any], check: dict[str, Any] | None
) -> tuple[str, dict]:
    """What a reported task decision admits: (task run id, {"declared", "check"}); the
    declared capabilities are those of the task input the worker decided again."""
    reported = as_report(TaskDecisionReport, item)
    envelope = reported.task_envelope
    task = envelope.get("task") or reported.task or {}
    runs = reported.decided.get("verdict") in RUNNABLE
    declared = envelope.get("capabilities") if runs else []
    return str(task.get("run_id")), {
        "declared": [c for c in declared or [] if isinstance(c, str)],
        "check": check or {"verified": None},
        "runs": runs,
    }


def use_check(
    use: CapabilityUseReport | dict[str, Any],
    *,
    grants: list[str] | None,
    admitted: dict[str, dict[str, Any]],
) -> dict[str, Any] | None:
    """Does a reported capability use hold? None for a blocked use (nothing was used).

    ``grants``: the run's capabilities as the worker signed them (None: the settling
    worker does not hold them); ``admitted``: the task decisions the run reported before
    this use, by task run id (see :func:`admitted_declarations`), as the worker re-decided
    them. ``{"verified": True}``, or False with why, or None when it cannot tell.
    """
    reported = as_report(CapabilityUseReport, use)
    if reported.granted is not True:
        return None
    capability = reported.capability
    if grants is not None and capability not in grants:
        granted = ", ".join(sorted(grants)) or "none"
        return {
            "verified": False,
            "why": f"capability {capability!r} is not among the run's signed grants "
            f"({granted}): the run's runtime claimed a grant it was never given",
        }
    task = reported.task
    unknown = None if grants is not None else "the settling worker does not hold the run's grant"
    if task is not None:
        run_id = str((task or {}).get("run_id")) if isinstance(task, dict) else None
        admission = admitted.get(run_id) if run_id else None
        name = task.get("name") if isinstance(task, dict) else None
        if admission is None or not admission["runs"]:
            return {
                "verified": False,
                "why": f"no admitted decision of task {name!r} (run {run_id}) was reported "
                "before the use",
            }
        decided = admission["check"].get("verified")
        if decided is False:
            return {
                "verified": False,
                "why": f"the decision that admitted task {name!r} does not hold: "
                f"{admission['check'].get('why')}",
            }
        if capability not in admission["declared"]:
            declared = ", ".join(admission["declared"]) or "none"
            return {
                "verified": False,
                "why": f"task {name!r} did not declare {capability!r} (declared: {declared})",
            }
        if decided is None:
            unknown = unknown or "the task's decision could not be decided again"
    return {"verified": None, "why": unknown} if unknown else {"verified": True}
