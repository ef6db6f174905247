"""The policy contract: the published schema matches the models, and bad documents are rejected."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from prefect_governance.cli import schema
from prefect_governance.core.models import AgentObject, PolicyInput, TaskPolicyInput
from tests.conftest import POLICIES, ROOT

EXAMPLES = sorted(p for p in (POLICIES / "examples").iterdir() if p.is_dir())
TASK_EXAMPLES = sorted(p for p in (POLICIES / "task_examples").iterdir() if p.is_dir())


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
    assert set(defs["PolicyInput"]["properties"]) == {"agent", "envelope", "context", "exceptions"}
    assert defs["PolicyInput"]["required"] == ["agent", "envelope", "context"]
    assert set(defs["PolicyResult"]["properties"]) == {
        "allow",
        "deny",
        "warn",
        "annotations",
        "reasons",
        "grants",
        "approval",
        "waived",
    }
    request = defs["ApprovalRequest"]["properties"]
    assert set(request) == {"approvers", "timeout_seconds", "reason", "rule"}
    assert defs["PolicyResult"]["required"] == ["allow"]
    assert set(defs["Constraints"]["properties"]) >= {"tasks", "capability_trust"}


def test_schema_describes_what_the_run_would_start():
    defs = json.loads((POLICIES / schema.SCHEMA_FILE).read_text())["$defs"]
    envelope = defs["MutationEnvelope"]["properties"]["infrastructure"]
    assert {"$ref": "#/$defs/Infrastructure"} in envelope["anyOf"] and envelope["default"] is None
    assert defs["Infrastructure"]["required"] == ["kind"]
    assert defs["Infrastructure"]["properties"]["kind"]["enum"] == [
        "process",
        "docker",
        "kubernetes",
    ]
    assert set(defs["Infrastructure"]["properties"]) >= {
        "containers",
        "mounts",
        "host_paths",
        "network_mode",
        "host_network",
        "host_pid",
        "host_ipc",
        "namespace",
        "service_account",
        "env_names",
        "unrecognized",
    }
    assert set(defs["Container"]["properties"]) >= {
        "image",
        "privileged",
        "allow_privilege_escalation",
        "capabilities_added",
        "run_as_user",
        "run_as_non_root",
    }
    assert set(defs["Image"]["properties"]) == {
        "reference",
        "registry",
        "repository",
        "tag",
        "digest",
    }
    constraint = defs["Constraints"]["properties"]["infrastructure"]
    assert {"$ref": "#/$defs/InfrastructureConstraint"} in constraint["anyOf"]
    assert defs["InfrastructureConstraint"]["properties"]["allow_privileged"]["default"] is False
    assert defs["InfrastructureConstraint"]["properties"]["registries"]["default"] is None


def test_an_infrastructure_example_per_rule_allowed_and_refused():
    expected = {e.name: json.loads((e / "expected.json").read_text()) for e in EXAMPLES}
    assert expected["allowed-docker-infrastructure"]["allow"]
    assert expected["allowed-kubernetes-infrastructure"]["allow"]
    denied = [
        reason["message"]
        for x in expected.values()
        for reason in x["reasons"]
        if reason["rule"] == "prefect.governance.rules.infrastructure.deny"
    ]
    for refusal in (
        "is privileged",
        "allows privilege escalation",
        "adds capability",
        "host path",
        "the host's PID namespace",
        "is not from a registry",
        "is not pinned by digest",
        "may run as root",
        "is outside the namespaces",
        "is outside the service accounts",
        "is not one the worker recognises",
    ):
        assert any(refusal in message for message in denied), refusal


def test_schema_describes_the_task_policy_input_and_result():
    contract = json.loads((POLICIES / schema.SCHEMA_FILE).read_text())
    defs = contract["$defs"]
    assert contract["properties"]["task_input"] == {"$ref": "#/$defs/TaskPolicyInput"}
    assert contract["properties"]["task_result"] == {"$ref": "#/$defs/PolicyResult"}
    assert set(defs["TaskPolicyInput"]["properties"]) == {
        "agent",
        "envelope",
        "context",
        "posture",
    }
    assert set(defs["TaskEnvelope"]["properties"]) == {
        "id",
        "issued_at",
        "task",
        "parameters",
        "redacted",
        "capabilities",
        "memory",
        "parent",
    }
    assert set(defs["TaskMemory"]["properties"]) == {"writes", "schema_hash", "proposed"}
    assert defs["TaskContext"]["properties"]["purpose"]["enum"] == ["admit", "commit"]
    assert set(defs["TaskPosture"]["properties"]) == {
        "score",
        "slope",
        "window",
        "k",
        "tasks",
        "memory_version",
        "memory_hash",
        "schema_hash",
    }
    assert defs["ParentRun"]["properties"]["envelope"] == {"$ref": "#/$defs/MutationEnvelope"}
    assert set(defs["ParentRun"]["required"]) >= {"envelope", "grants", "signature"}


def test_the_schema_file_is_the_only_data_file_of_its_directory():
    """OPA merges the JSON files of a directory into one document: a second schema there
    would collide with the contract's keys."""
    assert [p.name for p in (POLICIES / "schema").iterdir()] == [schema.SCHEMA_FILE.name]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_example_input_conforms_to_the_contract(example):
    PolicyInput.model_validate_json((example / "input.json").read_text())


