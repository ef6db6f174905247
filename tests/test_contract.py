"""The policy contract: the published schema matches the models, and bad documents are rejected."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from prefect_governance import schema
from prefect_governance.models import AgentObject, PolicyInput
from tests.conftest import POLICIES, ROOT

EXAMPLES = sorted(p for p in (POLICIES / "examples").iterdir() if p.is_dir())


def test_published_schema_is_generated_from_the_models():
    published = (POLICIES / schema.SCHEMA_FILE).read_text()
    assert published == schema.render(), (
        "policies/schema is stale: run `prefect-governance schema` and commit the result"
    )


def test_published_governance_facet_schema_is_generated():
    published = (ROOT / schema.FACET_FILE).read_text()
    assert published == schema.render_facet(), (
        "spec/facets is stale: run `prefect-governance schema`"
    )


def test_schema_describes_input_and_result():
    contract = json.loads((POLICIES / schema.SCHEMA_FILE).read_text())
    defs = contract["$defs"]
    assert set(defs["PolicyInput"]["properties"]) == {"agent", "envelope", "context"}
    assert set(defs["PolicyResult"]["properties"]) == {
        "allow",
        "deny",
        "warn",
        "annotations",
        "reasons",
    }
    assert defs["PolicyResult"]["required"] == ["allow"]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_example_input_conforms_to_the_contract(example):
    PolicyInput.model_validate_json((example / "input.json").read_text())


def test_examples_cover_allow_refuse_and_warn():
    expected = [json.loads((e / "expected.json").read_text()) for e in EXAMPLES]
    assert any(x["allow"] and not x["warn"] for x in expected)
    assert any(not x["allow"] for x in expected)
    assert any(x["allow"] and x["warn"] for x in expected)


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"memory_schema_hash": "md5:abc"}, "memory_schema_hash"),
        ({"version": 0}, "version"),
        ({"capabilities": "read:warehouse"}, "capabilities"),
        ({"surprise": True}, "surprise"),
        ({"trust": {"score": 1.5}}, "trust.score"),
    ],
)
def test_malformed_agent_objects_are_rejected_with_the_field(patch, field):
    agent = json.loads((POLICIES / "examples" / "allowed" / "input.json").read_text())["agent"]
    agent.update(patch)
    with pytest.raises(ValidationError) as caught:
        AgentObject.model_validate(agent)
    assert field in {".".join(str(p) for p in e["loc"]) for e in caught.value.errors()}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_example_validates_against_the_published_schema(example):
    for name, kind in (("input.json", "input"), ("expected.json", "result")):
        document = json.loads((example / name).read_text())
        assert schema.guess_kind(document) == kind
        assert schema.validate_document(document, kind) == []


def test_validation_names_each_problem_with_its_path():
    document = json.loads((EXAMPLES[0] / "input.json").read_text())
    document["agent"]["trust"]["score"] = 3
    document["envelope"]["issued_at"] = "yesterday"
    del document["context"]
    assert schema.validate_document(document, "input") == [
        "(document): 'context' is a required property",
        "agent/trust/score: 3 is greater than the maximum of 1.0",
        "envelope/issued_at: 'yesterday' is not a 'date-time'",
    ]
    assert schema.validate_document({"allow": "yes", "deny": [1]}, "result") == [
        "allow: 'yes' is not of type 'boolean'",
        "deny/0: 1 is not of type 'string'",
    ]


def test_policy_validate_command_exit_codes(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"allow": true, "warn": "not a list"}')
    cli = [sys.executable, "-m", "prefect_governance.cli", "policy", "validate"]
    good = subprocess.run([*cli, str(EXAMPLES[0] / "input.json")], capture_output=True, text=True)
    assert good.returncode == 0 and "valid policy input" in good.stdout
    wrong = subprocess.run([*cli, str(bad)], capture_output=True, text=True)
    assert wrong.returncode == 1
    assert f"{bad}: warn: 'not a list' is not of type 'array'" in wrong.stdout
