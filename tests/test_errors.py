"""One base for the package's errors: ``prefect_governance.GovernanceError``.

Every exception class the package defines derives from it and keeps its standard
base (so an ``except RuntimeError`` written before still catches ``TaskRefused``);
a flow author can catch it around a governed task the policy refused.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import pkgutil
from pathlib import Path

from prefect import flow, get_client, task
from prefect.flow_engine import run_flow

import prefect_governance
from prefect_governance import GovernanceError, capability, govern
from prefect_governance.core.handoff import ENVELOPE_ENV, TRUSTED_KEYS_ENV
from prefect_governance.core.models import EngineRef
from prefect_governance.core.signing import SigningKey, sign
from tests.conftest import POLICIES
from tests.grants import example_grant

# Modules that cannot be imported on their own: the command's ``python -m`` entry
# (runs the CLI), Alembic's env and revisions (run by Alembic), the Go library.
NOT_IMPORTABLE = (".__main__", ".migrations.env", ".migrations.versions", ".libgovrego")

# Each class's standard base, kept beside GovernanceError so no ``except`` changes.
STANDARD_BASES = {
    "ApprovalRejected": ValueError,
    "AttestationError": ValueError,
    "CapabilityDenied": PermissionError,
    "DocumentError": ValueError,
    "EnvelopeError": RuntimeError,
    "ParameterLimitError": ValueError,
    "SchemaError": RuntimeError,
    "SignatureError": ValueError,
    "SigningKeyError": ValueError,
    "TaskRefused": RuntimeError,
}


def package_exceptions() -> dict[str, type[BaseException]]:
    """Every exception class defined in the package (walking and importing its modules)."""
    found: dict[str, type[BaseException]] = {}
    for module_info in pkgutil.walk_packages(
        prefect_governance.__path__, prefect_governance.__name__ + "."
    ):
        name = module_info.name
        if any(part in name for part in NOT_IMPORTABLE):
            continue
        module = importlib.import_module(name)
        for value in vars(module).values():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == name
            ):
                found[f"{name}.{value.__qualname__}"] = value
    return found


def test_every_exception_the_package_defines_is_a_governance_error():
    exceptions = package_exceptions()
    assert len(exceptions) >= 18, sorted(exceptions)  # the walk did reach the rooms
    assert [name for name, cls in exceptions.items() if not issubclass(cls, GovernanceError)] == []
    by_name = {cls.__name__: cls for cls in exceptions.values()}
    for name, base in STANDARD_BASES.items():
        assert issubclass(by_name[name], base), (name, base)


def test_the_base_is_exported_lazily_from_the_package_and_lives_in_the_core():
    assert "GovernanceError" in prefect_governance.__all__
    assert prefect_governance.GovernanceError.__module__ == "prefect_governance.core.errors"
    assert issubclass(prefect_governance.TaskRefused, GovernanceError)
    assert issubclass(prefect_governance.CapabilityDenied, GovernanceError)


KEY = SigningKey.generate("errors-test-signer")


def test_a_flow_author_catches_a_refused_task_as_a_governance_error(
    prefect_server, monkeypatch, tmp_path
):
    """A refused governed task and a denied capability, each caught by the one base."""

    @task
    def forbidden_step(path: str) -> None:
        Path(path, "forbidden").write_text("ran")

    @govern
    @flow
    def pipeline(path: str) -> list[str]:
        caught = []
        try:
            forbidden_step(path)
        except prefect_governance.GovernanceError as refused:
            caught.append(f"{type(refused).__name__}: {refused}")
        try:
            with capability("write:warehouse"):
                Path(path, "written").write_text("used")
        except prefect_governance.GovernanceError as denied:
            caught.append(f"{type(denied).__name__}: {denied}")
        return caught

    async def create():
        async with get_client() as client:
            return await client.create_flow_run(pipeline, parameters={"path": str(tmp_path)})

    flow_run = asyncio.run(create())
    grant = example_grant(
        str(flow_run.id),
        decision_id="flow-decision",
        constraints={"tasks": {"deny": ["forbidden_step"]}},
        grants=[],
        engine=EngineRef(kind="embedded", policy_dir=str(POLICIES)),
    )
    monkeypatch.setenv(TRUSTED_KEYS_ENV, json.dumps({KEY.key_id: KEY.public_b64}))
    monkeypatch.setenv(ENVELOPE_ENV, json.dumps(sign(grant.model_dump(mode="json"), KEY)))

    state = run_flow(
        pipeline, flow_run=flow_run, parameters={"path": str(tmp_path)}, return_type="state"
    )
    assert state.is_completed(), state
    refused, denied = state.result()
    assert refused.startswith("TaskRefused: governance refused task 'forbidden_step'")
    assert denied.startswith("CapabilityDenied: capability 'write:warehouse' denied")
    assert list(tmp_path.iterdir()) == [], "a refused body or a denied use ran"
