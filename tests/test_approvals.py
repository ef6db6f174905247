"""Signed approvals, the pure parts: hashing, naming, signing and every way to reject one."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from prefect_governance.core.approvals import (
    APPROVAL_TYPE,
    CLOCK_SKEW,
    VARIABLE_PREFIX,
    ApprovalRejected,
    DeploymentBinding,
    FlowRunBinding,
    check_approval,
    check_approvals,
    lookup_prefixes,
    new_statement,
    parameters_sha256,
    parse_duration,
    run_parameters,
    sign_statement,
    variable_name,
)
from prefect_governance.core.decision import worker_refusal
from prefect_governance.core.models import ApprovalConstraint, Constraints
from prefect_governance.core.settings import GovernanceSettings
from prefect_governance.core.signing import sign
from prefect_governance.worker.blocks import GovernanceAgent
from prefect_governance.worker.report import decision_markdown, refusal_message
from tests.approvers import ALICE, BOB, MALLORY, MALLORY_AS_ALICE, PINNED

RUN = "6f1c2d2e-0000-4000-8000-0000000000a1"
OTHER_RUN = "6f1c2d2e-0000-4000-8000-0000000000a2"
DEPLOYMENT = "6f1c2d2e-0000-4000-8000-0000000000b1"
PARAMETERS = {"rows": 5, "table": "orders", "nested": {"b": [1, 2], "a": None}}
HASH = parameters_sha256(PARAMETERS)
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


def statement(binding=None, *, approver="alice", issued=NOW, ttl=timedelta(hours=1), **kw):
    binding = binding or FlowRunBinding(flow_run_id=RUN, parameters_sha256=HASH)
    return new_statement(approver=approver, binding=binding, now=issued, ttl=ttl, **kw)


def check(document, *, now=NOW, flow_run_id=RUN, deployment_id=DEPLOYMENT, parameters_hash=HASH):
    return check_approval(
        document,
        keys=PINNED,
        flow_run_id=flow_run_id,
        deployment_id=deployment_id,
        parameters_hash=parameters_hash,
        now=now,
    )


# --- hashing and naming ---------------------------------------------------------------


def test_the_parameters_hash_is_canonical_json():
    reordered = {"nested": {"a": None, "b": [1, 2]}, "table": "orders", "rows": 5}
    assert parameters_sha256(reordered) == HASH
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", HASH)
    assert parameters_sha256({**PARAMETERS, "rows": 6}) != HASH
    assert parameters_sha256({**PARAMETERS, "rows": 5.0}) != HASH, "5 and 5.0 are other JSON"
    assert parameters_sha256({}) != parameters_sha256({"rows": None})


def test_a_deployments_defaults_fill_in_the_parameters_given():
    assert run_parameters({"rows": 1, "table": "orders"}, {"rows": 5}) == {
        "rows": 5,
        "table": "orders",
    }


@pytest.mark.parametrize("kind", ["flow_run", "deployment"])
def test_variable_names_are_valid_prefect_variable_names_under_their_lookup_prefix(kind):
    binding = (
        FlowRunBinding(flow_run_id=RUN, parameters_sha256=HASH)
        if kind == "flow_run"
        else DeploymentBinding(deployment_id=DEPLOYMENT, parameters_sha256=HASH)
    )
    name = variable_name(statement(binding))
    # Prefect 3.8: lowercase letters, digits, dashes or underscores; at most 255 characters.
    assert re.fullmatch(r"[a-z0-9_-]+", name) and len(name) <= 255, name
    prefixes = lookup_prefixes(flow_run_id=RUN, deployment_id=DEPLOYMENT, parameters_hash=HASH)
    assert [p for p in prefixes if name.startswith(p)], (name, prefixes)
    assert all(p.startswith(VARIABLE_PREFIX) for p in prefixes)


def test_a_run_without_a_deployment_is_looked_up_by_its_id_only():
    assert lookup_prefixes(flow_run_id=RUN, deployment_id=None, parameters_hash=HASH) == [
        f"{VARIABLE_PREFIX}run-{RUN}-"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("30m", timedelta(minutes=30)),
        ("1h", timedelta(hours=1)),
        ("2d", timedelta(days=2)),
    ],
)
def test_durations(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "1", "0h", "-1h", "1w", "h", "1.5h"])
def test_bad_durations_are_refused(text):
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(text)


def test_only_the_approvers_own_key_signs_its_approval():
    with pytest.raises(ValueError, match="not the approver"):
        sign_statement(statement(approver="alice"), BOB)


# --- verification ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flow_run", "deployment"])
def test_a_valid_approval_verifies(kind):
    binding = (
        FlowRunBinding(flow_run_id=RUN, parameters_sha256=HASH)
        if kind == "flow_run"
        else DeploymentBinding(deployment_id=DEPLOYMENT, parameters_sha256=HASH)
    )
    made = statement(binding, reason="change 42")
    approval = check(sign_statement(made, ALICE))
    assert approval.model_dump() == {
        "id": made.id,
        "approver": "alice",
        "binding": kind,
        "issued_at": NOW,
        "expires_at": NOW + timedelta(hours=1),
        "decision": "approve",
    }
    # An approval's signed payload reads as before rejections existed: no decision field.
    assert "decision" not in sign_statement(made, ALICE)["payload"]


def test_a_signed_rejection_verifies_as_a_rejection_and_its_decision_is_signed():
    binding = FlowRunBinding(flow_run_id=RUN, parameters_sha256=HASH)
    made = statement(binding, decision="reject")
    document = sign_statement(made, ALICE)
    assert document["payload"]["decision"] == "reject"
    assert check(document).decision == "reject"
    # Turning a rejection into an approval (dropping or editing the field) breaks the signature.
    for edit in ({"decision": "approve"}, {}):
        forged = json.loads(json.dumps(document))
        del forged["payload"]["decision"]
        forged["payload"].update(edit)
        with pytest.raises(ApprovalRejected, match="does not verify"):
            check(forged)


def _altered(document, **binding):
    edited = json.loads(json.dumps(document))
    edited["payload"]["binding"].update(binding)
    return edited


REJECTIONS = {
    "signed by an unpinned key": (
        lambda: sign_statement(statement(approver="mallory"), MALLORY),
        "unknown key 'mallory'",
    ),
    "the requester's key claiming to be alice": (
        lambda: sign_statement(statement(), MALLORY_AS_ALICE),
        "does not verify with key 'alice'",
    ),
    "alice's key, bob's name": (
        lambda: sign(statement(approver="bob").model_dump(mode="json"), ALICE),
        "signed with the key of 'alice' but names 'bob'",
    ),
    "binding edited after signing": (
        lambda: _altered(
            sign_statement(
                statement(FlowRunBinding(flow_run_id=OTHER_RUN, parameters_sha256=HASH)), ALICE
            ),
            flow_run_id=RUN,
        ),
        "does not verify with key 'alice'",
    ),
    "parameters hash edited after signing": (
        lambda: _altered(
            sign_statement(
                statement(FlowRunBinding(flow_run_id=RUN, parameters_sha256=parameters_sha256({}))),
                ALICE,
            ),
            parameters_sha256=HASH,
        ),
        "does not verify with key 'alice'",
    ),
    "another flow run": (
        lambda: sign_statement(
            statement(FlowRunBinding(flow_run_id=OTHER_RUN, parameters_sha256=HASH)), ALICE
        ),
        f"bound to another flow run ({OTHER_RUN})",
    ),
    "another deployment": (
        lambda: sign_statement(
            statement(DeploymentBinding(deployment_id=OTHER_RUN, parameters_sha256=HASH)), ALICE
        ),
        f"bound to another deployment ({OTHER_RUN})",
    ),
    "this run, other parameters": (
        lambda: sign_statement(
            statement(
                FlowRunBinding(flow_run_id=RUN, parameters_sha256=parameters_sha256({"rows": 6}))
            ),
            ALICE,
        ),
        "bound to other parameters",
    ),
    "this deployment, other parameters": (
        lambda: sign_statement(
            statement(
                DeploymentBinding(
                    deployment_id=DEPLOYMENT, parameters_sha256=parameters_sha256({"rows": 6})
                )
            ),
            ALICE,
        ),
        "bound to other parameters",
    ),
    "expired": (
        lambda: sign_statement(statement(issued=NOW - timedelta(hours=2)), ALICE),
        "expired at 2026-12-01T11:00:00+00:00",
    ),
    "expires exactly now": (
        lambda: sign_statement(statement(issued=NOW - timedelta(hours=1)), ALICE),
        "expired",
    ),
    "issued in the future": (
        lambda: sign_statement(statement(issued=NOW + CLOCK_SKEW + timedelta(seconds=1)), ALICE),
        "not valid before",
    ),
    "another kind of signed document": (
        lambda: sign({**statement().model_dump(mode="json"), "type": "grant"}, ALICE),
        "not an approval statement (type:",
    ),
    "an extra field": (
        lambda: sign({**statement().model_dump(mode="json"), "scope": "all runs"}, ALICE),
        "not an approval statement (scope:",
    ),
    "not signed at all": (
        lambda: statement().model_dump(mode="json"),
        "not a signed document",
    ),
    "not a document": (lambda: "alice approved", "not a signed document"),
}


@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_an_approval_that_does_not_hold_is_rejected_with_why(case):
    make, why = REJECTIONS[case]
    with pytest.raises(ApprovalRejected) as caught:
        check(make())
    assert why in str(caught.value)


def test_a_deployment_approval_does_not_approve_a_run_without_a_deployment():
    document = sign_statement(
        statement(DeploymentBinding(deployment_id=DEPLOYMENT, parameters_sha256=HASH)), ALICE
    )
    with pytest.raises(ApprovalRejected, match="another deployment"):
        check(document, deployment_id=None)


def test_a_clock_a_little_behind_the_approvers_is_tolerated():
    document = sign_statement(statement(issued=NOW + CLOCK_SKEW), ALICE)
    assert check(document).approver == "alice"


def test_check_approvals_keeps_the_verified_once_and_says_why_for_the_others():
    good = sign_statement(statement(), ALICE)
    by_bob = sign_statement(statement(approver="bob"), BOB)
    forged = sign_statement(statement(), MALLORY_AS_ALICE)
    documents = {"v-good": good, "v-copy": good, "v-bob": by_bob, "v-forged": forged}
    verified, rejected = check_approvals(
        documents,
        keys=PINNED,
        flow_run_id=RUN,
        deployment_id=DEPLOYMENT,
        parameters_hash=HASH,
        now=NOW,
    )
    assert [(a.approver, a.id) for a in verified] == [
        ("alice", good["payload"]["id"]),
        ("bob", by_bob["payload"]["id"]),
    ]
    assert rejected == ["v-forged: the signature does not verify with key 'alice'"]


def test_a_document_that_breaks_the_verifier_rejects_only_itself():
    deep: list = []
    for _ in range(5000):  # deeper than the JSON encoder's recursion allows
        deep = [deep]
    hostile = {**sign_statement(statement(), ALICE), "payload": {"nested": deep}}
    good = sign_statement(statement(), ALICE)
    verified, rejected = check_approvals(
        {"v-hostile": hostile, "v-good": good},
        keys=PINNED,
        flow_run_id=RUN,
        deployment_id=DEPLOYMENT,
        parameters_hash=HASH,
        now=NOW,
    )
    assert [a.id for a in verified] == [good["payload"]["id"]]
    assert rejected == ["v-hostile: unreadable (RecursionError)"]


def test_no_pinned_keys_no_approvals():
    verified, rejected = check_approvals(
        {"v": sign_statement(statement(), ALICE)},
        keys={},
        flow_run_id=RUN,
        deployment_id=DEPLOYMENT,
        parameters_hash=HASH,
        now=NOW,
    )
    assert verified == [] and rejected == ["v: signed with an unknown key 'alice'"]


def test_the_statement_type_is_signed():
    assert sign_statement(statement(), ALICE)["payload"]["type"] == APPROVAL_TYPE


# --- the agent's constraint and the worker's settings ---------------------------------


@pytest.mark.parametrize("legacy", [{"label": "governance.approved_by"}, {"parameter": "by"}])
def test_an_agent_that_still_names_a_label_or_parameter_is_invalid(legacy):
    """An older agent document (label/parameter approvals) must not approve: it is invalid,
    so the worker refuses its runs saying so, until it is saved without them."""
    with pytest.raises(ValidationError) as caught:
        ApprovalConstraint.model_validate({"approvers": ["alice"], **legacy})
    assert "a label or a parameter approves nothing" in str(caught.value)
    with pytest.raises(ValidationError, match="a label or a parameter approves nothing"):
        GovernanceAgent.model_validate(
            {
                "id": "old-agent",
                "owner": "sec@example.com",
                "trust_scope": ["gov"],
                "constraints": {"approval": {"approvers": ["alice"], "parameter": None, **legacy}},
            }
        )
    assert Constraints.model_validate({"approval": {"approvers": ["alice"]}}).approval


def test_the_worker_reads_pinned_approver_keys_from_the_environment(monkeypatch):
    monkeypatch.setenv("PREFECT_GOVERNANCE_APPROVER_KEYS", json.dumps(PINNED))
    assert GovernanceSettings().approver_keys == PINNED
    monkeypatch.delenv("PREFECT_GOVERNANCE_APPROVER_KEYS")
    assert GovernanceSettings().approver_keys == {}


def test_a_refusal_says_which_approvals_were_not_accepted():
    decision = worker_refusal(
        'run of agent "a" needs a signed approval by one of ["alice"] (no verified approval)',
        policy_path="prefect/governance/decision",
        mode="enforce",
        fail_mode="closed",
    )
    decision.rejected_approvals = ["governance-approval-x: expired at 2026-12-01T11:00:00+00:00"]
    message = refusal_message(decision)
    assert message.endswith(
        "; approvals not accepted: governance-approval-x: expired at 2026-12-01T11:00:00+00:00"
    )
    assert "## Approvals not accepted" in decision_markdown(decision, "a")


# --- where approvals are stored: Prefect variables on a real server -------------------


@pytest.mark.e2e
def test_an_approval_fits_prefect_variables_and_is_read_back_by_its_run(prefect_server):
    """Prefect 3.8's limits, measured on the real server: a variable name is at most 255
    characters of [a-z0-9_-], a value at most 5000 characters of JSON. The longest
    approval (deployment binding, longest reason) fits both; the worker's lookup finds
    the run's approvals and nothing else."""
    import asyncio
    import uuid

    import httpx
    from prefect import get_client

    from prefect_governance.core.approvals import (
        MAX_REASON_LENGTH,
        approvals_for_run,
        store_approval,
    )

    run_id, deployment_id = str(uuid.uuid4()), str(uuid.uuid4())
    longest = sign_statement(
        statement(
            DeploymentBinding(deployment_id=deployment_id, parameters_sha256=HASH),
            issued=datetime.now(timezone.utc),
            reason="r" * MAX_REASON_LENGTH,
        ),
        ALICE,
    )
    other_run = sign_statement(
        statement(
            FlowRunBinding(flow_run_id=str(uuid.uuid4()), parameters_sha256=HASH),
            issued=datetime.now(timezone.utc),
        ),
        ALICE,
    )
    api = prefect_server.api_url

    def create(name: str, value) -> int:
        return httpx.post(f"{api}/variables/", json={"name": name, "value": value}).status_code

    async def roundtrip():
        async with get_client() as client:
            name = await store_approval(client, longest)
            await store_approval(client, other_run)
            found = await approvals_for_run(
                client,
                flow_run_id=run_id,
                deployment_id=deployment_id,
                parameters=PARAMETERS,
                keys=PINNED,
                now=datetime.now(timezone.utc),
            )
        return name, found

    name, (verified, rejected) = asyncio.run(roundtrip())
    assert len(json.dumps(longest)) < 5000 and len(name) < 255
    assert [a.id for a in verified] == [longest["payload"]["id"]] and rejected == []
    assert create("a" * 255, 1) == 201
    assert create("b" * 256, 1) == 422
    assert create("upper-Case", 1) == 422
    assert create("v-4999", "x" * 4997) == 201  # 4999 characters as JSON
    assert create("v-5001", "x" * 4999) == 422


