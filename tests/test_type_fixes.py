"""Behaviour bugs the type checker found (each test fails without its fix)."""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import Any

import pytest
from prefect.states import Failed

from prefect_governance.core.handoff import TRUSTED_KEYS_ENV
from prefect_governance.core.keys import GovernanceVerifyKey
from prefect_governance.core.signing import SigningKey
from prefect_governance.lineage import store as store_module
from prefect_governance.lineage.events import outcome_event
from prefect_governance.lineage.store import LineageStore
from prefect_governance.runtime import _public_key
from prefect_governance.runtime.tasks import _retry_condition

KEY = SigningKey.generate("type-fixes-signer")


class _Later:
    """An awaitable that is not a coroutine (as a Future or a Task is)."""

    def __init__(self, value: bool):
        self.value = value

    def __await__(self) -> Generator[Any, None, bool]:
        yield from asyncio.sleep(0).__await__()
        return self.value


def test_a_retry_condition_may_return_any_awaitable():
    """Prefect's loop runs coroutines only; any other awaitable is awaited in one."""
    ordinary = Failed(data=RuntimeError("an ordinary failure"))
    assert _retry_condition(lambda *a: _Later(False))(None, None, ordinary) is False
    assert _retry_condition(lambda *a: _Later(True))(None, None, ordinary) is True


def test_an_append_that_makes_no_attempt_raises(tmp_path, monkeypatch):
    """Append raises when it cannot commit; it never returns None ("not appended")."""
    store = LineageStore(f"sqlite:///{tmp_path / 'l.db'}", signer=None, keys={})
    try:
        monkeypatch.setattr(store_module, "APPEND_ATTEMPTS", 0)
        event = outcome_event(agent_id="a", flow_run_id="r", decision_id="d", state="COMPLETED")
        with pytest.raises(RuntimeError, match="no attempt"):
            store.append(event)
    finally:
        store.dispose()


def test_a_verify_key_block_loads_from_async_code(prefect_server, monkeypatch):
    """A governed task of an async flow looks its verify key up synchronously too
    (Prefect's load would hand it a coroutine there)."""
    monkeypatch.delenv(TRUSTED_KEYS_ENV, raising=False)
    GovernanceVerifyKey(public_key=KEY.public_b64).save(KEY.key_id, overwrite=True)

    async def inside_async_code() -> str | None:
        return _public_key(KEY.key_id)

    assert _public_key(KEY.key_id) == KEY.public_b64
    assert asyncio.run(inside_async_code()) == KEY.public_b64
