"""From an engine's answer to a decision: interpret, fail closed, apply the mode."""

from __future__ import annotations

import time
import uuid
from typing import Any

import anyio
from pydantic import ValidationError

from prefect_governance.core.engines.base import EngineAnswer, EngineError, PolicyEngine
from prefect_governance.core.models import (
    Decision,
    FailMode,
    Mode,
    PolicyResult,
    Verdict,
    describe_validation,
)

# What an engine call lets through: a real interrupt, or the process ending.
INTERRUPTS = (KeyboardInterrupt, SystemExit, GeneratorExit)


def interpret(result: Any) -> PolicyResult:
    """Read a raw result document as a PolicyResult, or raise EngineError."""
    if result is None:
        raise EngineError("undefined", "the policy result is undefined (no rule at that path?)")
    if not isinstance(result, dict):
        raise EngineError("shape", f"the policy result is a {type(result).__name__}, not an object")
    try:
        return PolicyResult.model_validate(result)
    except ValidationError as exc:
        problems = describe_validation(exc, "result")
        raise EngineError("shape", f"the policy result has the wrong shape: {problems}") from exc


def decision_for(
    answer: EngineAnswer | EngineError,
    *,
    engine: str,
    policy_path: str,
    mode: Mode,
    fail_mode: FailMode,
    latency_ms: float = 0.0,
    decision_id: str | None = None,
) -> Decision:
    """The decision for one answer (or failure), under a mode and a fail mode."""
    common: dict[str, Any] = {
        "engine": engine,
        "policy_path": policy_path,
        "mode": mode,
        "fail_mode": fail_mode,
        "latency_ms": round(latency_ms, 3),
    }
    if isinstance(answer, EngineAnswer):
        common["policy_revision"] = answer.revision
        try:
            result = interpret(answer.result)
        except EngineError as exc:
            answer = exc
        else:
            waits = bool(result.approval) and not result.deny
            allowed = result.allow and not result.deny and not waits
            verdict = _verdict(allowed, waits, mode)
            deny = list(result.deny)
            if not allowed and not deny and not waits:
                deny = ["the policy did not allow this run (allow is false, no reason given)"]
            return Decision(
                id=answer.decision_id or decision_id or str(uuid.uuid4()),
                verdict=verdict,
                allow=allowed,
                deny=deny,
                warn=[*result.warn, *_unenforced_waits(result, mode)],
                annotations=dict(result.annotations),
                reasons=list(result.reasons),
                grants=None if result.grants is None else list(result.grants),
                approval=list(result.approval),
                waived=list(result.waived),
                **common,
            )
    reason = f"policy engine failed ({answer.kind}): {answer.message}"
    if fail_mode == "open":
        return Decision(
            id=decision_id or str(uuid.uuid4()),
            verdict="ungoverned",
            allow=False,
            deny=[],
            warn=[f"{reason}; the pool is fail-open, so the run goes ahead ungoverned"],
            error=reason,
            error_kind=answer.kind,
            **common,
        )
    return Decision(
        id=decision_id or str(uuid.uuid4()),
        verdict="refused",
        allow=False,
        deny=[reason],
        error=reason,
        error_kind=answer.kind,
        **common,
    )


def _verdict(allowed: bool, waits: bool, mode: Mode) -> Verdict:
    """Allowed; else awaiting an approval (enforced) or refused; audit mode runs either."""
    if allowed:
        return "allowed"
    if mode == "audit":
        return "audited"
    return "awaiting_approval" if waits else "refused"


def _unenforced_waits(result: PolicyResult, mode: Mode) -> list[str]:
    """In audit mode a run that would wait for an approval goes ahead: say so."""
    if mode != "audit" or result.deny:
        return []
    return [
        f"audit mode: this run would wait for an approval by one of "
        f"{', '.join(r.approvers)} ({r.reason})"
        for r in result.approval
    ]


TASK_CANNOT_WAIT = "the task policy asked for an approval, but a task cannot wait for one"


