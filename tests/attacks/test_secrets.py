"""Attack: secrets in parameters the author's schema does not mark, or marks and then edits
(issue 15, part 1).

Against a real Prefect server, the real governed worker and a real OPA sidecar logging
every decision to its console, flow runs carry planted unique secrets that name patterns
alone do not catch:

- a ``tuple[str, SecretStr]`` (its schema uses ``prefixItems``);
- a ``SecretStr`` in models inside a list and a dict (``$ref``, ``items``,
  ``additionalProperties``);
- a ``SecretStr`` whose deployment schema an API client edits (``format: password`` and
  ``writeOnly`` removed) after the worker first saw it;
- a PostgreSQL URL with a password, a ``Bearer`` JWT and a PEM private key in parameters
  with innocent names, and a dict of headers with ``Authorization`` and ``Cookie``.

Each secret is searched for everywhere governance writes: the policy input (the decision
record's envelope), the lineage database file's bytes, the runs' artifacts, labels and
state messages, the worker's output, the runs' logs from the API and OPA's decision log.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from pathlib import Path
from typing import Any

import pytest
from prefect import get_client
from prefect.client.schemas.actions import DeploymentUpdate

from prefect_governance.core.envelope import REDACTED
from prefect_governance.testing import Harness, create_pool, wait_final, wait_outcomes
from prefect_governance.worker.blocks import GovernanceAgent
from tests.agents import harness
from tests.attacks.support import home_lineage_url
from tests.test_security import _artifacts_and_logs, _deploy

pytestmark = pytest.mark.e2e

POOL, AGENT, ENGINE = "secrets-pool", "secrets-agent", "secrets-opa"


def _unique(label: str) -> str:
    return f"planted{label}{secrets.token_hex(12)}"


def _planted() -> dict[str, str]:
    jwt_body = secrets.token_urlsafe(24).replace("-", "a").replace("_", "b")
    pem = "\n".join(
        [
            "-----BEGIN PRIVATE KEY-----",
            _unique("PEM"),
            secrets.token_urlsafe(48),
            "-----END PRIVATE KEY-----",
        ]
    )
    return {
        "tuple": _unique("Tuple"),
        "list_model": _unique("ListModel"),
        "dict_model": _unique("DictModel"),
        "edited": _unique("Edited"),
        "pg_password": _unique("PgPw"),
        "jwt_signature": _unique("JwtSig"),
        "pem": pem,
        "authorization": _unique("Authz"),
        "cookie": _unique("Cookie"),
        "jwt_body": jwt_body,
    }


async def _setup(gov: Harness, opa_url: str, planted: dict[str, str]) -> dict[str, Any]:
    await gov.save_agent(
        GovernanceAgent(
            id=AGENT, owner="sec@example.com", trust_scope=[POOL], capabilities=["read:warehouse"]
        ),
        AGENT,
    )
    await gov.save_engine(ENGINE, kind="opa", opa_url=opa_url)
    await create_pool(POOL, engine=ENGINE)  # no store named: the worker's own in its home
    reader = {"agent": AGENT, "capabilities": ["read:warehouse"]}
    deployments = {
        name: await _deploy(f"secrets-{name}", f"{name}_flow", reader, pool=POOL)
        for name in ("tuple", "model", "edited", "values")
    }
    jwt = f"eyJhbGciOiJIUzI1NiJ9.eyJ{planted['jwt_body']}.{planted['jwt_signature']}"
    parameters = {
        "tuple": ("tuple", {"pair": ["visible-half", planted["tuple"]]}),
        "model": (
            "model",
            {
                "estate": {
                    "vaults": [{"name": "listed", "unlock": planted["list_model"]}],
                    "extra": {"keyed": {"name": "keyed", "unlock": planted["dict_model"]}},
                }
            },
        ),
        # seen by the worker before the edit: its schema becomes the reference
        "edited-before": ("edited", {"unlock": _unique("Benign")}),
        "values": (
            "values",
            {
                "target": f"postgresql://etl:{planted['pg_password']}@db.internal:5432/sales",
                "note": f"Bearer {jwt}",
                "blob": planted["pem"],
                "headers": {
                    "Authorization": planted["authorization"],
                    "Cookie": planted["cookie"],
                    "Accept": "application/json",
                },
            },
        ),
    }
    return {"deployments": deployments, "parameters": parameters}


async def _start(deployment: Any, tmp: Path, name: str, parameters: dict[str, Any]) -> Any:
    async with get_client() as client:
        run = await client.create_flow_run_from_deployment(
            deployment, parameters={**parameters, "marker": str(tmp / f"{name}.ran")}
        )
    return run.id


async def _edit_schema(deployment_id: Any) -> dict[str, Any]:
    """What any API client may do: strip the secret markers off the deployment's schema."""
    async with get_client() as client:
        schema = (await client.read_deployment(deployment_id)).parameter_openapi_schema

        def strip(node: Any) -> Any:
            if isinstance(node, dict):
                return {k: strip(v) for k, v in node.items() if k not in ("writeOnly", "format")}
            if isinstance(node, list):
                return [strip(v) for v in node]
            return node

        edited = strip(schema)
        await client.update_deployment(
            deployment_id, DeploymentUpdate(parameter_openapi_schema=edited)
        )
        return (await client.read_deployment(deployment_id)).parameter_openapi_schema


