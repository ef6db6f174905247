"""Governed tasks: each task run decided by the task policy before its body runs.

``@governed`` wraps one Prefect task; ``govern(flow)`` wraps every task its
body calls by name. Before the body runs, the wrapper builds the task's
envelope (name, run id, parameters with secrets redacted, the capabilities it
declares, the flow run's signed envelope as parent), asks the task policy
with the engine the worker named in the run's grant, and records the decision
in the run's log. A refused task raises :class:`TaskRefused` before its body:
Prefect ends it Failed with the refusal in its message, and the flow sees an
ordinary failed task (``allow_failure``, ``return_state=True``). A refused
task is retried only if the policy, asked again, changes its answer.

Each task's end moves the run's posture (``runtime.posture``), which the next
task's input carries. A task that proposed memory (``writes`` names the fields it
may write) is asked of the policy again when its body ends (purpose ``commit``),
and its proposals apply only if the policy allows and the schema holds.
"""

from __future__ import annotations

import copy
import functools
import inspect
import types
import uuid
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, cast, overload

from prefect import Flow, Task
from prefect.context import TaskRunContext

from prefect_governance.core.decision import deny_reasons
from prefect_governance.core.envelope import build_task_envelope
from prefect_governance.core.errors import GovernanceError
from prefect_governance.core.models import (
    Decision,
    TaskContext,
    TaskMemory,
    TaskPolicyInput,
    TaskPosture,
    TaskRef,
)
from prefect_governance.core.posture import proposed_fields
from prefect_governance.core.settings import GovernanceSettings
from prefect_governance.runtime import EnvelopeError, Verified, current_verified
from prefect_governance.runtime.engine import run_engine
from prefect_governance.runtime.posture import MemoryRejected, TaskState, run_posture
from prefect_governance.runtime.run_log import flush_run_log, run_log


class TaskRefused(GovernanceError, RuntimeError):
    """Governance refused this task run; its body did not run."""

    def __init__(self, task: str, reasons: list[str], decision: Decision | None = None):
        self.task = task
        self.reasons = reasons
        self.decision = decision
        self.policy_input: dict[str, Any] | None = None  # what the policy was asked
        if decision is None:
            super().__init__(f"governance refused task {task!r}: " + "; ".join(reasons))
        else:
            super().__init__(
                f"governance refused task {task!r} by policy {decision.policy_path} "
                f"(decision {decision.id}, engine {decision.engine}): {deny_reasons(decision)}"
            )


@dataclass(frozen=True)
class TaskScope:
    """The governed task running now: what it is, what it declared, what it did."""

    ref: TaskRef
    capabilities: tuple[str, ...]
    writes: tuple[str, ...] = ()
    state: TaskState = field(default_factory=TaskState)
    question: dict[str, Any] = field(default_factory=dict)  # the admitting input


current_task: ContextVar[TaskScope | None] = ContextVar("governance_task", default=None)


def _settings() -> GovernanceSettings:
    """The process's settings (read from the environment once, with its run engine)."""
    return run_engine().settings


def _task_ref(default_name: str) -> tuple[TaskRef, dict[str, Any]]:
    """This task run as Prefect knows it, and its parameters."""
    context = TaskRunContext.get()
    if context is None or context.task_run is None:  # the function called outside Prefect
        return TaskRef(name=default_name, run_id=f"direct-call-{uuid.uuid4()}"), {}
    task_run = context.task_run
    return (
        TaskRef(
            name=context.task.name,
            run_id=str(task_run.id),
            key=task_run.task_key,
            attempt=max(task_run.run_count, 1),
        ),
        dict(context.parameters or {}),
    )


