"""Redaction's pure functions: each schema construct, each secret shape, the union rule,
the name patterns, and the same rules for a task's parameters (issue 15, part 1)."""

from __future__ import annotations

import base64
import json
import time

import pytest
from prefect.utilities.callables import parameter_schema
from pydantic import SecretStr

from prefect_governance.core.envelope import (
    REDACTED,
    SECRET_SHAPES,
    policy_parameters,
    redact,
    redact_by_schema,
    redact_by_schemas,
    secret_shape,
    task_parameters,
)
from prefect_governance.core.settings import GovernanceSettings
from prefect_governance.lineage.parameter_schemas import forget_schema, remembered_schema
from tests.security_support import edited_flow, model_flow, tuple_flow

SECRET = {"type": "string", "format": "password", "writeOnly": True}
PATTERNS = GovernanceSettings().redact_patterns


def _schema(fn) -> dict:
    return parameter_schema(fn).model_dump_for_openapi()


# --- schema constructs -------------------------------------------------------------------


def test_prefix_items_a_tuple_with_a_secretstr():
    out, hits = redact_by_schema({"pair": ["a", "s3cr3t"]}, _schema(tuple_flow.fn))
    assert out == {"pair": ["a", REDACTED]} and hits == ["pair[1]"]


def test_draft4_tuple_items_and_additional_items():
    schema = {"properties": {"t": {"items": [{"type": "string"}], "additionalItems": SECRET}}}
    assert redact_by_schema({"t": ["a", "b", "c"]}, schema)[0] == {"t": ["a", REDACTED, REDACTED]}


def test_items_ref_and_additional_properties_into_definitions():
    value = {
        "estate": {
            "vaults": [{"name": "n", "unlock": "x"}],
            "extra": {"k": {"name": "m", "unlock": "y"}},
        }
    }
    out, hits = redact_by_schema(value, _schema(model_flow.fn))
    assert out["estate"]["vaults"][0] == {"name": "n", "unlock": REDACTED}
    assert out["estate"]["extra"]["k"] == {"name": "m", "unlock": REDACTED}
    assert sorted(hits) == ["estate.extra.k.unlock", "estate.vaults[0].unlock"]


def test_pattern_properties():
    schema = {"properties": {"d": {"patternProperties": {"^pw_": SECRET}}}}
    assert redact_by_schema({"d": {"pw_a": "x", "b": "y"}}, schema)[0] == {
        "d": {"pw_a": REDACTED, "b": "y"}
    }


@pytest.mark.parametrize("combinator", ["anyOf", "oneOf", "allOf"])
def test_combinators_and_dollar_defs_json_pointers(combinator):
    schema = {
        "properties": {"p": {combinator: [{"type": "null"}, {"$ref": "#/$defs/Wrap"}]}},
        "$defs": {
            "Wrap": {"type": "object", "properties": {"s": {"$ref": "#/$defs/S"}}},
            "S": SECRET,
        },
    }
    assert redact_by_schema({"p": {"s": "x"}}, schema)[0] == {"p": {"s": REDACTED}}


def test_at_any_depth():
    schema: dict = SECRET
    value: object = "x"
    for _ in range(30):
        schema = {"type": "array", "items": {"type": "object", "additionalProperties": schema}}
        value = [{"k": value}]
    out, hits = redact_by_schema({"deep": value}, {"properties": {"deep": schema}})
    assert REDACTED in json.dumps(out) and '"x"' not in json.dumps(out) and len(hits) == 1


def test_reference_cycles_and_junk_do_not_crash():
    cyclic = {"properties": {"a": {"$ref": "#/$defs/A"}}, "$defs": {"A": {"$ref": "#/$defs/A"}}}
    for schema in (cyclic, None, [], "x", {"properties": []}, {"items": 3}, {"$ref": 7}):
        assert redact_by_schema({"a": [1, {"b": 2}]}, schema) == ({"a": [1, {"b": 2}]}, [])


# --- the union rule ---------------------------------------------------------------------


def test_an_edited_schema_does_not_unredact_what_the_reference_marks():
    reference = _schema(edited_flow.fn)
    edited = json.loads(json.dumps(reference).replace('"writeOnly": true', '"x": 1'))
    edited = json.loads(json.dumps(edited).replace('"format": "password"', '"y": 1'))
    assert redact_by_schema({"unlock": "x"}, edited)[0] == {"unlock": "x"}  # the attack
    assert redact_by_schemas({"unlock": "x"}, [edited, reference])[0] == {"unlock": REDACTED}


def test_a_secret_marked_only_now_is_redacted_too():
    plain = {"properties": {"a": {"type": "string"}}}
    marked = {"properties": {"a": SECRET}}
    assert redact_by_schemas({"a": "x"}, [marked, plain])[0] == {"a": REDACTED}


def test_a_value_whose_schema_differs_is_redacted_an_unchanged_one_is_not():
    reference = {"properties": {"a": {"type": "string"}, "b": {"type": "string"}}}
    changed = {"properties": {"a": {"type": "string", "maxLength": 9}, "b": {"type": "string"}}}
    out, hits = redact_by_schemas({"a": "x", "b": "y", "c": "z"}, [changed, reference])
    assert out == {"a": REDACTED, "b": "y", "c": "z"} and hits == ["a"]


def test_a_type_swapped_for_a_ref_elsewhere_counts_as_a_difference():
    reference = {"properties": {"a": {"$ref": "#/definitions/S"}}, "definitions": {"S": SECRET}}
    swapped = {"properties": {"a": {"$ref": "#/definitions/S"}}, "definitions": {"S": {}}}
    assert redact_by_schemas({"a": "x"}, [swapped, reference])[0] == {"a": REDACTED}