@pytest.mark.parametrize(
    ("args", "why"),
    [
        ([], "give either --flow-run or --deployment"),
        (["--flow-run", RUN, "--deployment", "f/d"], "give either --flow-run or --deployment"),
        (["--flow-run", RUN, "--parameters", "{}"], "--parameters goes with --deployment"),
        (["--deployment", "f/d", "--parameters", "[1]"], "a JSON object"),
        (["--deployment", "f/d", "--parameters", "{"], "not JSON"),
        (["--flow-run", RUN, "--expires", "forever"], "expected a duration"),
    ],
)
def test_the_approve_command_refuses_what_it_cannot_sign(tmp_path, args, why):
    from typer.testing import CliRunner

    from prefect_governance.cli.main import app

    key = tmp_path / "alice.key"
    key.write_text(ALICE.seed_b64)
    result = CliRunner().invoke(app, ["approve", "--key", str(key), "--approver", "alice", *args])
    assert result.exit_code == 2 and why in result.output, result.output


def test_the_approve_command_needs_a_seed_file(tmp_path):
    from typer.testing import CliRunner

    from prefect_governance.cli.main import app

    key = tmp_path / "alice.key"
    key.write_text("c2hvcnQ")  # 5 bytes
    args = ["approve", "--key", str(key), "--approver", "alice", "--flow-run", RUN]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "32 bytes" in result.output, result.output
    missing = CliRunner().invoke(app, [*args[:2], str(tmp_path / "none"), *args[3:]])
    assert missing.exit_code == 2 and "No such file" in missing.output, missing.output


@pytest.mark.parametrize("needed", [True, False])
def test_a_worker_that_pins_no_approver_keys_reads_no_approvals_and_says_so(needed):
    import asyncio

    from prefect_governance.worker.governor import NO_APPROVER_KEYS, Governor

    governor = Governor(GovernanceSettings(approver_keys={}))
    found = asyncio.run(governor._approvals(None, None, NOW, needed=needed))  # no I/O at all
    assert found == ([], [NO_APPROVER_KEYS] if needed else [])
