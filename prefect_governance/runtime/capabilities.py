"""Mediated capabilities: flow and task code use what the run was granted, and nothing else.

``with capability("write:warehouse"):`` (or ``@capability(...)`` on a function)
checks the capability before the block runs: it must be among the run's grants
(what the flow run asked for, as narrowed by its decision) and, inside a
governed task, among the capabilities that task declared. A use that is not
allowed raises :class:`CapabilityDenied` before anything is touched. Every use,
allowed or not, is recorded in the run's log and so in the agent's lineage.

``load_block`` loads a Prefect block through the same check, under the
capability ``block:<block type slug>/<block name>``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from prefect.blocks.core import Block

from prefect_governance.core.errors import GovernanceError
from prefect_governance.runtime import EnvelopeError, current_grant
from prefect_governance.runtime.run_log import run_log
from prefect_governance.runtime.tasks import TaskScope, current_task

B = TypeVar("B", bound=Block)


class CapabilityDenied(GovernanceError, PermissionError):
    """The run (or the task) may not use this capability; nothing was touched."""

    def __init__(self, capability: str, reason: str):
        self.capability = capability
        self.reason = reason
        super().__init__(f"capability {capability!r} denied: {reason}")


def denial(capability: str, grants: list[str], task: TaskScope | None) -> str | None:
    """Why a use of the capability is not allowed here, or None when it is."""
    if capability not in grants:
        granted = ", ".join(sorted(grants)) or "none"
        return f"it was not granted to this flow run (granted: {granted})"
    if task is not None and capability not in task.capabilities:
        declared = ", ".join(task.capabilities) or "none"
        return f"task {task.ref.name!r} did not declare it (declared: {declared})"
    return None


def check_capability(capability: str, *, use: str | None = None) -> None:
    """Allow one use of a capability, or raise CapabilityDenied; record it either way."""
    try:
        grant = current_grant()
    except EnvelopeError as exc:
        raise CapabilityDenied(capability, str(exc)) from None
    task = current_task.get()
    reason = denial(capability, grant.grants, task)
    run_log(grant.envelope.flow_run.id, grant.decision_id).add(
        "capability_use",
        {
            "capability": capability,
            "use": use,
            "granted": reason is None,
            "reason": reason,
            "task": task.ref.model_dump(mode="json") if task else None,
        },
        urgent=reason is not None,
    )
    if reason is not None:
        if task is not None:
            task.state.blocked = True  # costs the task trust when it ends
        raise CapabilityDenied(capability, reason)


@contextmanager
def capability(name: str, *, use: str | None = None) -> Iterator[None]:
    """Use a capability for the block of code (or function) it wraps, if allowed."""
    check_capability(name, use=use)
    yield


def block_capability(block: type[Block] | str, name: str | None = None) -> tuple[str, str]:
    """The capability a block load needs, and the ``slug/name`` Prefect loads it by."""
    if isinstance(block, str):
        slug, _, block_name = block.partition("/")
        if name is not None or not block_name:
            raise ValueError("name a block as 'block-type-slug/block-name', or a class and a name")
    else:
        if name is None:
            raise ValueError(f"load_block({block.__name__}, name): the block's name is missing")
        slug, block_name = block.get_block_type_slug(), name
    return f"block:{slug}/{block_name}", f"{slug}/{block_name}"


def load_block(block: type[B] | str, name: str | None = None) -> Any:
    """Load a Prefect block, if the run may use ``block:<slug>/<name>``."""
    needed, ref = block_capability(block, name)
    check_capability(needed, use=f"load block {ref}")
    if isinstance(block, str):
        return Block.load(ref, _sync=True)  # type: ignore[call-arg]  # async_dispatch's keyword
    assert name is not None  # block_capability refused a class without a name
    return block.load(name, _sync=True)  # type: ignore[call-arg]  # async_dispatch's keyword


async def aload_block(block: type[B] | str, name: str | None = None) -> Any:
    """Load a Prefect block from async code, if the run may use ``block:<slug>/<name>``."""
    needed, ref = block_capability(block, name)
    check_capability(needed, use=f"load block {ref}")
    if isinstance(block, str):
        return await Block.aload(ref)
    assert name is not None  # block_capability refused a class without a name
    return await block.aload(name)
