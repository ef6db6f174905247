"""Authenticated reports from inside a run: the pure parts (issue 15, 3).

The secret's derivation, the MAC the run's side puts on each artifact, what the
worker accepts, and the check of each reported capability use against the signed
grant and the task's declarations. The attacks against a real server and worker
are in tests/attacks/test_reports.py.
"""

from __future__ import annotations

from prefect_governance.core.handoff import PROPOSAL_KEY, RUN_EVENTS_KEY
from prefect_governance.core.reports import (
    accepted,
    admitted_declarations,
    check_seal,
    complete_proposals,
    report_secret,
    seal,
    use_check,
)
from prefect_governance.core.settings import GovernanceSettings
from prefect_governance.lineage.events import capability_use_event
from prefect_governance.runtime.run_log import events_report, sealed
from prefect_governance.worker.governor import NO_REPORT_SECRET, Governor
from prefect_governance.worker.run_reports import reported_events

ROOT = b"r" * 32
RUN, DECISION = "run-1", "decision-1"


def _secret(decision_id: str = DECISION, root: bytes = ROOT) -> str:
    return report_secret(root, decision_id)


def test_the_secret_is_derived_from_the_root_and_the_decision_only():
    assert _secret() == _secret(), "a restarted worker derives the same secret"
    assert _secret("decision-2") != _secret()
    assert _secret(root=b"s" * 32) != _secret()
    assert len(_secret()) == 43  # 32 bytes, base64url without padding


def test_a_sealed_report_verifies_only_for_its_run_decision_and_kind():
    body = {"decision_id": DECISION, "seq": [1, 2], "events": [{"seq": 1}, {"seq": 2}]}
    data = seal(_secret(), flow_run_id=RUN, kind=RUN_EVENTS_KEY, body=body)
    ok = {"flow_run_id": RUN, "decision_id": DECISION, "kind": RUN_EVENTS_KEY}
    assert check_seal(_secret(), data, **ok) is None
    assert "does not verify" in check_seal(_secret(), data, **{**ok, "flow_run_id": "run-2"})
    assert "does not verify" in check_seal(_secret(), data, **{**ok, "kind": PROPOSAL_KEY})
    assert "does not verify" in check_seal(_secret("decision-2"), data, **ok)
    altered = {**data, "events": [{"seq": 1, "capability": "delete:warehouse"}]}
    assert "does not verify" in check_seal(_secret(), altered, **ok)
    assert "no MAC" in check_seal(_secret(), body, **ok)
    assert "another decision" in check_seal(_secret(), data, **{**ok, "decision_id": "d-9"})


def test_the_runs_side_seals_what_it_sends_and_says_when_it_cannot():
    events = [{"seq": 3, "kind": "capability_use"}, {"seq": 4, "kind": "capability_use"}]
    data = events_report(_secret(), RUN, DECISION, events)
    assert data["seq"] == [3, 4] and data["decision_id"] == DECISION and "mac" in data
    assert (
        check_seal(_secret(), data, flow_run_id=RUN, decision_id=DECISION, kind=RUN_EVENTS_KEY)
        is None
    )
    unsealed = sealed(None, RUN, DECISION, PROPOSAL_KEY, {"seq": 1, "patch": {}})
    assert "mac" not in unsealed


def _proposal(seq: int, patch: dict, secret: str | None = None) -> dict:
    return sealed(secret or _secret(), RUN, DECISION, PROPOSAL_KEY, {"seq": seq, "patch": patch})


def test_the_worker_accepts_only_what_verifies_each_once_and_names_the_rest():
    good = _proposal(1, {"a": 1})
    other_run = sealed(_secret("decision-2"), RUN, DECISION, PROPOSAL_KEY, {"seq": 2, "patch": {}})
    artifacts = [
        ("art-1", good),
        ("art-2", {"decision_id": DECISION, "seq": 2, "patch": {"a": 999}}),  # no MAC
        ("art-3", other_run),  # a MAC with another run's secret
        ("art-4", dict(good)),  # a copy replayed
        ("art-5", {**_proposal(2, {"b": 2}), "patch": {"b": 3}}),  # altered after sealing
        ("art-6", "not json"),
    ]
    reports, problems = accepted(
        artifacts, secret=_secret(), flow_run_id=RUN, decision_id=DECISION, kind=PROPOSAL_KEY
    )
    assert reports == [{k: v for k, v in good.items() if k != "mac"}]
    text = "\n".join(problems)
    for artifact in ("art-2", "art-3", "art-4", "art-5", "art-6"):
        assert f"artifact {artifact}" in text, (artifact, problems)
    assert "no MAC" in problems[0] and "does not verify" in problems[1]
    assert "repeats seq 1 of artifact art-1" in problems[2]


def test_without_a_secret_every_report_is_rejected_saying_why():
    reports, problems = accepted(
        [("art-1", _proposal(1, {}))],
        secret=None,
        flow_run_id=RUN,
        decision_id=DECISION,
        kind=PROPOSAL_KEY,
        cannot=NO_REPORT_SECRET,
    )
    assert reports == [] and NO_REPORT_SECRET in problems[0]


def test_the_governor_derives_secrets_from_the_lineage_key_or_only_for_its_own_runs():
    keyed = GovernanceSettings(lineage_key="bGluZWFnZS1rZXktc2VlZC0wMDAwMDAwMDAwMDAwMDA")
    first, restarted = Governor(keyed), Governor(keyed)
    assert first.report_secret("d") == restarted._secret_to_check("d")[0]
    bare = Governor(GovernanceSettings(lineage_key=None))  # the tests pin a key: none here
    other_process = Governor(GovernanceSettings(lineage_key=None))
    issued = bare.report_secret("d")
    assert bare._secret_to_check("d") == (issued, None)
    assert other_process._secret_to_check("d") == (None, NO_REPORT_SECRET)


