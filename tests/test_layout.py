"""The rooms hold: what a governed flow run imports loads no storage, worker or tools.

The import contract itself (pyproject.toml, ``lint-imports``) runs in ``make lint``;
this checks what a real process loads, which also covers imports made at run time.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# What flow code and the gate import (the README's examples and the pool's command).
RUN_SIDE = """
import json, sys
import prefect_governance.gate
import prefect_governance.runtime
from prefect_governance import (
    CapabilityDenied, TaskRefused, capability, current_agent, current_envelope,
    govern, governed, load_block, propose_memory,
)
from prefect_governance.runtime.engine import run_engine
print(json.dumps(sorted(sys.modules)))
"""
STORAGE = ("sqlmodel", "sqlalchemy", "alembic", "psycopg", "psycopg2", "asyncpg")
OTHER_ROOMS = ("prefect_governance.lineage", "prefect_governance.worker", "prefect_governance.cli")


def _loaded(code: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_what_a_governed_flow_run_imports_loads_no_storage_and_no_worker():
    loaded = _loaded(RUN_SIDE)
    assert "prefect_governance.runtime.tasks" in loaded  # the probe did import the run side
    assert [m for m in loaded if m.split(".")[0] in STORAGE] == []
    assert [m for m in loaded if m.startswith(OTHER_ROOMS)] == []


@pytest.mark.parametrize(
    "module",
    ["prefect_governance.worker", "prefect_governance.lineage.store"],
)
def test_the_probe_would_see_storage_where_it_is_loaded(module):
    """The probe above can fail: the worker's side and the tools do load storage."""
    loaded = _loaded(f"import json, sys, {module}\nprint(json.dumps(sorted(sys.modules)))")
    assert any(m.split(".")[0] == "sqlmodel" for m in loaded)


def test_the_entry_points_resolve_to_the_worker_and_the_command():
    from importlib.metadata import entry_points

    (collection,) = [
        e for e in entry_points(group="prefect.collections") if e.name == "prefect_governance"
    ]
    module = collection.load()
    assert module.GovernedProcessWorker.type == "governed-process"
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "prefect-governance"]
    assert script.value == "prefect_governance.cli.main:app"
    helped = subprocess.run(
        [sys.executable, "-m", "prefect_governance.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert helped.returncode == 0 and "demo" in helped.stdout, helped.stderr
