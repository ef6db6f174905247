"""`policy test` and `policy eval`, against the embedded engine and the real opa binary."""

from __future__ import annotations

import json
from pathlib import Path
from textwrap import dedent

import pytest
from typer.testing import CliRunner

from prefect_governance.cli import policy_tools as tools
from prefect_governance.cli.main import app
from tests.conftest import POLICIES

EXAMPLES = sorted(p for p in (POLICIES / "examples").glob("*") if (p / "input.json").exists())


@pytest.fixture(autouse=True)
def _no_engine_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PREFECT_GOVERNANCE_OPA_URL", "PREFECT_GOVERNANCE_POLICY_DIR", "OPA_BIN"):
        monkeypatch.delenv(name, raising=False)


def cli(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dedent(text).lstrip())
    return root


# A package with a rule reading data, its tests, and two data files in one directory:
# OPA merges both into data.limits (the file names do not count).
SCRATCH = {
    "app/rules.rego": """
        package app

        allow if input.rows <= data.limits.max_rows

        owners contains name if some name in data.limits.owners
    """,
    "app/rules_test.rego": """
        package app_test

        import data.app

        test_small_is_allowed if app.allow with input as {"rows": 3}

        test_large_is_not_allowed if not app.allow with input as {"rows": 300}

        test_data_files_are_merged if app.owners == {"alice", "bob"}

        todo_test_not_written_yet if false
    """,
    "limits/defaults.json": '{"max_rows": 10}',
    "limits/owners.json": '{"owners": ["alice", "bob"]}',
}


def policy_test(policy_dir: Path, opa_bin: str):
    return cli("policy", "test", "--policies", str(policy_dir), "--opa", opa_bin)


# --- policy test ------------------------------------------------------------------


def test_discovery_finds_every_test_rule_and_no_todo(tmp_path):
    tests = tools.discover_tests(write(tmp_path, SCRATCH))
    assert [t.ref for t in tests] == [
        "data.app_test.test_data_files_are_merged",
        "data.app_test.test_large_is_not_allowed",
        "data.app_test.test_small_is_allowed",
    ]
    assert tests[0].file == Path("app/rules_test.rego")


def test_data_files_are_merged_by_directory_like_opa(tmp_path):
    write(tmp_path, {**SCRATCH, "root.json": '{"top": 1}', "limits/deep/x.yaml": "k: v\n"})
    assert tools.load_data_documents(tmp_path) == {
        "top": 1,
        "limits": {"max_rows": 10, "owners": ["alice", "bob"], "deep": {"k": "v"}},
    }


def test_conflicting_data_files_are_an_error(tmp_path, opa_bin):
    write(tmp_path, {**SCRATCH, "limits/other.json": '{"max_rows": 20}'})
    conflict = r"conflicting values at data\.limits\.max_rows"
    with pytest.raises(tools.PolicyToolError, match=conflict):
        tools.load_data_documents(tmp_path)
    # OPA refuses the same directory too: every test fails in both engines, with the reason.
    result = policy_test(tmp_path, opa_bin)
    assert result.exit_code == 1, result.output
    assert "3 tests, embedded: 0 passed, opa: 0 passed, differences: 0" in result.output
    assert "embedded: cannot load the data: limits/other.json: merge error" in result.output
    assert "opa: opa test: 1 error occurred during loading" in result.output


def test_passing_tests_pass_in_both_engines(tmp_path, opa_bin):
    result = policy_test(write(tmp_path, SCRATCH), opa_bin)
    assert result.exit_code == 0, result.output
    assert "PASS  embedded  PASS  opa  data.app_test.test_data_files_are_merged" in result.output
    assert "3 tests, embedded: 3 passed, opa: 3 passed, differences: 0" in result.output
    assert "todo_" not in result.output


def test_a_failing_test_fails_the_run(tmp_path, opa_bin):
    write(tmp_path, SCRATCH)
    write(
        tmp_path,
        {
            "app/more_test.rego": """
                package app_test

                test_wrong_limit if data.limits.max_rows == 11

                conflicting := x if some x in [1, 2]

                test_conflict if conflicting == 1
            """
        },
    )
    result = policy_test(tmp_path, opa_bin)
    assert result.exit_code == 1, result.output
    assert "FAIL  embedded  FAIL  opa  data.app_test.test_wrong_limit" in result.output
    assert "FAIL  embedded  FAIL  opa  data.app_test.test_conflict" in result.output
    assert "eval_conflict_error" in result.output  # OPA's error, reported under the test
    assert "5 tests, embedded: 3 passed, opa: 3 passed, differences: 0" in result.output


def test_a_builtin_the_old_embedded_engine_lacked_passes_in_both(tmp_path, opa_bin):
    """io.jwt.decode was missing from regorus; the embedded engine is OPA now."""
    write(tmp_path, SCRATCH)
    write(
        tmp_path,
        {
            "app/jwt_test.rego": """
                package app_test

                token := "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln"

                test_jwt_subject if {
                    [_, payload, _] := io.jwt.decode(token)
                    payload.sub == "alice"
                }
            """
        },
    )
    result = policy_test(tmp_path, opa_bin)
    assert result.exit_code == 0, result.output
    assert "PASS  embedded  PASS  opa  data.app_test.test_jwt_subject" in result.output
    assert "4 tests, embedded: 4 passed, opa: 4 passed, differences: 0" in result.output


