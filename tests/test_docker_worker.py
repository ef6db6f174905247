"""The governed-docker worker type without a server: optional extra, registration, template."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("prefect_docker", reason="prefect-governance[docker] is not installed")

from prefect.workers.base import BaseWorker

from prefect_governance.core.handoff import GATE_COMMAND
from prefect_governance.worker.docker import GovernedDockerWorker

# A None in sys.modules is how Python marks a module as not importable.
WITHOUT_PREFECT_DOCKER = """
import sys
sys.modules["prefect_docker"] = None
import prefect_governance.worker as worker
assert not hasattr(worker, "GovernedDockerWorker")
print(worker.GovernedProcessWorker.type)
"""


def test_the_worker_package_imports_without_prefect_docker() -> None:
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_PREFECT_DOCKER], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "governed-process"


def test_the_type_registers_through_the_entry_point_package() -> None:
    import prefect_governance.worker  # noqa: F401  # what the prefect.collections entry point loads

    assert BaseWorker.get_worker_class_from_type("governed-docker") is GovernedDockerWorker


def test_the_default_template_fixes_the_gate_command() -> None:
    template = GovernedDockerWorker.get_default_base_job_template()
    assert template["job_configuration"]["command"] == GATE_COMMAND
    assert "command" not in template["variables"]["properties"]
    # Everything else is prefect-docker's, plus the governed variables.
    properties = template["variables"]["properties"]
    assert {"image", "volumes", "network_mode", "privileged", "container_create_kwargs"} <= set(
        properties
    )
    assert {"agent", "capabilities", "mode", "lineage_store"} <= set(properties)
