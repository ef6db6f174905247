"""The lineage key of the tests' governed workers, which the tests pin as verifiers.

``tests/conftest.py`` puts it into the environment at import: spawned workers sign the
lineage with it (``PREFECT_GOVERNANCE_LINEAGE_KEY``, which the worker keeps from its
runs), and stores opened in the tests believe it (``PREFECT_GOVERNANCE_LINEAGE_KEYS``).
"""

from __future__ import annotations

import json

from prefect_governance.core.signing import SigningKey

TEST_LINEAGE_KEY = SigningKey.from_seed(
    "test-lineage", "dGVzdC1saW5lYWdlLWtleS1vZi10aGUtd29ya2Vycy0"
)
LINEAGE_ENV = {
    "PREFECT_GOVERNANCE_LINEAGE_KEY": TEST_LINEAGE_KEY.seed_b64,
    "PREFECT_GOVERNANCE_LINEAGE_KEY_ID": TEST_LINEAGE_KEY.key_id,
    "PREFECT_GOVERNANCE_LINEAGE_KEYS": json.dumps(
        {TEST_LINEAGE_KEY.key_id: TEST_LINEAGE_KEY.public_b64}
    ),
}
