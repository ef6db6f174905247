"""Fixed exception keys for the tests (test-only seeds: never use them anywhere else).

``SECURITY`` is the security team's key the workers the tests start pin for exceptions
(PREFECT_GOVERNANCE_EXCEPTION_KEYS); ``MALLORY_AS_SECURITY`` is a requester's own key
under the security team's key id, which no worker pins.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

from prefect_governance.core.exceptions import KEYS_ENV, signed_exception
from prefect_governance.core.signing import SigningKey
from prefect_governance.worker.blocks import GovernanceException

SECURITY = SigningKey.from_seed("security", "dGVzdC1zZWN1cml0eS1leGNlcHRpb24ta2V5LTAwMDA")
MALLORY_AS_SECURITY = SigningKey.from_seed(
    "security", "dGVzdC1tYWxsb3J5LWV4Y2VwdGlvbi1rZXktMDAwMDA"
)
PINNED = {SECURITY.key_id: SECURITY.public_b64}
MAX_LIFETIME = timedelta(days=90)


def exception_keys_env() -> dict[str, str]:
    """The environment that makes a worker pin the security team's exception key."""
    return {KEYS_ENV: json.dumps(PINNED)}


def exception(**fields: Any) -> GovernanceException:
    """An exception of the parameters rule for the agent ``etl-agent`` (fields override)."""
    values: dict[str, Any] = {
        "rules": ["prefect.governance.rules.parameters.deny"],
        "agents": ["etl-agent"],
        "owner": "security@example.com",
        "reason": "a one-off backfill",
        "ticket": "SEC-1",
        "expires_at": datetime.now(timezone.utc) + timedelta(days=7),
        **fields,
    }
    return GovernanceException(**values)


def signed(
    name: str,
    block: GovernanceException,
    key: SigningKey = SECURITY,
    now: datetime | None = None,
) -> GovernanceException:
    """The exception as ``apply`` signs it under this block name."""
    return signed_exception(
        name, block, key, now=now or datetime.now(timezone.utc), max_lifetime=MAX_LIFETIME
    )
