"""Security of the decision path.

1. The OPA sidecar behind a bearer token, TLS and mutual TLS (a real OPA, a private PKI).
2. Secrets never reach the policy input, the lineage, the artifacts or the logs.
3. Limits on the parameter document: too large, too deep, not JSON is a refusal.
4. Properties: arbitrary documents never crash the decision path nor read as allowed.
5. Pool-only settings: neither job variables nor parameters move the lineage store,
   the signing key, the engine or the policy path.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import secrets
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prefect import flow as prefect_flow
from prefect import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import Flow, FlowRun
from prefect.client.schemas.responses import DeploymentResponse
from prefect.utilities.callables import parameter_schema
from pydantic import BaseModel, SecretStr, ValidationError
from sqlalchemy import create_engine, text

from prefect_governance.core.controls import DEFAULTS, POOL_ONLY, pool_defaults, resolve_controls
from prefect_governance.core.decision import decide, decision_for, interpret
from prefect_governance.core.engines import EngineAnswer, EngineError, OpaEngine
from prefect_governance.core.envelope import (
    MAX_PARAMETER_BYTES,
    MAX_PARAMETER_DEPTH,
    REDACTED,
    ParameterLimitError,
    build_envelope,
    depth_problem,
    nesting_depth,
    redact_by_schema,
    size_problem,
)
from prefect_governance.core.keys import GovernanceSigningKey, GovernanceVerifyKey
from prefect_governance.core.models import (
    MemoryAccess,
    PolicyContext,
    PolicyInput,
    PolicyResult,
    TrustState,
    WorkerRef,
    WorkPoolRef,
)
from prefect_governance.core.settings import WORKER_SECRETS, GovernanceSettings
from prefect_governance.core.signing import SigningKey
from prefect_governance.core.trust import TrustWeights
from prefect_governance.testing import (
    Harness,
    create_pool,
    pool_template,
    wait_final,
    wait_outcomes,
)
from prefect_governance.worker.blocks import (
    GovernanceAgent,
    GovernancePolicyEngine,
)
from tests import security_support
from tests.agents import harness
from tests.conftest import POLICIES
from tests.security_support import Pki, SecuredOpa, make_pki

PATH = "prefect/governance/decision"
PATTERNS = GovernanceSettings().redact_patterns
ROOT = Path(__file__).resolve().parent.parent


def _example(name: str) -> dict[str, Any]:
    return json.loads((POLICIES / "examples" / name / "input.json").read_text())


def _decide(url: str, example: str = "allowed", **options: Any):
    """One decision through a fresh OpaEngine (no retries: a refusal is immediate)."""

    async def go():
        engine = OpaEngine(url, retries=0, **options)
        try:
            return await decide(engine, PATH, _example(example))
        finally:
            await engine.aclose()

    return asyncio.run(go())


# --- 1. bearer token, TLS and mutual TLS against a real OPA ------------------------------

TOKEN = f"opa-token-{secrets.token_hex(12)}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token_opa(opa_bin, tmp_path_factory):
    server = SecuredOpa(opa_bin, tmp_path_factory.mktemp("opa-token"), POLICIES, token=TOKEN)
    yield server
    server.stop()


def _tls_flags(pki: Pki) -> tuple[str, ...]:
    return (f"--tls-cert-file={pki.server_cert}", f"--tls-private-key-file={pki.server_key}")


@pytest.fixture(scope="module")
def tls_opa(opa_bin, pki, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("opa-tls")
    server = SecuredOpa(opa_bin, workdir, POLICIES, *_tls_flags(pki), pki=pki)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls_opa(opa_bin, pki, tmp_path_factory):
    """OPA that demands a client certificate issued by our CA (--authentication=tls)."""
    flags = (*_tls_flags(pki), f"--tls-ca-cert-file={pki.ca}", "--authentication=tls")
    server = SecuredOpa(opa_bin, tmp_path_factory.mktemp("opa-mtls"), POLICIES, *flags, pki=pki)
    yield server
    server.stop()


def test_the_right_token_gets_the_policy_decision(token_opa):
    assert _decide(token_opa.url, "allowed", token=TOKEN).verdict == "allowed"
    refused = _decide(token_opa.url, "refused-capability", token=TOKEN)
    assert refused.verdict == "refused" and refused.error is None, "the policy refused, not OPA"
    assert "is not granted" in refused.deny[0]


@pytest.mark.parametrize("token", [None, "not-the-token"], ids=["missing", "wrong"])
def test_a_missing_or_wrong_token_is_refused_as_http_401(token_opa, token):
    decision = _decide(token_opa.url, token=token)
    assert decision.verdict == "refused" and not decision.runs
    assert decision.error.startswith("policy engine failed (http): OPA answered HTTP 401")
    assert "unauthorized" in decision.error
    assert TOKEN not in json.dumps(decision.model_dump(mode="json")), "the token is not echoed"


def test_the_engine_block_carries_the_token_and_keeps_it_secret(token_opa):
    block = GovernancePolicyEngine(kind="opa", opa_url=token_opa.url, token=TOKEN, retries=0)
    assert TOKEN not in repr(block) and TOKEN not in block.model_dump_json()

    async def go():
        engine = block.build()
        try:
            return await decide(engine, PATH, _example("allowed"))
        finally:
            await engine.aclose()

    assert asyncio.run(go()).verdict == "allowed"


def test_tls_with_our_ca_gets_the_policy_decision(tls_opa, pki):
    assert tls_opa.url.startswith("https://")
    assert _decide(tls_opa.url, ca_cert=str(pki.ca)).verdict == "allowed"


def test_tls_without_our_ca_is_refused_as_unreachable(tls_opa):
    decision = _decide(tls_opa.url)  # the system's CAs do not know our issuer
    assert decision.verdict == "refused"
    assert decision.error.startswith("policy engine failed (unreachable)")
    assert "certificate verify failed" in decision.error


def test_mutual_tls_with_our_client_certificate_decides(mtls_opa, pki):
    decision = _decide(
        mtls_opa.url,
        ca_cert=str(pki.ca),
        client_cert=str(pki.client_cert),
        client_key=str(pki.client_key),
    )
    assert decision.verdict == "allowed"


def test_mutual_tls_without_a_client_certificate_is_refused(mtls_opa, pki):
    decision = _decide(mtls_opa.url, ca_cert=str(pki.ca))
    assert decision.verdict == "refused"
    assert decision.error.startswith("policy engine failed (unreachable)")
    assert "certificate required" in decision.error


def test_mutual_tls_with_a_certificate_from_another_ca_is_refused(mtls_opa, pki):
    decision = _decide(
        mtls_opa.url,
        ca_cert=str(pki.ca),
        client_cert=str(pki.rogue_cert),
        client_key=str(pki.rogue_key),
    )
    assert decision.verdict == "refused"
    assert decision.error.startswith("policy engine failed (unreachable)")


# --- 2. redaction, as pure functions ----------------------------------------------------

SECRET_SCHEMA = parameter_schema(security_support.secret_flow).model_dump()


def test_a_secretstr_parameter_is_redacted_by_its_schema_whatever_its_name():
    assert SECRET_SCHEMA["properties"]["warehouse_dsn"]["anyOf"][0]["format"] == "password"
    out, hits = redact_by_schema({"warehouse_dsn": "dsn://u:pw@h", "marker": "m"}, SECRET_SCHEMA)
    assert out == {"warehouse_dsn": REDACTED, "marker": "m"}
    assert hits == ["warehouse_dsn"]


class Conn(BaseModel):
    host: str
    key: SecretStr


@prefect_flow
def nested_secrets(conn: Conn, conns: list[Conn], extra: dict[str, SecretStr]) -> None:
    """Secrets inside a model, a list of models and a mapping."""


def test_secret_fields_of_nested_models_and_lists_are_redacted_by_schema():
    schema = parameter_schema(nested_secrets).model_dump()
    assert schema["properties"]["conn"]["$ref"] == "#/definitions/Conn"
    out, hits = redact_by_schema(
        {
            "conn": {"host": "h", "key": "k1"},
            "conns": [{"host": "h", "key": "k2"}],
            "extra": {"anything": "k3"},
        },
        schema,
    )
    assert out == {
        "conn": {"host": "h", "key": REDACTED},
        "conns": [{"host": "h", "key": REDACTED}],
        "extra": {"anything": REDACTED},
    }
    assert sorted(hits) == ["conn.key", "conns[0].key", "extra.anything"]


def test_junk_and_cyclic_schemas_redact_nothing_and_do_not_crash():
    cycle = {"anyOf": [{"$ref": "#/definitions/A"}]}
    cyclic = {"properties": {"a": {"$ref": "#/definitions/A"}}, "definitions": {"A": cycle}}
    for schema in (None, [], "x", {"properties": "x"}, {"$defs": 3, "anyOf": 7}, cyclic):
        assert redact_by_schema({"a": {"b": [1]}}, schema) == ({"a": {"b": [1]}}, [])


def _flow_run(parameters: dict[str, Any], **fields: Any) -> tuple[FlowRun, Flow]:
    flow = Flow(id=uuid.uuid4(), name="etl")
    return FlowRun(
        id=uuid.uuid4(), name="run", flow_id=flow.id, parameters=parameters, **fields
    ), flow


def _envelope(parameters: dict[str, Any], schema: dict[str, Any] | None = None, **limits: int):
    flow_run, flow = _flow_run(parameters)
    deployment = None
    if schema is not None:
        deployment = DeploymentResponse(
            id=uuid.uuid4(), name="d", flow_id=flow.id, parameter_openapi_schema=schema
        )
    return build_envelope(
        flow_run=flow_run,
        flow=flow,
        deployment=deployment,
        work_pool=WorkPoolRef(name="gov", type="governed-process"),
        capabilities=[],
        memory=MemoryAccess(),
        parent_flow_run_id=None,
        issued_at=datetime.now(timezone.utc),
        ttl=timedelta(minutes=5),
        redact_patterns=PATTERNS,
        **limits,
    )


def test_the_envelope_redacts_by_name_and_by_schema_and_lists_what_it_redacted():
    envelope = _envelope(
        {
            "db_password": "p1",
            "conn": {"host": "db", "api_token": "p2"},
            "warehouse_dsn": "p3",
            "marker": "m",
        },
        SECRET_SCHEMA,
    )
    assert envelope.parameters == {
        "db_password": REDACTED,
        "conn": {"host": "db", "api_token": REDACTED},
        "warehouse_dsn": REDACTED,
        "marker": "m",
    }
    assert sorted(envelope.redacted) == ["conn.api_token", "db_password", "warehouse_dsn"]


# --- 3. limits on the parameter document --------------------------------------------------


def _nested(depth: int) -> Any:
    """A document whose nesting depth is ``depth`` (objects and arrays alternating)."""
    value: Any = "leaf"
    for i in range(depth):
        value = {"k": value} if i % 2 else [value]
    return value


def test_nesting_depth_counts_objects_and_arrays():
    assert [nesting_depth(_nested(n), 100) for n in (0, 1, 2, 64)] == [0, 1, 2, 64]
    assert nesting_depth({"a": 1, "b": {"c": [1]}}, 100) == 3


def test_a_document_at_the_depth_limit_passes_one_deeper_is_refused():
    assert depth_problem({"p": _nested(MAX_PARAMETER_DEPTH - 1)}, MAX_PARAMETER_DEPTH) is None
    reason = depth_problem({"p": _nested(MAX_PARAMETER_DEPTH)}, MAX_PARAMETER_DEPTH)
    assert reason and "deeper than 64 levels" in reason
    assert "PREFECT_GOVERNANCE_MAX_PARAMETER_DEPTH" in reason


def test_a_document_deeper_than_python_can_recurse_is_refused_not_a_crash():
    with pytest.raises(ParameterLimitError, match="deeper than 64 levels"):
        _envelope({"p": _nested(100_000)})


def test_a_document_at_the_size_limit_passes_one_byte_more_is_refused():
    overhead = len(json.dumps({"p": ""}, separators=(",", ":")))
    at_limit = {"p": "x" * (1000 - overhead)}
    assert size_problem(at_limit, 1000) is None
    reason = size_problem({"p": "x" * (1001 - overhead)}, 1000)
    assert reason and "larger than 1000 bytes" in reason
    assert "PREFECT_GOVERNANCE_MAX_PARAMETER_BYTES" in reason


def test_size_counts_utf8_bytes_not_characters():
    assert size_problem({"p": "é" * 400}, 1000) is None  # 800 bytes
    assert size_problem({"p": "é" * 500}, 1000) is not None  # 1000 bytes and the quotes


def test_a_huge_document_is_refused_by_the_default_limit():
    with pytest.raises(ParameterLimitError, match="larger than 1000000 bytes"):
        _envelope({"blob": "x" * (MAX_PARAMETER_BYTES + 1)})


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (b"raw bytes", "bytes is not JSON serializable"),
        ({1, 2}, "set is not JSON serializable"),
        (float("nan"), "Out of range float values"),
        (float("inf"), "Out of range float values"),
        ({(1, 2): "tuple key"}, "keys must be str"),
        (object(), "object is not JSON serializable"),
    ],
    ids=["bytes", "set", "nan", "inf", "tuple-key", "object"],
)
def test_a_document_that_is_not_json_is_refused_saying_why(value, says):
    with pytest.raises(ParameterLimitError) as caught:
        _envelope({"p": value})
    assert "not JSON-serializable" in str(caught.value) and says in str(caught.value)


def test_an_unserializable_secret_is_redacted_before_the_json_check():
    envelope = _envelope({"api_token": SecretStr("s"), "password": b"raw"})
    assert envelope.parameters == {"api_token": REDACTED, "password": REDACTED}


def test_the_limits_are_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("PREFECT_GOVERNANCE_MAX_PARAMETER_BYTES", "2000")
    monkeypatch.setenv("PREFECT_GOVERNANCE_MAX_PARAMETER_DEPTH", "3")
    configured = GovernanceSettings()
    assert (configured.max_parameter_bytes, configured.max_parameter_depth) == (2000, 3)
    limits = {"max_parameter_bytes": 2000, "max_parameter_depth": 3}
    with pytest.raises(ParameterLimitError, match="larger than 2000 bytes"):
        _envelope({"p": "x" * 2000}, **limits)
    with pytest.raises(ParameterLimitError, match="deeper than 3 levels"):
        _envelope({"p": {"q": {"r": {"s": 1}}}}, **limits)
    assert GovernanceSettings.model_fields["max_parameter_bytes"].default == 1_000_000
    assert GovernanceSettings.model_fields["max_parameter_depth"].default == 64


# --- 4. properties ---------------------------------------------------------------------

PROPERTIES = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=25,
)
secret_keys = st.sampled_from(["password", "db_password", "API_TOKEN", "my_secret", "apikey"])
junk = (
    json_values | st.binary(max_size=8) | st.just(float("nan")) | st.sets(st.integers(), max_size=3)
)
parameters = st.dictionaries(st.text(max_size=12) | secret_keys, json_values | junk, max_size=6)
labels = st.dictionaries(
    st.text(max_size=12),
    st.text(max_size=12)
    | st.integers()
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False),
    max_size=4,
)


def _secret_values(document: Any, out: list[Any]) -> list[Any]:
    """The values under keys that match a redaction pattern, at any depth."""
    if isinstance(document, dict):
        for key, value in document.items():
            if any(p in str(key).lower() for p in PATTERNS):
                out.append(value)
            else:
                _secret_values(value, out)
    elif isinstance(document, list):
        for item in document:
            _secret_values(item, out)
    return out


def _has_secret_key_unredacted(document: Any) -> bool:
    if isinstance(document, dict):
        return any(
            (any(p in str(k).lower() for p in PATTERNS) and v != REDACTED)
            or _has_secret_key_unredacted(v)
            for k, v in document.items()
        )
    if isinstance(document, list):
        return any(_has_secret_key_unredacted(item) for item in document)
    return False


AGENT = GovernanceAgent(id="prop-agent", owner="o", trust_scope=["gov"])


@PROPERTIES
@given(parameters=parameters, labels=labels, tags=st.lists(st.text(max_size=12), max_size=4))
def test_any_run_document_builds_a_sendable_input_or_a_limit_refusal(parameters, labels, tags):
    flow_run, flow = _flow_run(parameters, labels=labels, tags=tags)
    try:
        envelope = build_envelope(
            flow_run=flow_run,
            flow=flow,
            deployment=None,
            work_pool=WorkPoolRef(name="gov", type="governed-process"),
            capabilities=[],
            memory=MemoryAccess(),
            parent_flow_run_id=None,
            issued_at=datetime.now(timezone.utc),
            ttl=timedelta(minutes=5),
            redact_patterns=PATTERNS,
        )
    except ParameterLimitError as exc:
        assert "not JSON-serializable" in str(exc)  # small documents: only this limit
        return
    assert not _has_secret_key_unredacted(envelope.parameters)
    policy_input = PolicyInput(
        agent=AGENT.to_agent_object(PATH, TrustState()),
        envelope=envelope,
        context=PolicyContext(worker=WorkerRef(name="w"), time=datetime.now(timezone.utc)),
    ).model_dump(mode="json")
    sent = json.dumps(policy_input, allow_nan=False)  # what an engine receives is strict JSON
    for value in _secret_values(parameters, []):
        if isinstance(value, str) and len(value) >= 6:
            assert json.dumps(value) not in sent


agent_documents = st.fixed_dictionaries(
    {},
    optional={
        "id": st.from_regex(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,8}$", fullmatch=True) | json_values,
        "owner": st.text(max_size=8) | json_values,
        "trust_scope": st.lists(st.text(max_size=8), max_size=3) | json_values,
        "capabilities": st.lists(st.text(max_size=8), max_size=3) | json_values,
        "version": st.integers(-2, 5) | json_values,
        "constraints": st.just({}) | json_values,
        "mode": st.sampled_from(["audit", "enforce", None]) | json_values,
        "trust_baseline": st.floats(-1, 2, allow_nan=False) | json_values,
        "memory_schema": st.just({"type": "object"}) | json_values,
    },
)


@PROPERTIES
@given(document=agent_documents)
def test_any_agent_document_is_an_agent_or_a_validation_error(document):
    try:
        agent = GovernanceAgent.model_validate(document)
    except ValidationError:
        return
    PolicyInput.model_validate(
        {
            "agent": agent.to_agent_object(PATH, TrustState()).model_dump(mode="json"),
            "envelope": _envelope({}).model_dump(mode="json"),
            "context": {"worker": {"name": "w"}, "time": datetime.now(timezone.utc)},
        }
    )


def _really_allows(result: Any) -> bool:
    """An oracle written apart from PolicyResult: a well-formed allow with no deny."""
    if not isinstance(result, dict) or result.get("allow") is not True:
        return False
    if result.get("deny", []) != []:
        return False
    warn = result.get("warn", [])
    annotations = result.get("annotations", {})
    reasons = result.get("reasons", [])
    return (
        isinstance(warn, list)
        and all(isinstance(w, str) for w in warn)
        and isinstance(annotations, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in annotations.items())
        and isinstance(reasons, list)
        and all(
            isinstance(r, dict)
            and set(r) == {"kind", "message", "rule"}
            and r["kind"] in ("deny", "warn")
            and isinstance(r["message"], str)
            and isinstance(r["rule"], str)
            for r in reasons
        )
    )


reasons = st.lists(
    st.fixed_dictionaries(
        {
            "kind": st.sampled_from(["deny", "warn"]) | json_values,
            "message": st.text(max_size=8),
            "rule": st.text(max_size=8) | json_values,
        }
    ),
    max_size=2,
)
results = json_values | st.fixed_dictionaries(
    {"allow": st.booleans() | json_values},
    optional={
        "deny": st.lists(st.text(max_size=8), max_size=2) | json_values,
        "warn": st.lists(st.text(max_size=8), max_size=2) | json_values,
        "annotations": st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=2)
        | json_values,
        "reasons": reasons | json_values,
        "other_rule": json_values,
    },
)


@PROPERTIES
@given(
    result=results,
    mode=st.sampled_from(["enforce", "audit"]),
    fail_mode=st.sampled_from(["closed", "open"]),
)
def test_only_a_well_formed_allow_without_deny_is_allowed(result, mode, fail_mode):
    try:
        parsed = interpret(result)
    except EngineError as exc:
        assert exc.kind in ("undefined", "shape")
    else:
        assert isinstance(parsed, PolicyResult)
    decision = decision_for(
        EngineAnswer(result), engine="t", policy_path=PATH, mode=mode, fail_mode=fail_mode
    )
    assert (decision.verdict == "allowed") == _really_allows(result)
    assert decision.allow == (decision.verdict == "allowed")
    if decision.verdict != "allowed":
        assert decision.deny or decision.warn, "a run that is not allowed says why"


@PROPERTIES
@given(
    kind=st.sampled_from(["unreachable", "timeout", "http", "evaluation", "undefined", "shape"]),
    message=st.text(max_size=30),
)
def test_an_engine_failure_is_never_allowed(kind, message):
    for fail_mode, verdict in (("closed", "refused"), ("open", "ungoverned")):
        decision = decision_for(
            EngineError(kind, message),
            engine="t",
            policy_path=PATH,
            mode="enforce",
            fail_mode=fail_mode,
        )
        assert decision.verdict == verdict and not decision.allow


# --- 5. pool-only settings, as a pure function ------------------------------------------


@pytest.mark.parametrize("key", POOL_ONLY)
@pytest.mark.parametrize("pool_value", ["pool-choice", None], ids=["pool-set", "pool-unset"])
def test_job_variables_cannot_set_a_pool_only_setting(key, pool_value):
    pool = pool_defaults(pool_template(**({key: pool_value} if pool_value else {})))
    controls = resolve_controls(pool, {"agent": "a", key: "attacker-choice"})
    expected = pool_value if pool_value else DEFAULTS[key]
    assert getattr(controls, key) == expected
    assert any(f"job variable {key}='attacker-choice'" in n for n in controls.notes)
    assert any("only the work pool may set it" in n for n in controls.notes)


# --- 2 and 5 end to end: a governed worker, a real Prefect server, PostgreSQL, OPA -------


@dataclass
class Run:
    name: str
    deployment: str
    parameters: dict[str, Any] = field(default_factory=dict)
    job_variables: dict[str, Any] | None = None
    id: Any = None
    marker: Path | None = None


@dataclass
class Secured:
    tmp: Path
    runs: dict[str, Run]
    planted: dict[str, str]
    final: dict[Any, Any]
    events: dict[str, list[Any]]
    lineage_text: str
    artifacts: str
    flow_run_logs: str
    worker_log: str
    opa_log: str
    verify_keys: dict[str, bool]

    def marker(self, run: str) -> dict[str, Any] | None:
        path = self.runs[run].marker
        return json.loads(path.read_text()) if path and path.exists() else None

    def state(self, run: str):
        return self.final[self.runs[run].id].state

    def decision(self, run: str):
        found = [e for e in self.events[run] if e.kind == "decision"]
        assert len(found) == 1, found
        return found[0]


WORKER_MAX_BYTES = 200_000
ATTACKER = {
    "engine": "sec-attacker-engine",
    "lineage_store": "sec-attacker-lineage",
    "signing_key": "sec-attacker-key",
    "policy_path": "prefect/governance/allow_everything",
    "task_policy_path": "prefect/governance/allow_everything",
    "env_allow": ["*"],
}
ALLOW_EVERYTHING = """package prefect.governance