def task_input(
    verified: Verified,
    ref: TaskRef,
    parameters: dict[str, Any],
    capabilities: Iterable[str],
    now: datetime,
    settings: GovernanceSettings,
    *,
    posture: TaskPosture | None = None,
    writes: Iterable[str] = (),
) -> dict[str, Any]:
    """The task policy's input for one task run, before its body (purpose ``admit``)."""
    envelope = build_task_envelope(
        task=ref,
        parameters=parameters,
        capabilities=capabilities,
        parent=verified.parent(),
        issued_at=now,
        redact_patterns=settings.redact_patterns,
        max_parameter_bytes=settings.max_parameter_bytes,
        max_parameter_depth=settings.max_parameter_depth,
    )
    envelope.memory = TaskMemory(
        writes=sorted(set(writes)), schema_hash=verified.grant.agent.memory_schema_hash
    )
    return TaskPolicyInput(
        agent=verified.grant.agent,
        envelope=envelope,
        context=TaskContext(time=now, mode=verified.grant.mode),
        posture=posture,
    ).model_dump(mode="json")


def commit_input(
    admitted: dict[str, Any], proposals: list[dict[str, Any]], posture: TaskPosture, now: datetime
) -> dict[str, Any]:
    """The task policy's input when the task ended with memory proposals (``commit``)."""
    fields = sorted({name for patch in proposals for name in proposed_fields(patch)})
    envelope = {**admitted["envelope"]}
    envelope["memory"] = {**envelope["memory"], "proposed": fields}
    context = {**admitted["context"], "time": now.isoformat(), "purpose": "commit"}
    return {
        **admitted,
        "envelope": envelope,
        "context": context,
        "posture": posture.model_dump(mode="json"),
    }


def _record(
    verified: Verified, policy_input: dict[str, Any], decision: Decision, purpose: str
) -> None:
    """Queue the decision for the lineage (the parent envelope is the worker's own: left out)."""
    envelope = dict(policy_input["envelope"])
    envelope["parent"] = {k: v for k, v in envelope["parent"].items() if k != "envelope"}
    run_log(verified.grant.envelope.flow_run.id, verified.grant.decision_id).add(
        "task_decision",
        {
            "purpose": purpose,
            "task": envelope["task"],
            "envelope": envelope,
            "context": policy_input["context"],
            "posture": policy_input.get("posture"),
            "decision": decision.model_dump(mode="json"),
        },
        urgent=not decision.runs,
    )


def _verified_or_refuse(name: str) -> Verified:
    try:
        return current_verified()
    except EnvelopeError as exc:  # not a governed run, or its grant does not verify
        raise TaskRefused(name, [str(exc)]) from None


def _refusal(ref: TaskRef, decision: Decision, policy_input: dict[str, Any]) -> TaskRefused:
    refused = TaskRefused(ref.name, decision.deny or ["refused"], decision)
    refused.policy_input = policy_input
    return refused


@dataclass(frozen=True)
class _Declared:
    """What a governed task declares: its name, capabilities and memory fields."""

    name: str
    capabilities: tuple[str, ...]
    writes: tuple[str, ...]


def _question(task: _Declared) -> tuple[Verified, TaskRef, dict[str, Any]]:
    """What to ask the task policy about this task run (refused at once without a grant)."""
    verified = _verified_or_refuse(task.name)
    ref, parameters = _task_ref(task.name)
    now = datetime.now(timezone.utc)
    posture = run_posture(verified.grant).now()
    policy_input = task_input(
        verified,
        ref,
        parameters,
        task.capabilities,
        now,
        _settings(),
        posture=posture,
        writes=task.writes,
    )
    return verified, ref, policy_input


def _admitted(
    verified: Verified,
    ref: TaskRef,
    policy_input: dict[str, Any],
    decision: Decision,
    task: _Declared,
) -> TaskScope:
    """Record the decision; the task's scope if it may run, else end it refused and raise
    TaskRefused."""
    _record(verified, policy_input, decision, "admit")
    if not decision.runs:
        run_posture(verified.grant).end(ref, "refused", TaskState(), task.writes)
        raise _refusal(ref, decision, policy_input)
    return TaskScope(ref, task.capabilities, task.writes, question=policy_input)


def _admit(task: _Declared) -> TaskScope:
    """Decide this task run (blocking); raise TaskRefused when it may not run."""
    verified, ref, policy_input = _question(task)
    decision = run_engine().decide(verified.grant, policy_input)
    return _admitted(verified, ref, policy_input, decision, task)