def for_task(decision: Decision) -> Decision:
    """A task decision: a task cannot wait, so an approval request refuses it."""
    if not decision.waits:
        return decision
    return decision.model_copy(update={"verdict": "refused", "deny": [TASK_CANNOT_WAIT]})


def worker_refusal(reason: str, *, policy_path: str, mode: Mode, fail_mode: FailMode) -> Decision:
    """A refusal the worker makes before any policy can be asked (bad configuration)."""
    return Decision(
        id=str(uuid.uuid4()),
        verdict="refused",
        allow=False,
        deny=[reason],
        engine="worker",
        policy_path=policy_path,
        mode=mode,
        fail_mode=fail_mode,
    )


def _settled(
    engine: PolicyEngine,
    policy_path: str,
    answer: EngineAnswer | EngineError,
    started: float,
    mode: Mode,
    fail_mode: FailMode,
) -> Decision:
    return decision_for(
        answer,
        engine=engine.name,
        policy_path=policy_path,
        mode=mode,
        fail_mode=fail_mode,
        latency_ms=(time.perf_counter() - started) * 1000,
    )


def decide_sync(
    engine: PolicyEngine,
    policy_path: str,
    policy_input: dict[str, Any],
    *,
    mode: Mode = "enforce",
    fail_mode: FailMode = "closed",
) -> Decision:
    """Ask an in-process engine (one with ``evaluate_sync``) in this thread, then decide."""
    started = time.perf_counter()
    answer: EngineAnswer | EngineError
    try:
        answer = engine.evaluate_sync(policy_path, policy_input)  # type: ignore[attr-defined]
    except EngineError as exc:
        answer = exc
    except INTERRUPTS:
        raise
    except BaseException as exc:  # any engine bug is a failure to decide, never a pass
        answer = EngineError("evaluation", f"{type(exc).__name__}: {exc}")
    return _settled(engine, policy_path, answer, started, mode, fail_mode)


async def decide(
    engine: PolicyEngine,
    policy_path: str,
    policy_input: dict[str, Any],
    *,
    mode: Mode = "enforce",
    fail_mode: FailMode = "closed",
    deadline: float = 5.0,
) -> Decision:
    """Ask the engine, within a deadline, and decide on its answer.

    An in-process engine (one with ``evaluate_sync``) is called directly: it
    never yields to the event loop, so no deadline could interrupt it, and
    setting one up would cost a tenth of its decision.
    """
    if getattr(engine, "evaluate_sync", None) is not None:
        return decide_sync(engine, policy_path, policy_input, mode=mode, fail_mode=fail_mode)
    started = time.perf_counter()
    answer: EngineAnswer | EngineError
    try:
        with anyio.fail_after(deadline):
            answer = await engine.evaluate(policy_path, policy_input)
    except EngineError as exc:
        answer = exc
    except TimeoutError:
        answer = EngineError("timeout", f"no decision within {deadline:g}s")
    except (*INTERRUPTS, anyio.get_cancelled_exc_class()):
        raise
    except BaseException as exc:  # any engine bug is a failure to decide, never a pass
        answer = EngineError("evaluation", f"{type(exc).__name__}: {exc}")
    return _settled(engine, policy_path, answer, started, mode, fail_mode)


def rule_of(decision: Decision, message: str, kind: str = "deny") -> str | None:
    """The rule (package.rule) that produced a message, when the policy said so."""
    return next((r.rule for r in decision.reasons if r.message == message and r.kind == kind), None)


def with_rule(decision: Decision, message: str, kind: str = "deny") -> str:
    """The message, followed by its rule in brackets when known."""
    rule = rule_of(decision, message, kind)
    return f"{message} [{rule}]" if rule else message


def deny_reasons(decision: Decision) -> str:
    """The deny reasons, each with the rule behind it, on one line."""
    return "; ".join(with_rule(decision, m) for m in decision.deny) or "no reason given"