decision := {"allow": true, "deny": [], "warn": [], "annotations": {"pwned": "yes"}}

allow_everything := decision
"""


def _lineage_database(postgres, password: str) -> str:
    """A fresh database in the test cluster; its URL carries a (planted) password."""
    name = f"security_{secrets.token_hex(4)}"
    with psycopg.connect(
        host="127.0.0.1", port=postgres.port, user="governance", dbname="postgres", autocommit=True
    ) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"postgresql+psycopg://governance:{password}@127.0.0.1:{postgres.port}/{name}"


async def _deploy(
    name: str, flow_name: str, job_variables: dict[str, Any], pool: str = "sec-pool"
) -> Any:
    source = await prefect_flow.from_source(
        source=str(ROOT / "tests"), entrypoint=f"security_support.py:{flow_name}"
    )
    with contextlib.redirect_stdout(io.StringIO()):
        return await source.deploy(
            name=name,
            work_pool_name=pool,
            job_variables=job_variables,
            build=False,
            push=False,
            print_next_steps=False,
        )


async def _setup(gov: Harness, opa_url: str, pool_key: SigningKey, runs):
    tmp = gov.workdir
    still = TrustWeights(completed=0, failed=0, crashed=0, refused=0, warned=0, memory_rejected=0)
    await gov.save_agent(
        GovernanceAgent(
            id="sec-agent",
            owner="sec@example.com",
            trust_scope=["sec-pool"],
            capabilities=["read:warehouse"],
            trust_weights=still,
        )
    )
    await gov.save_lineage()
    await gov.save_engine("sec-opa", kind="opa", opa_url=opa_url)
    await GovernanceSigningKey(key_id="sec-pool-key", private_key=pool_key.seed_b64).asave(
        "sec-pool-key", overwrite=True
    )
    # What a run's author would like governance to use instead.
    allow_dir = tmp / "allow-everything"
    allow_dir.mkdir()
    (allow_dir / "allow.rego").write_text(ALLOW_EVERYTHING)
    await gov.save_engine(ATTACKER["engine"], kind="embedded", policy_dir=str(allow_dir))
    await gov.save_lineage(ATTACKER["lineage_store"], f"sqlite:///{tmp / 'attacker.db'}")
    attacker_key = SigningKey.generate(ATTACKER["signing_key"])
    await GovernanceSigningKey(
        key_id=ATTACKER["signing_key"], private_key=attacker_key.seed_b64
    ).asave(ATTACKER["signing_key"], overwrite=True)

    await create_pool(
        "sec-pool", engine="sec-opa", lineage_store=gov.lineage_block, signing_key="sec-pool-key"
    )
    reader = {"agent": "sec-agent", "capabilities": ["read:warehouse"]}
    deployments = {
        "secret": await _deploy("sec-secret", "secret_flow", reader),
        "probe": await _deploy("sec-probe", "probe_flow", reader),
        "attack": await _deploy(
            "sec-attack",
            "probe_flow",
            {**reader, "capabilities": ["delete:warehouse"], **ATTACKER},
        ),
    }
    async with get_client() as client:
        for run in runs.values():
            run.marker = tmp / "markers" / run.name
            created = await client.create_flow_run_from_deployment(
                deployments[run.deployment],
                parameters={**run.parameters, "marker": str(run.marker)},
                job_variables=run.job_variables,
            )
            run.id = created.id


def _all_rows_as_text(url: str) -> str:
    """Every row of every table of the database, each row cast to text."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            tables = conn.execute(
                text(
                    "SELECT table_schema, table_name FROM information_schema.tables "
                    "WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
                )
            ).all()
            assert {"governance_event", "governance_agent_memory"} <= {t for _, t in tables}
            return "\n".join(
                row[0]
                for schema, table in tables
                for row in conn.execute(text(f'SELECT t::text FROM "{schema}"."{table}" t'))
            )
    finally:
        engine.dispose()


