"""The decision logic as pure functions: interpreting results, failing closed, modes, controls."""

from __future__ import annotations

import pytest

from prefect_governance.core.controls import pool_defaults, resolve_controls
from prefect_governance.core.decision import decision_for, interpret
from prefect_governance.core.engines import EngineAnswer, EngineError
from prefect_governance.core.envelope import REDACTED, redact
from prefect_governance.worker.process import GovernedProcessWorker


def _settle(answer, mode="enforce", fail_mode="closed"):
    return decision_for(answer, engine="test", policy_path="p/q", mode=mode, fail_mode=fail_mode)


def test_allow_without_denies_is_allowed():
    decision = _settle(EngineAnswer({"allow": True, "deny": [], "warn": ["w"], "annotations": {}}))
    assert (decision.verdict, decision.runs, decision.warn) == ("allowed", True, ["w"])


def test_deny_reasons_refuse_even_when_allow_is_true():
    decision = _settle(EngineAnswer({"allow": True, "deny": ["no"]}))
    assert (decision.verdict, decision.runs, decision.deny) == ("refused", False, ["no"])


def test_allow_false_without_reasons_still_gives_a_reason():
    decision = _settle(EngineAnswer({"allow": False}))
    assert decision.verdict == "refused"
    assert "allow is false" in decision.deny[0]


def test_audit_mode_runs_a_denied_run_and_says_so():
    decision = _settle(EngineAnswer({"allow": False, "deny": ["no"]}), mode="audit")
    assert (decision.verdict, decision.runs, decision.deny) == ("audited", True, ["no"])


@pytest.mark.parametrize(
    ("result", "kind"),
    [
        (None, "undefined"),
        ([], "shape"),
        ("allow", "shape"),
        ({"deny": []}, "shape"),
        ({"allow": "true"}, "shape"),
        ({"allow": True, "deny": "x"}, "shape"),
        ({"allow": True, "annotations": {"k": 1}}, "shape"),
    ],
)
def test_unusable_results_are_refused_with_the_reason(result, kind):
    with pytest.raises(EngineError) as caught:
        interpret(result)
    assert caught.value.kind == kind
    decision = _settle(EngineAnswer(result))
    assert decision.verdict == "refused"
    assert f"({kind})" in decision.deny[0]


def test_extra_rules_in_the_package_are_ignored():
    assert interpret({"allow": True, "low_trust": 0.5}).allow is True


def test_engine_failure_fails_closed_by_default():
    decision = _settle(EngineError("unreachable", "OPA at x is unreachable"))
    assert decision.verdict == "refused"
    assert "unreachable" in decision.deny[0] and decision.error


def test_engine_failure_in_a_fail_open_pool_runs_ungoverned_and_says_so():
    decision = _settle(EngineError("timeout", "slow"), fail_mode="open")
    assert (decision.verdict, decision.runs) == ("ungoverned", True)
    assert "ungoverned" in decision.warn[0] and "timeout" in decision.error


def test_engine_failure_under_audit_mode_is_still_refused_when_closed():
    assert _settle(EngineError("http", "500"), mode="audit").verdict == "refused"


TEMPLATE = GovernedProcessWorker.get_default_base_job_template()


def test_pool_defaults_read_the_template():
    assert pool_defaults(TEMPLATE) == {
        "policy_path": "prefect/governance/decision",
        "task_policy_path": "prefect/governance/task",
        "engine": None,
        "lineage_store": None,
        "signing_key": None,
        "env_allow": [],
        "mode": "enforce",
        "fail_mode": "closed",
    }


def test_a_deployment_cannot_relax_governance():
    pool = pool_defaults(TEMPLATE)
    controls = resolve_controls(
        pool,
        {
            "agent": "a",
            "mode": "audit",
            "fail_mode": "open",
            "engine": "permissive",
            "policy_path": "allow/all",
            "lineage_store": "elsewhere",
            "signing_key": "my-own-key",
            "env_allow": ["*"],
        },
    )
    assert (
        controls.mode,
        controls.fail_mode,
        controls.engine,
        controls.policy_path,
        controls.lineage_store,
    ) == ("enforce", "closed", None, "prefect/governance/decision", None)
    assert controls.signing_key is None and controls.env_allow == []
    assert len(controls.notes) == 7


def test_a_deployment_may_tighten_governance():
    pool = {**pool_defaults(TEMPLATE), "mode": "audit", "fail_mode": "open"}
    controls = resolve_controls(pool, {"agent": "a", "mode": "enforce", "fail_mode": "closed"})
    assert (controls.mode, controls.fail_mode, controls.notes) == ("enforce", "closed", [])


def test_secrets_are_redacted_at_any_depth():
    params = {
        "rows": 3,
        "db_password": "hunter2",
        "conn": {"api_token": "t", "host": "h"},
        "items": [{"secret": "s"}],
    }
    out, paths = redact(params, ["password", "token", "secret"])
    assert out == {
        "rows": 3,
        "db_password": REDACTED,
        "conn": {"api_token": REDACTED, "host": "h"},
        "items": [{"secret": REDACTED}],
    }
    assert paths == ["db_password", "conn.api_token", "items[0].secret"]


def test_only_the_pool_sets_the_task_policy_path():
    controls = resolve_controls(pool_defaults(TEMPLATE), {"task_policy_path": "anything/goes"})
    assert controls.task_policy_path == "prefect/governance/task"
    assert any(
        "task_policy_path" in note and "only the work pool" in note for note in controls.notes
    )
