"""``python -m prefect_governance.gate``: the command a governed pool's template names.

Kept at this path for the pools already created on servers; the gate itself is
``prefect_governance.runtime.gate``.
"""

from __future__ import annotations

import sys

from prefect_governance.runtime.gate import main

if __name__ == "__main__":
    sys.exit(main())