async def _artifacts_and_logs(ids: list[Any]) -> tuple[str, str]:
    async with get_client() as client:
        artifacts = await client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids))
        )
        logs, offset = [], 0
        while True:
            page = await client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)), limit=200, offset=offset
            )
            logs += page
            offset += len(page)
            if len(page) < 200:
                break
    artifact_text = "\n".join(json.dumps(a.model_dump(mode="json")) for a in artifacts)
    return artifact_text, "\n".join(log.message for log in logs)


async def _verify_keys() -> dict[str, bool]:
    published = {}
    for name in ("sec-pool-key", ATTACKER["signing_key"]):
        try:
            await GovernanceVerifyKey.aload(name)
            published[name] = True
        except ValueError:
            published[name] = False
    return published


def _planted() -> dict[str, str]:
    def unique(label: str) -> str:
        return f"planted-{label}-{secrets.token_hex(10)}"

    return {
        "db_password": unique("dbpw"),
        "api_token": unique("token"),
        "warehouse_dsn": unique("dsn"),
        "lineage_password": unique("lineagepw"),
        "signing_seed": SigningKey.generate("sec-pool-key").seed_b64,
        "env_lineage_password": unique("envpw"),
        "env_signing_seed": SigningKey.generate("env").seed_b64,
        "env_agent_signing_seed": SigningKey.generate("pool-owner").seed_b64,
    }