def test_proposals_are_used_in_order_and_none_when_one_is_missing():
    ordered, problems = complete_proposals([{"seq": 2}, {"seq": 1}])
    assert [p["seq"] for p in ordered] == [1, 2] and problems == []
    ordered, problems = complete_proposals([{"seq": 1}, {"seq": 3}])
    assert ordered == [] and "seq [2]" in problems[0]
    ordered, problems = complete_proposals([{"seq": 1}, {"seq": [2, 3]}])
    assert ordered == [] and "not numbered one by one" in problems[0]


def test_rejections_reach_the_one_report_problem_list():
    events, problems = reported_events(
        [
            {"decision_id": "d", "events": [{"seq": 1, "kind": "capability_use"}]},
            {"rejected": ["rejected x artifact a: no MAC"]},
        ],
        "d",
    )
    assert [e.seq for e in events] == [1] and problems == ["rejected x artifact a: no MAC"]


def _task_decision(run_id: str, declared: list[str], verdict: str = "allowed") -> dict:
    return {
        "kind": "task_decision",
        "envelope": {"task": {"name": "load", "run_id": run_id}, "capabilities": declared},
        "decision": {"verdict": verdict},
    }


def _use(capability: str, run_id: str | None = "t1", granted: bool = True) -> dict:
    task = {"name": "load", "run_id": run_id} if run_id else None
    return {"kind": "capability_use", "capability": capability, "granted": granted, "task": task}


def test_a_use_must_be_in_the_signed_grant_and_the_tasks_checked_declaration():
    grants = ["read:warehouse", "write:warehouse"]
    admitted = dict(
        [
            admitted_declarations(_task_decision("t1", ["read:warehouse"]), {"verified": True}),
            admitted_declarations(
                _task_decision("t2", ["write:warehouse"]),
                {"verified": False, "why": "the worker's engine decides this input otherwise"},
            ),
            admitted_declarations(_task_decision("t3", ["read:warehouse"], "refused"), None),
        ]
    )

    def check(use):
        return use_check(use, grants=grants, admitted=admitted)

    assert check(_use("read:warehouse")) == {"verified": True}
    assert check(_use("read:warehouse", run_id=None)) == {"verified": True}  # the flow body
    assert check(_use("delete:warehouse", granted=False)) is None  # blocked: nothing used
    never = check(_use("delete:warehouse", run_id=None))
    assert never["verified"] is False and "not among the run's signed grants" in never["why"]
    undeclared = check(_use("write:warehouse"))
    assert undeclared["verified"] is False and "did not declare" in undeclared["why"]
    assert "does not hold" in check(_use("write:warehouse", run_id="t2"))["why"]
    assert "no admitted decision" in check(_use("read:warehouse", run_id="t3"))["why"]
    assert "no admitted decision" in check(_use("read:warehouse", run_id="t9"))["why"]
    unknown = use_check(_use("read:warehouse", run_id=None), grants=None, admitted={})
    assert unknown["verified"] is None


def test_a_flagged_use_is_never_recorded_as_used():
    use = {**_use("delete:warehouse", run_id=None), "seq": 4}
    flagged = capability_use_event(
        use,
        agent_id="a",
        flow_run_id=RUN,
        parent_decision_id=DECISION,
        check={"verified": False, "why": "not granted"},
    )
    assert (flagged.verdict, flagged.allow, flagged.reasons) == ("flagged", False, ["not granted"])
    assert flagged.payload["check"]["verified"] is False
    used = capability_use_event(
        use, agent_id="a", flow_run_id=RUN, parent_decision_id=DECISION, check={"verified": True}
    )
    assert used.verdict == "used" and used.allow


def test_the_runs_side_holds_no_credentials_or_storage():
    import ast
    from pathlib import Path

    import prefect_governance.core.reports as reports

    imported = set()
    for node in ast.walk(ast.parse(Path(reports.__file__).read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert imported <= {
        "__future__",
        "base64",
        "hashlib",
        "hmac",
        "typing",
        "prefect_governance.core.canonical",
        "prefect_governance.core.handoff",  # constants
        "prefect_governance.core.models",  # pydantic models, no I/O
        "collections.abc",
        "pydantic",  # the reports' models
    }, imported


def test_the_worker_records_a_use_its_grant_lacks_as_flagged_with_a_report_problem():
    import asyncio

    from prefect_governance.core.models import Decision
    from prefect_governance.worker.governor import Assessment
    from tests.grants import example_grant

    grant = example_grant(RUN, decision_id=DECISION)
    assert "delete:warehouse" not in grant.envelope.capabilities
    assessment = Assessment(
        Decision(id=DECISION, verdict="allowed", allow=True, engine="embedded", policy_path="p"),
        envelope=grant.envelope,
        policy_input={"agent": grant.agent.model_dump(mode="json")},
    )
    uses = [
        {**_use(grant.envelope.capabilities[0], run_id=None), "seq": 1},
        {**_use("delete:warehouse", run_id=None), "seq": 2},
    ]
    events, ends = asyncio.run(
        Governor(GovernanceSettings())._inside_events(
            assessment, RUN, [{"decision_id": DECISION, "events": uses}]
        )
    )
    assert ends == []
    assert [(e.kind, e.verdict) for e in events] == [
        ("capability_use", "used"),
        ("capability_use", "flagged"),
        ("report_problem", None),
    ]
    assert "seq 2 ('delete:warehouse') flagged" in events[2].reasons[0]
