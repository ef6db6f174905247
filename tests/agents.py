"""Saving agent blocks in tests (stub: replaced by the signed-agent helpers at merge)."""

from __future__ import annotations

from prefect_governance.blocks import GovernanceAgent


def save_agent(agent: GovernanceAgent, name: str) -> None:
    agent.save(name, overwrite=True)


async def asave_agent(agent: GovernanceAgent, name: str) -> None:
    await agent.asave(name, overwrite=True)