def _runs(planted: dict[str, str]) -> dict[str, Run]:
    return {
        run.name: run
        for run in [
            Run(
                "secrets",
                "secret",
                {
                    "db_password": planted["db_password"],
                    "conn": {"host": "db.internal", "api_token": planted["api_token"]},
                    "warehouse_dsn": planted["warehouse_dsn"],
                },
            ),
            # Prefect's API refuses parameters over 512 KiB itself, so the worker runs with a
            # lower limit (a setting) to see a huge document.
            Run("huge", "secret", {"payload": "x" * (WORKER_MAX_BYTES + 1)}),
            Run("deep", "secret", {"payload": _nested(100)}),
            Run("attack-deployment", "attack"),
            Run("attack-run-job-variables", "probe", job_variables=dict(ATTACKER)),
            Run("attack-run-parameters", "probe", parameters=dict(ATTACKER)),
        ]
    }


@pytest.fixture(scope="module")
def secured(prefect_server, opa_server, postgres, tmp_path_factory) -> Secured:
    tmp = tmp_path_factory.mktemp("security")
    (tmp / "markers").mkdir()
    planted = _planted()
    lineage_url = _lineage_database(postgres, planted["lineage_password"])
    pool_key = SigningKey.from_seed("sec-pool-key", planted["signing_seed"])
    runs = _runs(planted)
    gov = harness(prefect_server, tmp, lineage_url=lineage_url, lineage_block="sec-lineage")
    with gov:
        asyncio.run(_setup(gov, opa_server.url, pool_key, runs))
        # Worker credentials in the environment too: they must not reach the runs either.
        env = {
            "PREFECT_GOVERNANCE_LINEAGE_URL": "postgresql+psycopg://governance:"
            f"{planted['env_lineage_password']}@127.0.0.1:{postgres.port}/postgres",
            "PREFECT_GOVERNANCE_SIGNING_KEY": planted["env_signing_seed"],
            # the pool owner's agent key, were it (wrongly) on the worker's host
            "PREFECT_GOVERNANCE_AGENT_SIGNING_KEY": planted["env_agent_signing_seed"],
            "PREFECT_GOVERNANCE_MAX_PARAMETER_BYTES": str(WORKER_MAX_BYTES),
        }
        worker_log = tmp / "worker.log"
        gov.start_worker("sec-pool", log=worker_log, extra_env=env)
        store = gov.store
        ids = [run.id for run in runs.values()]
        try:
            final = asyncio.run(wait_final(ids, timeout=240))
            executed = [i for i, r in final.items() if r.state and r.state.name != "Refused"]
            asyncio.run(wait_outcomes(store, executed, timeout=60))
        finally:
            gov.stop_workers()  # flushes its logs to the API
        time.sleep(1)
        events = {
            name: list(store.recent(50, flow_run_id=str(run.id))) for name, run in runs.items()
        }
    artifacts, flow_run_logs = asyncio.run(_artifacts_and_logs(ids))
    # What governance wrote on the runs (not their parameters: Prefect's own record).
    final_text = "\n".join(
        json.dumps([r.labels, r.state.name, r.state.message]) for r in final.values()
    )
    return Secured(
        tmp=tmp,
        runs=runs,
        planted=planted,
        final=final,
        events=events,
        lineage_text=_all_rows_as_text(lineage_url),
        artifacts=artifacts + final_text,
        flow_run_logs=flow_run_logs,
        worker_log=worker_log.read_text(errors="replace"),
        opa_log=opa_server.log.read_text(errors="replace"),
        verify_keys=asyncio.run(_verify_keys()),
    )