def test_titles_descriptions_and_positions_are_not_differences():
    reference = {"properties": {"a": {"type": "string", "title": "A", "position": 0}}}
    renamed = {"properties": {"a": {"type": "string", "title": "B", "description": "d"}}}
    assert redact_by_schemas({"a": "x"}, [renamed, reference])[0] == {"a": "x"}


def test_the_reference_is_the_first_schema_seen_until_forgotten(tmp_path):
    from sqlalchemy import create_engine

    engine = create_engine(f"sqlite:///{tmp_path / 'lineage.db'}")
    first, second = {"properties": {"a": SECRET}}, {"properties": {"a": {}}}
    assert remembered_schema(engine, "dep-1", first) == first
    assert remembered_schema(engine, "dep-1", second) == first
    assert remembered_schema(engine, "dep-2", second) == second
    assert forget_schema(engine, "dep-1") and not forget_schema(engine, "dep-1")
    assert remembered_schema(engine, "dep-1", second) == second
    engine.dispose()


def test_policy_parameters_apply_the_reference():
    reference = {"properties": {"unlock": SECRET}}
    out, hits = policy_parameters(
        {"unlock": "x"}, redact_patterns=[], schema={}, reference_schema=reference
    )
    assert out == {"unlock": REDACTED} and hits == ["unlock"]


# --- value shapes -------------------------------------------------------------------------

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
SHAPED = {
    "url-password": "postgresql://etl:hunter2@db.internal:5432/sales",
    "bearer": "Bearer abcDEF1234567890ghij",
    "basic": "Basic " + base64.b64encode(b"user:pass").decode(),
    "jwt": JWT,
    "private-key": "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Bl\n-----END OPENSSH PRIVATE KEY-----",
    "aws-access-key": "AKIAIOSFODNN7EXAMPLE",
    "github-token": "ghp_" + "a1" * 18,
    "gitlab-token": "glpat-" + "x1" * 10,
    "slack-token": "xoxb-1234567890-abc",
    "stripe-key": "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc",
    "sk-key": "sk-proj-" + "A1b2" * 6,
    "google-api-key": "AIza" + "S" * 35,
    "prefect-api-key": "pnu_" + "a" * 36,
}
PLAIN = [
    "https://example.com/path?a=b",
    "https://user@example.com/",  # a user, no password
    "mailto:someone@example.com",
    "use basic settings for the bearer of this task",
    "Bearer authentication",
    "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
    "-----BEGIN PUBLIC KEY-----",
    "task-abcdefghijklmnopqrstuvwxyz",
    "2026-12-01T00:00:00Z",
    "a" * 100,
]


def test_every_documented_shape_is_tested():
    assert set(SHAPED) == {name for name, _ in SECRET_SHAPES}


@pytest.mark.parametrize("name", sorted(SHAPED))
def test_a_secret_shaped_value_is_redacted_whatever_its_name(name):
    assert secret_shape(SHAPED[name]) == name
    value = {"note": f"see {SHAPED[name]} here", "list": [SHAPED[name]]}
    out, hits = redact(value, [])
    assert out == {"note": REDACTED, "list": [REDACTED]} and hits == ["note", "list[0]"]


@pytest.mark.parametrize("text", PLAIN)
def test_ordinary_text_is_not_taken_for_a_secret(text):
    assert secret_shape(text) is None


def test_shapes_are_fast_on_a_megabyte_of_adversarial_text():
    for text in ("a" * 1_000_000, "x://" + "a:" * 500_000, "-----BEGIN " * 90_000):
        started = time.monotonic()
        secret_shape(text)
        assert time.monotonic() - started < 5


def test_a_secret_used_as_a_key_is_redacted_too():
    out, hits = redact({"headers": {JWT: "x"}}, [])
    assert JWT not in json.dumps(out) and len(hits) == 1


# --- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "Authorization",
        "auth_header",
        "bearer",
        "warehouse_dsn",
        "Cookie",
        "session_id",
        "passphrase",
        "private_key",
        "credentials",
        "db_pwd",
        "aws_access_key_id",
        "api_token",
    ],
)
def test_the_default_name_patterns(name):
    assert redact({"h": {name: "x"}}, PATTERNS)[0] == {"h": {name: REDACTED}}


def test_name_patterns_stay_configurable(monkeypatch):
    monkeypatch.setenv("PREFECT_GOVERNANCE_REDACT_PATTERNS", '["only_this"]')
    patterns = GovernanceSettings().redact_patterns
    assert patterns == ["only_this"]
    assert redact({"only_this": "x", "cookie": "y"}, patterns)[0] == {
        "only_this": REDACTED,
        "cookie": "y",
    }


# --- task parameters: the same rules, one implementation ---------------------------------


def test_task_parameters_get_the_same_rules():
    raw = {
        "target": SHAPED["url-password"],
        "pair": ("a", SecretStr("s")),
        "rows": [("x", SHAPED["jwt"])],
        "headers": {"Authorization": "opaque"},
        "n": 3,
    }
    out, hits = task_parameters(raw, redact_patterns=PATTERNS)
    assert out == {
        "target": REDACTED,
        "pair": ["a", REDACTED],
        "rows": [["x", REDACTED]],
        "headers": {"Authorization": REDACTED},
        "n": 3,
    }
    assert sorted(hits) == ["headers.Authorization", "pair[1]", "rows[0][1]", "target"]