def test_each_definition_of_a_test_rule_is_its_own_test_as_in_opa(tmp_path, opa_bin):
    write(
        tmp_path,
        {
            "t/x_test.rego": """
                package x_test

                default test_d := false

                test_d if 1 == 1

                test_d if 1 == 2
            """
        },
    )
    embedded = tools.run_embedded_tests(tmp_path)
    opa = tools.run_opa_tests(tmp_path, opa_bin)
    assert {ref: o.passed for ref, o in embedded.items()} == {
        "data.x_test.test_d": False,
        "data.x_test.test_d#01": True,
        "data.x_test.test_d#02": False,
    }
    assert not any(c.differs for c in tools.compare(embedded, opa))


def test_without_opa_only_the_embedded_engine_runs(tmp_path, monkeypatch):
    write(tmp_path / "policies", SCRATCH)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    result = cli("policy", "test", "--policies", str(tmp_path / "policies"))
    assert result.exit_code == 0, result.output
    assert "opa not found: ran the embedded engine only" in result.output
    assert "3 tests, embedded: 3 passed, opa: not run" in result.output

    result = cli("policy", "test", "--policies", str(tmp_path / "policies"), "--embedded-only")
    assert result.exit_code == 0, result.output
    assert "opa not found" not in result.output


def test_the_shipped_policies_pass_in_both_engines(opa_bin):
    result = cli("policy", "test", "--opa", opa_bin)
    assert result.exit_code == 0, result.output
    assert "differences: 0" in result.output


# --- policy eval ------------------------------------------------------------------


def expected_of(example: Path) -> tuple[dict, int]:
    expected = json.loads((example / "expected.json").read_text())
    audit = json.loads((example / "input.json").read_text())["context"].get("mode") == "audit"
    return expected, 0 if expected["allow"] or audit else 1


def check(result, example: Path, engine: str) -> dict:
    expected, exit_code = expected_of(example)
    decision = json.loads(result.stdout)
    assert result.exit_code == exit_code, result.output
    assert decision["engine"] == engine
    assert decision["allow"] == expected["allow"]
    assert sorted(decision["deny"]) == sorted(expected["deny"])
    assert sorted(decision["warn"]) == sorted(expected["warn"])
    assert decision["annotations"] == expected["annotations"]
    assert decision["error"] is None
    return decision


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_eval_embedded_decides_every_example_as_expected(example):
    result = cli("policy", "eval", "--input", str(example / "input.json"))
    check(result, example, "embedded")


@pytest.mark.opa
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_eval_opa_decides_every_example_as_expected(example, opa_server):
    result = cli(
        "policy",
        "eval",
        "--input",
        str(example / "input.json"),
        "--engine",
        "opa",
        "--opa-url",
        opa_server.url,
    )
    check(result, example, "opa")


TASK_EXAMPLES = sorted(p for p in (POLICIES / "task_examples").iterdir() if p.is_dir())


@pytest.mark.parametrize("example", TASK_EXAMPLES, ids=lambda p: p.name)
def test_eval_decides_task_inputs_at_the_task_policy(example):
    """A task input is recognised and decided at prefect/governance/task, grants shown."""
    result = cli("policy", "eval", "--input", str(example / "input.json"))
    decision = check(result, example, "embedded")
    assert decision["annotations"]["governance.policy"] == "prefect/governance/task"
    assert "grants" in decision


def refused_example() -> Path:
    for example in EXAMPLES:
        expected, exit_code = expected_of(example)
        if exit_code == 1 and expected.get("reasons"):
            return example
    pytest.fail("no refused example with reasons under policies/examples")


def test_eval_explain_names_the_rules_that_refused(opa_bin):
    example = refused_example()
    embedded = cli("policy", "eval", "--input", str(example / "input.json"), "--explain")
    assert embedded.exit_code == 1, embedded.output
    why = embedded.stdout.split("Why:", 1)[1]
    assert "deny  prefect.governance." in why

    # No --opa-url: a temporary OPA server is started on the policy directory, then stopped.
    opa = cli(
        "policy",
        "eval",
        "--input",
        str(example / "input.json"),
        "--engine",
        "opa",
        "--opa",
        opa_bin,
        "--policies",
        str(POLICIES),
        "--explain",
    )
    assert opa.exit_code == 1, opa.output
    why, trace = opa.stdout.split("Why:", 1)[1].split("OPA explain", 1)
    assert "deny  prefect.governance." in why
    assert "Enter data.prefect.governance." in trace


def test_eval_refuses_an_invalid_input_with_exit_2(tmp_path):
    bad = tmp_path / "input.json"
    bad.write_text(json.dumps({"agent": {"id": "a"}, "context": {}}))
    result = cli("policy", "eval", "--input", str(bad))
    assert result.exit_code == 2, result.output
    assert "envelope" in result.output
    assert "invalid policy input" in result.output

    bad.write_text("{not json")
    assert cli("policy", "eval", "--input", str(bad)).exit_code == 2


def test_eval_fails_closed_when_the_engine_cannot_load(tmp_path):
    example = refused_example()
    (tmp_path / "broken.rego").write_text("package prefect.governance.decision\n\nallow if {\n")
    result = cli(
        "policy", "eval", "--input", str(example / "input.json"), "--policies", str(tmp_path)
    )
    assert result.exit_code == 1, result.output
    decision = json.loads(result.stdout)
    assert decision["verdict"] == "refused"
    assert decision["error"].startswith("policy engine failed (evaluation)")