e2e = pytest.mark.e2e


@e2e
def test_a_run_with_secret_parameters_is_decided_with_them_redacted(secured):
    assert secured.state("secrets").is_completed(), secured.state("secrets")
    assert secured.marker("secrets") is not None, "the run executed"
    envelope = secured.decision("secrets").payload["envelope"]
    assert sorted(envelope["redacted"]) == ["conn.api_token", "db_password", "warehouse_dsn"]
    assert envelope["parameters"]["conn"] == {"host": "db.internal", "api_token": REDACTED}
    assert envelope["parameters"]["warehouse_dsn"] == REDACTED


@e2e
@pytest.mark.parametrize(
    "where", ["lineage_text", "artifacts", "flow_run_logs", "worker_log", "opa_log"]
)
def test_no_planted_secret_appears_anywhere(secured, where):
    corpus = getattr(secured, where)
    # The search is not vacuous: each place holds the run it is searched for.
    secrets_run = str(secured.runs["secrets"].id)
    if where in ("lineage_text", "opa_log", "artifacts"):
        assert secrets_run in corpus, f"{where} does not hold the run at all"
    else:
        assert corpus.strip(), f"{where} is empty"
    if where in ("lineage_text", "opa_log"):
        assert REDACTED in corpus, f"{where} does not hold the redacted parameters"
    leaked = [name for name, value in secured.planted.items() if value in corpus]
    assert not leaked, f"{where} holds planted secrets: {leaked}"