def _wait_decided(store: Any, run_id: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not any(e.kind == "decision" for e in store.recent(5, flow_run_id=str(run_id))):
        assert time.monotonic() < deadline, "the worker did not decide the first run"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def attacked(prefect_server, opa_server, tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("secrets")
    planted = _planted()
    with harness(prefect_server, tmp, lineage_url=home_lineage_url(prefect_server.home)) as gov:
        plan = asyncio.run(_setup(gov, opa_server.url, planted))
        deployments = plan["deployments"]
        runs = {
            name: asyncio.run(_start(deployments[kind], tmp, name, params))
            for name, (kind, params) in plan["parameters"].items()
        }
        worker_log = tmp / "worker.log"
        gov.start_worker(POOL, log=worker_log)
        store = gov.store
        try:
            # Once the worker has decided a run of it (and so remembered its schema), the
            # schema is edited, and a run carries a real secret.
            _wait_decided(store, runs["edited-before"], timeout=180)
            edited_schema = asyncio.run(_edit_schema(deployments["edited"]))
            runs["edited"] = asyncio.run(
                _start(deployments["edited"], tmp, "edited", {"unlock": planted["edited"]})
            )
            final = asyncio.run(wait_final(list(runs.values()), timeout=180))
            asyncio.run(wait_outcomes(store, list(runs.values()), timeout=60))
        finally:
            gov.stop_workers()
        time.sleep(1)
        decisions = {}
        for name, run_id in runs.items():
            found = [e for e in store.recent(20, flow_run_id=str(run_id)) if e.kind == "decision"]
            decisions[name] = found
        database = Path(store.url.removeprefix("sqlite:///"))
    artifacts, logs = asyncio.run(_artifacts_and_logs(list(runs.values())))
    lineage_bytes = b"".join(
        p.read_bytes() for p in database.parent.glob(database.name + "*") if p.is_file()
    )
    return {
        "planted": planted,
        "runs": runs,
        "final": final,
        "decisions": decisions,
        "edited_schema": edited_schema,
        "places": {
            "lineage_file": lineage_bytes.decode("utf-8", "replace"),
            "artifacts": artifacts,
            "labels_and_states": "\n".join(
                json.dumps([r.labels, r.tags, r.state.name, r.state.message])
                for r in final.values()
            ),
            "worker_output": worker_log.read_text(errors="replace"),
            "flow_run_logs": logs,
            "opa_decision_log": opa_server.log.read_text(errors="replace"),
        },
    }


def _envelope(attacked: dict[str, Any], run: str) -> dict[str, Any]:
    found = attacked["decisions"][run]
    assert len(found) == 1, (run, found)
    return found[0].payload["envelope"]


def test_every_run_was_decided_and_ran(attacked):
    for name, run_id in attacked["runs"].items():
        state = attacked["final"][run_id].state
        assert state.is_completed(), (name, state)


def test_a_secretstr_inside_a_tuple_is_redacted_in_the_policy_input(attacked):
    envelope = _envelope(attacked, "tuple")
    assert envelope["parameters"]["pair"] == ["visible-half", REDACTED]
    assert envelope["redacted"] == ["pair[1]"]


def test_secretstr_fields_of_models_in_lists_and_dicts_are_redacted(attacked):
    estate = _envelope(attacked, "model")["parameters"]["estate"]
    assert estate["vaults"] == [{"name": "listed", "unlock": REDACTED}]
    assert estate["extra"] == {"keyed": {"name": "keyed", "unlock": REDACTED}}


def test_a_secretstr_stays_redacted_after_an_api_client_edits_the_schema(attacked):
    assert "password" not in json.dumps(attacked["edited_schema"]), "the edit did not land"
    assert _envelope(attacked, "edited")["parameters"]["unlock"] == REDACTED
    assert _envelope(attacked, "edited-before")["parameters"]["unlock"] == REDACTED


def test_secret_shaped_values_and_secret_headers_are_redacted(attacked):
    parameters = _envelope(attacked, "values")["parameters"]
    assert parameters["target"] == REDACTED  # postgresql://user:password@...
    assert parameters["note"] == REDACTED  # Bearer <JWT>
    assert parameters["blob"] == REDACTED  # PEM private key
    assert parameters["headers"] == {
        "Authorization": REDACTED,
        "Cookie": REDACTED,
        "Accept": "application/json",
    }


@pytest.mark.parametrize(
    "where",
    [
        "lineage_file",
        "artifacts",
        "labels_and_states",
        "worker_output",
        "flow_run_logs",
        "opa_decision_log",
    ],
)
def test_no_planted_secret_appears_anywhere(attacked, where):
    corpus = attacked["places"][where]
    # Not vacuous: each place holds these runs.
    assert corpus.strip(), f"{where} is empty"
    if where in ("lineage_file", "opa_decision_log", "artifacts"):
        missing = [n for n, i in attacked["runs"].items() if str(i) not in corpus]
        assert not missing, f"{where} does not hold the runs {missing}"
        if where != "artifacts":
            assert REDACTED in corpus, f"{where} does not hold the redacted parameters"
    leaked = [name for name, value in attacked["planted"].items() if value in corpus]
    assert not leaked, f"{where} holds planted secrets: {leaked}"
