"""Fixed approver keys for the tests (test-only seeds: never use them anywhere else).

alice and bob are pinned by the workers the tests start; mallory is the requester, whose
key no worker pins.
"""

from __future__ import annotations

import json

from prefect_governance.core.signing import SigningKey

ALICE = SigningKey.from_seed("alice", "RIV9VN9qj6xScxCqyax7-Wu70RrEMxOKcnkx2o-5X_8")
BOB = SigningKey.from_seed("bob", "1MOmvCMjLTBp3IETdZ43ZQ3EwjQ-2MJvIrSKX-uRmX0")
MALLORY_SEED = "eXyxfJozk-tYmiaEL4ifD7tFzvHeava5MWrPaYY0fYQ"
MALLORY = SigningKey.from_seed("mallory", MALLORY_SEED)
# The requester's own key, under the approver's name.
MALLORY_AS_ALICE = SigningKey.from_seed("alice", MALLORY_SEED)

PINNED = {ALICE.key_id: ALICE.public_b64, BOB.key_id: BOB.public_b64}


def approver_keys_env() -> dict[str, str]:
    """The environment that makes a worker pin alice's and bob's keys."""
    return {"PREFECT_GOVERNANCE_APPROVER_KEYS": json.dumps(PINNED)}