@e2e
def test_worker_credentials_do_not_reach_the_run_environment(secured):
    seen = secured.marker("secrets")
    assert "PREFECT_GOVERNANCE_ENVELOPE" in seen["variables"]
    assert not set(WORKER_SECRETS) & set(seen["variables"]), seen["variables"]
    # each credential planted in the worker's environment, by name (not only those listed)
    planted = {"PREFECT_GOVERNANCE_SIGNING_KEY", "PREFECT_GOVERNANCE_AGENT_SIGNING_KEY"}
    assert not planted & set(seen["variables"]), seen["variables"]
    assert seen["kid"] == "sec-pool-key"


@e2e
@pytest.mark.parametrize(
    ("run", "limit"),
    [("huge", f"larger than {WORKER_MAX_BYTES} bytes"), ("deep", "nest deeper than 64 levels")],
)
def test_an_over_limit_parameter_document_is_refused_and_never_runs(secured, run, limit):
    assert secured.marker(run) is None, "the refused run executed"
    state = secured.state(run)
    assert state.is_cancelled() and state.name == "Refused", state
    assert limit in state.message
    decision = secured.decision(run)
    assert decision.verdict == "refused" and decision.engine == "worker"
    assert decision.agent_id == "sec-agent", "the refusal is on the agent's chain"
    assert not [e for e in secured.events[run] if e.kind == "outcome"]
    assert [e.kind for e in secured.events[run] if e.kind == "trust"] == ["trust"]