@pytest.mark.parametrize("example", TASK_EXAMPLES, ids=lambda p: p.name)
def test_every_task_example_input_conforms_to_the_contract(example):
    TaskPolicyInput.model_validate_json((example / "input.json").read_text())


def test_examples_cover_allow_refuse_and_warn():
    expected = [json.loads((e / "expected.json").read_text()) for e in EXAMPLES]
    assert any(x["allow"] and not x["warn"] for x in expected)
    assert any(not x["allow"] for x in expected)
    assert any(x["allow"] and x["warn"] for x in expected)
    inputs = [json.loads((e / "input.json").read_text()) for e in EXAMPLES]
    assert any(
        x["allow"] and sorted(x["grants"]) != sorted(i["envelope"]["capabilities"])
        for x, i in zip(expected, inputs, strict=True)
    ), "an example narrows the grants"


def test_task_examples_cover_allow_and_refuse():
    expected = [json.loads((e / "expected.json").read_text()) for e in TASK_EXAMPLES]
    assert any(x["allow"] for x in expected)
    assert any(not x["allow"] for x in expected)


def test_a_task_example_per_task_rule_and_both_purposes_allowed():
    """Every task rule module refuses in some task example (each alone), and both purposes
    (admit, commit) have an allowed example, each with the posture its task inherits."""
    modules = {
        p.stem
        for p in (POLICIES / "prefect" / "governance" / "task_rules").glob("*.rego")
        if not p.stem.endswith("_test")
    }
    refused_by: set[str] = set()
    allowed_purposes: set[str] = set()
    for example in TASK_EXAMPLES:
        policy_input = json.loads((example / "input.json").read_text())
        expected = json.loads((example / "expected.json").read_text())
        assert isinstance(policy_input["posture"], dict), example.name
        rules = {reason["rule"] for reason in expected["reasons"]}
        if len(rules) == 1:
            refused_by |= rules
        if expected["allow"]:
            allowed_purposes.add(policy_input["context"]["purpose"])
    assert refused_by == {f"prefect.governance.task_rules.{m}.deny" for m in modules}
    assert allowed_purposes == {"admit", "commit"}


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


@pytest.mark.parametrize("example", TASK_EXAMPLES, ids=lambda p: p.name)
def test_every_task_example_validates_against_the_published_schema(example):
    for name, kind in (("input.json", "task_input"), ("expected.json", "result")):
        document = json.loads((example / name).read_text())
        assert schema.guess_kind(document) == kind
        assert schema.validate_document(document, kind) == []
    expected = json.loads((example / "expected.json").read_text())
    assert schema.validate_document(expected, "task_result") == []


def test_a_flow_input_is_not_a_task_input_nor_the_reverse():
    flow = json.loads((POLICIES / "examples" / "allowed" / "input.json").read_text())
    task = json.loads((TASK_EXAMPLES[0] / "input.json").read_text())
    assert "envelope: 'parent' is a required property" in schema.validate_document(
        flow, "task_input"
    )
    assert schema.validate_document(task, "input") != []


def test_task_input_validation_names_each_problem_with_its_path():
    document = json.loads((POLICIES / "task_examples" / "allowed" / "input.json").read_text())
    document["envelope"]["task"]["attempt"] = 0
    document["envelope"]["capabilities"] = "read:warehouse"
    del document["envelope"]["parent"]["grants"]
    document["agent"]["constraints"]["capability_trust"] = {"write:warehouse": "high"}
    document["agent"]["constraints"]["tasks"] = {"deny": "drop_tables"}
    assert schema.validate_document(document, "task_input") == [
        "agent/constraints/capability_trust/write:warehouse: 'high' is not of type 'number'",
        "agent/constraints/tasks: {'deny': 'drop_tables'} is not valid under any of the given "
        "schemas",
        "envelope/capabilities: 'read:warehouse' is not of type 'array'",
        "envelope/parent: 'grants' is a required property",
        "envelope/task/attempt: 0 is less than the minimum of 1",
    ]
    with pytest.raises(ValidationError):
        TaskPolicyInput.model_validate(document)


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
    assert schema.validate_document({"allow": True, "grants": "read:warehouse"}, "result") == [
        "grants: 'read:warehouse' is not valid under any of the given schemas",
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
    task = TASK_EXAMPLES[0] / "input.json"
    task_run = subprocess.run([*cli, str(task)], capture_output=True, text=True)
    assert task_run.returncode == 0 and "valid policy task_input" in task_run.stdout
