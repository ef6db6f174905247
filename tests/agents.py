"""Agents for the tests, signed by a fixed test pool-owner key that the tests pin.

``tests/conftest.py`` puts ``PREFECT_GOVERNANCE_AGENT_KEYS`` for ``TEST_AGENT_KEY`` into
the environment at import, so in-process governors and spawned workers verify with it.
An agent saved here without ``deployments`` is bound to every deployment (``["*"]``):
a convenience of the tests only; the product's default binds nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect_governance.core.signing import SigningKey
from prefect_governance.testing import Harness, Server
from prefect_governance.testing import signed_agent as _signed_agent
from prefect_governance.worker.blocks import GovernanceAgent

TEST_AGENT_KEY = SigningKey.from_seed(
    "test-pool-owner", "dGVzdC1wb29sLW93bmVyLWFnZW50LWtleS0wMDAwMDA"
)
# What a governed worker in the tests pins: {"test-pool-owner": "<public>"}.
TEST_AGENT_KEYS = json.dumps({TEST_AGENT_KEY.key_id: TEST_AGENT_KEY.public_b64})


def harness(server: Server, workdir: Path, **options: Any) -> Harness:
    """The test harness whose pool owner is the test key every worker here pins."""
    return Harness(server, workdir, owner=TEST_AGENT_KEY, **options)


def signed_agent(
    agent: GovernanceAgent, name: str, key: SigningKey = TEST_AGENT_KEY
) -> GovernanceAgent:
    """The agent as the pool owner applies it under this block name (bound to every
    deployment when it names none)."""
    return _signed_agent(agent, name, key)


def save_agent(agent: GovernanceAgent, name: str) -> GovernanceAgent:
    """Sign the agent with the test pool-owner key and save it (replacing the block)."""
    agent = signed_agent(agent, name)
    agent.save(name, overwrite=True)
    return agent


async def asave_agent(agent: GovernanceAgent, name: str) -> GovernanceAgent:
    """``save_agent`` from async code."""
    agent = signed_agent(agent, name)
    await agent.asave(name, overwrite=True)
    return agent
