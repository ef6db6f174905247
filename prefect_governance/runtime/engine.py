"""The policy engine a governed run decides its tasks with: the worker's, named in the grant.

The embedded engine is built once and decides in the calling thread, from any
thread. The OPA client is bound to its event loop: its decisions are made on
one small portal thread, whichever thread (or event loop) the task runs in.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from prefect_governance.core.decision import decide, decide_sync, decision_for, for_task
from prefect_governance.core.engines import EngineError, PolicyEngine, build_engine
from prefect_governance.core.models import Decision, EngineRef, Grant
from prefect_governance.core.settings import GovernanceSettings

T = TypeVar("T")


def grant_engine(ref: EngineRef | None, settings: GovernanceSettings) -> PolicyEngine:
    """The engine a grant names, as the worker tuned it; EngineError when it names none or
    cannot be set up. The run holds none of the worker's credentials for it."""
    if ref is None:
        raise EngineError("unreachable", "the run's grant names no policy engine")
    if ref.kind == "embedded" and not ref.policy_dir:
        raise EngineError("unreachable", "the grant's embedded engine has no policy dir")
    if ref.kind == "embedded" and ref.timeout is None:  # a grant of an older worker
        ref = ref.model_copy(update={"timeout": settings.decision_timeout})
    try:
        return build_engine(
            ref,
            breaker_failures=settings.opa_breaker_failures,
            breaker_reset_seconds=settings.opa_breaker_reset_seconds,
        )
    except ValueError:
        raise EngineError("unreachable", "the grant's OPA engine has no URL") from None
    except Exception as exc:
        raise EngineError("unreachable", f"the policy engine cannot be set up: {exc}") from exc


class RunEngine:
    """Decides a run's tasks on one portal thread, with the engine its grant names."""

    def __init__(self, settings: GovernanceSettings | None = None):
        self.settings = settings or GovernanceSettings()
        self._loop = asyncio.new_event_loop()
        self._engines: dict[str, PolicyEngine] = {}
        self._build_lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="governance-portal", daemon=True
        )
        self._thread.start()

    def _submit(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def _failed(self, grant: Grant, error: EngineError) -> Decision:
        ref = grant.engine
        return decision_for(
            error,
            engine=ref.kind if ref else "none",
            policy_path=grant.task_policy_path,
            mode=grant.mode,
            fail_mode=grant.fail_mode,
        )

    def _engine(self, grant: Grant) -> PolicyEngine:
        """The engine the grant names, built once."""
        key = grant.engine.model_dump_json() if grant.engine else ""
        with self._build_lock:
            engine = self._engines.get(key)
            if engine is None:
                engine = self._engines[key] = grant_engine(grant.engine, self.settings)
        return engine

    def _decide_here(self, grant: Grant, policy_input: dict[str, Any]) -> Decision:
        """An embedded decision in the calling thread."""
        try:
            engine = self._engine(grant)
        except EngineError as exc:
            return self._failed(grant, exc)
        return decide_sync(
            engine,
            grant.task_policy_path,
            policy_input,
            mode=grant.mode,
            fail_mode=grant.fail_mode,
        )

    async def _decide(self, grant: Grant, policy_input: dict[str, Any]) -> Decision:
        """A decision on the portal thread (OPA, or a grant naming no usable engine)."""
        try:
            engine = self._engine(grant)
        except EngineError as exc:
            return self._failed(grant, exc)
        return await decide(
            engine,
            grant.task_policy_path,
            policy_input,
            mode=grant.mode,
            fail_mode=grant.fail_mode,
            deadline=self.settings.decision_timeout,
        )

    def decide(self, grant: Grant, policy_input: dict[str, Any]) -> Decision:
        """Decide from any thread (blocking it)."""
        if grant.engine is not None and grant.engine.kind == "embedded":
            return for_task(self._decide_here(grant, policy_input))
        return for_task(self._submit(self._decide(grant, policy_input)).result())

    async def adecide(self, grant: Grant, policy_input: dict[str, Any]) -> Decision:
        """Decide from any event loop (without blocking it for more than an embedded decision)."""
        if grant.engine is not None and grant.engine.kind == "embedded":
            return for_task(self._decide_here(grant, policy_input))
        return for_task(await asyncio.wrap_future(self._submit(self._decide(grant, policy_input))))

    def close(self) -> None:
        async def close_all() -> None:
            for engine in self._engines.values():
                await engine.aclose()

        if self._loop.is_running():
            with contextlib.suppress(Exception):
                self._submit(close_all()).result(timeout=5)
            self._loop.call_soon_threadsafe(self._loop.stop)


_engine: RunEngine | None = None
_lock = threading.Lock()


def run_engine() -> RunEngine:
    """This process's run engine, started on first use."""
    global _engine
    with _lock:
        if _engine is None:
            _engine = RunEngine()
            atexit.register(_engine.close)
        return _engine