def _ignored(decision, keys) -> set[str]:
    return {k for k in keys if any(f"job variable {k}=" in w for w in decision.warnings)}


@e2e
def test_a_deployment_cannot_move_the_engine_lineage_key_or_policy(secured):
    # The attacker's engine would allow anything: had it been used, the run would have run.
    attacker = GovernancePolicyEngine(
        kind="embedded", policy_dir=str(secured.tmp / "allow-everything")
    ).build()
    assert attacker.evaluate_sync(PATH, {}).result["allow"] is True
    assert secured.marker("attack-deployment") is None, "the run executed"
    assert secured.state("attack-deployment").name == "Refused"
    decision = secured.decision("attack-deployment")  # in the pool's lineage
    assert (decision.engine, decision.policy_path) == ("opa", PATH)
    assert 'capability "delete:warehouse" is not granted' in decision.reasons[0]
    assert _ignored(decision, POOL_ONLY) == set(POOL_ONLY)
    assert not (secured.tmp / "attacker.db").exists(), "the attacker's lineage was opened"


@e2e
def test_flow_run_job_variables_cannot_move_them_either(secured):
    seen = secured.marker("attack-run-job-variables")
    assert seen is not None and seen["kid"] == "sec-pool-key", "signed with the pool's key"
    decision = secured.decision("attack-run-job-variables")
    assert (decision.engine, decision.policy_path, decision.verdict) == ("opa", PATH, "allowed")
    assert "pwned" not in (decision.payload.get("annotations") or {})
    assert _ignored(decision, POOL_ONLY) == set(POOL_ONLY)
    assert secured.verify_keys == {"sec-pool-key": True, ATTACKER["signing_key"]: False}
    assert not (secured.tmp / "attacker.db").exists()


@e2e
def test_flow_run_parameters_named_like_the_settings_have_no_effect(secured):
    seen = secured.marker("attack-run-parameters")
    assert seen is not None and seen["kid"] == "sec-pool-key"
    decision = secured.decision("attack-run-parameters")
    assert (decision.engine, decision.policy_path, decision.verdict) == ("opa", PATH, "allowed")
    assert decision.payload["envelope"]["parameters"]["lineage_store"] == ATTACKER["lineage_store"]
    assert not _ignored(decision, POOL_ONLY), "parameters are not job variables"