async def _aadmit(task: _Declared) -> TaskScope:
    """Decide this task run without blocking the event loop."""
    verified, ref, policy_input = _question(task)
    decision = await run_engine().adecide(verified.grant, policy_input)
    return _admitted(verified, ref, policy_input, decision, task)


def _failed(scope: TaskScope, exc: BaseException) -> None:
    """End a task whose body raised: failed, or crashed when it was interrupted."""
    outcome = "failed" if isinstance(exc, Exception) else "crashed"
    run_posture(current_verified().grant).end(scope.ref, outcome, scope.state, scope.writes)


def _commit_question(scope: TaskScope) -> tuple[Verified, dict[str, Any]] | None:
    """The commit input of a task that proposed memory (None: it proposed none)."""
    if not scope.state.proposals:
        return None
    verified = current_verified()
    posture = run_posture(verified.grant).now()
    now = datetime.now(timezone.utc)
    return verified, commit_input(scope.question, scope.state.proposals, posture, now)


def _completed(
    scope: TaskScope, asked: tuple[Verified, dict[str, Any]] | None, decision: Decision | None
) -> None:
    """End a task whose body returned: its proposals apply if the policy allowed them
    and the schema holds; else it ends memory_rejected and raises MemoryRejected."""
    verified = current_verified()
    posture = run_posture(verified.grant)
    if asked is not None and decision is not None:
        _record(verified, asked[1], decision, "commit")
        if not decision.runs:
            posture.end(scope.ref, "memory_rejected", scope.state, scope.writes)
            raise MemoryRejected(scope.ref.name, decision.deny or ["refused"])
    errors = posture.end(scope.ref, "completed", scope.state, scope.writes)
    if errors:
        raise MemoryRejected(scope.ref.name, errors)


def _commit(scope: TaskScope) -> None:
    asked = _commit_question(scope)
    decision = None if asked is None else run_engine().decide(asked[0].grant, asked[1])
    _completed(scope, asked, decision)


async def _acommit(scope: TaskScope) -> None:
    asked = _commit_question(scope)
    decision = None if asked is None else await run_engine().adecide(asked[0].grant, asked[1])
    _completed(scope, asked, decision)


def _governed_fn(fn: Callable[..., Any], task: _Declared) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def governed_async(*args: Any, **kwargs: Any) -> Any:
            scope = await _aadmit(task)
            token = current_task.set(scope)
            try:
                result = await fn(*args, **kwargs)
            except BaseException as exc:
                _failed(scope, exc)
                raise
            finally:
                current_task.reset(token)
            await _acommit(scope)
            return result

        return governed_async

    @functools.wraps(fn)
    def governed_sync(*args: Any, **kwargs: Any) -> Any:
        scope = _admit(task)
        token = current_task.set(scope)
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            _failed(scope, exc)
            raise
        finally:
            current_task.reset(token)
        _commit(scope)
        return result

    return governed_sync


def refusal_of(state: Any) -> TaskRefused | None:
    """The refusal a failed task state carries, if that is why it failed."""
    data = getattr(state, "data", None)
    return data if isinstance(data, TaskRefused) else None


def _ask_again(refused: TaskRefused) -> bool:
    """Would the policy now let the refused task run? (Asked with the same envelope.)"""
    if refused.policy_input is None or refused.decision is None:
        return False  # refused without a policy answer (no grant): nothing could change
    try:
        verified = current_verified()
    except EnvelopeError:
        return False
    policy_input = {**refused.policy_input, "context": {**refused.policy_input["context"]}}
    policy_input["context"]["time"] = datetime.now(timezone.utc).isoformat()
    policy_input["posture"] = run_posture(verified.grant).now().model_dump(mode="json")
    decision = run_engine().decide(verified.grant, policy_input)
    _record(verified, policy_input, decision, "retry")
    return decision.runs


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    """Any awaitable as a coroutine (which is what Prefect's loop runs)."""
    return await awaitable


def _retry_condition(user_condition: Callable[..., Any] | None) -> Callable[..., bool]:
    """Prefect's retry condition: a refused task is retried only if the policy now allows it."""

    def governed_retry_condition(task: Task, task_run: Any, state: Any) -> bool:
        refused = refusal_of(state)
        if refused is not None and not _ask_again(refused):
            return False
        if user_condition is None:
            return True
        answer = user_condition(task, task_run, state)
        if inspect.isawaitable(answer):
            from prefect.utilities.asyncutils import run_coro_as_sync

            answer = run_coro_as_sync(_awaited(answer))
        return bool(answer)

    return governed_retry_condition


@overload
def governed(
    task: Task, *, capabilities: Iterable[str] = (), writes: Iterable[str] = ()
) -> Task: ...
@overload
def governed(
    task: Callable[..., Any], *, capabilities: Iterable[str] = (), writes: Iterable[str] = ()
) -> Task: ...
@overload
def governed(
    task: None = None, *, capabilities: Iterable[str] = (), writes: Iterable[str] = ()
) -> Callable[[Any], Task]: ...


def governed(
    task: Any = None, *, capabilities: Iterable[str] = (), writes: Iterable[str] = ()
) -> Any:
    """Govern a Prefect task (or a function, made a task): decided before each run.

    ``capabilities`` are those the task declares it will use; the task policy
    checks them against the flow run's grants, and inside the task
    :func:`prefect_governance.capability` allows only these. ``writes`` are the
    top-level memory fields its proposals (:func:`prefect_governance.propose_memory`)
    may write.
    """
    declared = tuple(sorted(set(capabilities)))
    memory_writes = tuple(sorted(set(writes)))

    def wrap(target: Any) -> Task:
        if not isinstance(target, Task):
            from prefect import task as make_task

            target = make_task(target)
        original = getattr(target, "governance_original", target)
        new = copy.copy(original)
        new.fn = _governed_fn(original.fn, _Declared(original.name, declared, memory_writes))
        new.retry_condition_fn = _retry_condition(original.retry_condition_fn)
        new.governance_capabilities = declared
        new.governance_original = original
        return new

    return wrap if task is None else wrap(task)


def _code_names(code: types.CodeType) -> set[str]:
    """The global names a function's code (and the code nested in it) refers to."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _governed_body(fn: types.FunctionType) -> types.FunctionType:
    """The flow's function, seeing a governed copy of every task it names (globals and closure)."""
    scope = dict(fn.__globals__)
    for name in _code_names(fn.__code__):
        value = scope.get(name)
        if isinstance(value, Task) and not hasattr(value, "governance_capabilities"):
            scope[name] = governed(value)
    cells = None
    if fn.__closure__:
        cells = tuple(
            types.CellType(governed(c.cell_contents))
            if isinstance(_cell(c), Task)
            and not hasattr(c.cell_contents, "governance_capabilities")
            else c
            for c in fn.__closure__
        )
    body = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, cells)
    body.__kwdefaults__ = fn.__kwdefaults__
    return body


def _cell(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def govern(flow: Flow) -> Flow:
    """Govern every task the flow's body calls by name, without editing each one.

    Tasks are found among the names the flow function uses (module globals and
    closure); a task reached another way (an attribute, a helper function) is
    governed by wrapping it with :func:`governed` itself. A task already wrapped
    keeps its declared capabilities. The run's governance events are sent to
    Prefect when the flow body ends.
    """
    fn = cast(types.FunctionType, flow.fn)  # a flow's body is a plain function
    built: list[types.FunctionType] = []

    def body() -> types.FunctionType:
        if not built:  # at the first run, when the flow's module has defined all its tasks
            built.append(_governed_body(fn))
        return built[0]

    def flush() -> None:
        from prefect.runtime import flow_run

        flush_run_log(flow_run.id)

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def governed_flow_async(*args: Any, **kwargs: Any) -> Any:
            try:
                return await body()(*args, **kwargs)
            finally:
                flush()

        wrapper: Callable[..., Any] = governed_flow_async
    else:

        @functools.wraps(fn)
        def governed_flow(*args: Any, **kwargs: Any) -> Any:
            try:
                return body()(*args, **kwargs)
            finally:
                flush()

        wrapper = governed_flow
    new = copy.copy(flow)
    new.fn = wrapper
    return new
