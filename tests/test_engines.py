"""Both engines, the same answers: every example through the embedded engine and a real OPA."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from prefect_governance.core.decision import decide
from prefect_governance.core.engines import EmbeddedEngine, EngineError, OpaEngine
from prefect_governance.core.engines.embedded import policy_files, policy_revision
from tests.conftest import POLICIES, OpaServer

PATH = "prefect/governance/decision"
TASK_PATH = "prefect/governance/task"
EXAMPLES = sorted(p for p in (POLICIES / "examples").iterdir() if p.is_dir())
TASK_EXAMPLES = sorted(p for p in (POLICIES / "task_examples").iterdir() if p.is_dir())


def normalized(result: dict) -> dict:
    """A result in a comparable form. Sets (deny, warn, reasons, grants) come out of both
    engines as arrays, in an order that is not part of the contract: sorted here. An
    absent ``grants`` stays None (the run may use what it asked for), unlike an empty one."""
    grants = result.get("grants")
    return {
        "allow": result["allow"],
        "deny": sorted(result.get("deny", [])),
        "warn": sorted(result.get("warn", [])),
        "annotations": result.get("annotations", {}),
        "reasons": sorted(
            result.get("reasons", []), key=lambda r: (r["kind"], r["rule"], r["message"])
        ),
        "grants": None if grants is None else sorted(grants),
        "waived": sorted(
            result.get("waived", []), key=lambda w: (w["exception"], w["rule"], w["message"])
        ),
    }


def rule_test_cases(ref: str = "data.prefect.governance.testing.all_cases") -> dict[str, dict]:
    """Every input the Rego rule tests exercise: ``testing.all_cases`` (the flow decision's
    rule modules) or ``testing.all_task_cases`` (the task policy's)."""
    from tests.conftest import opa_path

    binary = opa_path()
    if binary is None:
        return {}
    run = subprocess.run(
        [binary, "eval", "-d", str(POLICIES), "-f", "json", ref],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(run.stdout)["result"][0]["expressions"][0]["value"]


RULE_CASES = rule_test_cases()
TASK_RULE_CASES = rule_test_cases("data.prefect.governance.testing.all_task_cases")
EXCEPTION_CASES = rule_test_cases("data.prefect.governance.exceptions_test.all_cases")


@pytest.fixture(scope="module")
def embedded() -> EmbeddedEngine:
    return EmbeddedEngine(POLICIES)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_both_engines_decide_every_example_as_expected(example: Path, embedded, opa_server):
    policy_input = json.loads((example / "input.json").read_text())
    expected = normalized(json.loads((example / "expected.json").read_text()))

    async def both():
        opa = OpaEngine(opa_server.url)
        try:
            return await embedded.evaluate(PATH, policy_input), await opa.evaluate(
                PATH, policy_input
            )
        finally:
            await opa.aclose()

    local, remote = asyncio.run(both())
    assert normalized(local.result) == expected
    assert normalized(remote.result) == expected
    assert remote.decision_id, "OPA's decision_id is kept (decision logging is on)"
    assert local.revision == policy_revision(
        sorted(p for p in POLICIES.rglob("*.rego") if not p.name.endswith("_test.rego")), POLICIES
    )


@pytest.mark.parametrize("example", TASK_EXAMPLES, ids=lambda p: p.name)
def test_both_engines_decide_every_task_example_as_expected(example: Path, embedded, opa_server):
    policy_input = json.loads((example / "input.json").read_text())
    expected = normalized(json.loads((example / "expected.json").read_text()))
    assert expected["grants"] is None, "the task policy grants nothing of its own"

    async def remote():
        opa = OpaEngine(opa_server.url)
        try:
            return await opa.evaluate(TASK_PATH, policy_input)
        finally:
            await opa.aclose()

    assert normalized(embedded.evaluate_sync(TASK_PATH, policy_input).result) == expected
    assert normalized(asyncio.run(remote()).result) == expected


def test_the_rule_tests_cases_are_collected(opa_bin):
    assert len(RULE_CASES) > 40, "every case of the rule modules' tests reaches the parity suite"
    assert len(TASK_RULE_CASES) > 10, "and every case of the task rule modules' tests"
    modules = {p.stem for p in (POLICIES / "prefect" / "governance" / "task_rules").glob("*.rego")}
    tested = {name.split("/", 1)[0] for name in TASK_RULE_CASES}
    assert tested == {m for m in modules if not m.endswith("_test")}


def _both_alike(path: str, name: str, policy_input: dict, namespace: str, embedded, opa_server):
    """Both engines give the same result; a case that fires names its module's rule."""

    async def remote():
        opa = OpaEngine(opa_server.url)
        try:
            return await opa.evaluate(path, policy_input)
        finally:
            await opa.aclose()

    local = normalized(embedded.evaluate_sync(path, policy_input).result)
    assert local == normalized(asyncio.run(remote()).result)
    module = name.split("/", 1)[0]
    if local["reasons"]:
        assert any(r["rule"].startswith(f"{namespace}.{module}.") for r in local["reasons"])
    return local


@pytest.mark.parametrize("name", sorted(RULE_CASES))
def test_both_engines_decide_every_rule_test_case_alike(name: str, embedded, opa_server):
    policy_input = RULE_CASES[name]
    local = _both_alike(PATH, name, policy_input, "prefect.governance.rules", embedded, opa_server)
    requested = set(policy_input["envelope"]["capabilities"])
    assert set(local["grants"]) <= requested, "grants only ever narrow the request"


@pytest.mark.parametrize("name", sorted(EXCEPTION_CASES))
def test_both_engines_decide_every_exception_case_alike(name: str, embedded, opa_server):
    """The exception cases (policies/prefect/governance/exceptions_test.rego): both engines
    give the same result, waivers included."""
    policy_input = EXCEPTION_CASES[name]

    async def remote():
        opa = OpaEngine(opa_server.url)
        try:
            return await opa.evaluate(PATH, policy_input)
        finally:
            await opa.aclose()

    local = normalized(embedded.evaluate_sync(PATH, policy_input).result)
    assert local == normalized(asyncio.run(remote()).result)
    if policy_input.get("exceptions") and local["allow"] and local["waived"]:
        assert all(w["exception"] for w in local["waived"])


def test_the_exception_cases_reach_the_parity_suite():
    assert len(EXCEPTION_CASES) >= 15, EXCEPTION_CASES.keys()
    assert any(case.get("exceptions") for case in EXCEPTION_CASES.values())


@pytest.mark.parametrize("name", sorted(TASK_RULE_CASES))
def test_both_engines_decide_every_task_rule_test_case_alike(name: str, embedded, opa_server):
    local = _both_alike(
        TASK_PATH,
        name,
        TASK_RULE_CASES[name],
        "prefect.governance.task_rules",
        embedded,
        opa_server,
    )
    assert local["grants"] is None


COVERAGE_THRESHOLD = 100.0


def test_opa_test_passes_on_the_policy_library(opa_bin):
    run = subprocess.run([opa_bin, "test", str(POLICIES), "-v"], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "test_examples_decide_as_expected: PASS" in run.stdout
    assert "test_task_examples_decide_as_expected: PASS" in run.stdout
    for directory, namespace in (("rules", "rules_test"), ("task_rules", "task_rules_test")):
        modules = sorted((POLICIES / "prefect" / "governance" / directory).glob("*_test.rego"))
        assert modules, directory
        for module in modules:
            package = f"data.prefect.governance.{namespace}." + module.stem.removesuffix("_test")
            assert f"{package}.test_cases: PASS" in run.stdout


def test_the_rule_modules_are_fully_covered(opa_bin):
    run = subprocess.run(
        [opa_bin, "test", str(POLICIES), "--coverage", "--threshold", str(COVERAGE_THRESHOLD)],
        capture_output=True,
        text=True,
    )
    report = json.loads(run.stdout)
    uncovered = {
        name: [(r["start"]["row"], r["end"]["row"]) for r in data.get("not_covered", [])]
        for name, data in report["files"].items()
        if data.get("not_covered")
    }
    assert run.returncode == 0 and not uncovered, f"{report['coverage']}%; uncovered: {uncovered}"


def test_policy_library_is_strict_and_formatted(opa_bin):
    check = subprocess.run(
        [opa_bin, "check", "--strict", str(POLICIES / "prefect")], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    fmt = subprocess.run(
        [opa_bin, "fmt", "--list", "--fail", str(POLICIES / "prefect")],
        capture_output=True,
        text=True,
    )
    assert fmt.returncode == 0, f"not opa-fmt formatted: {fmt.stdout}"


FAULTY = """package faulty

allow if {
	io.jwt.decode(input.token)
}

deny contains "bad time" if {
	time.parse_rfc3339_ns(input.when) > 0
	false
}

slow := count([x | some x in numbers.range(1, 30000000)])
"""


@pytest.fixture(scope="module")
def faulty_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faulty")
    (root / "faulty.rego").write_text(FAULTY)
    return root


@pytest.fixture(scope="module")
def faulty_opa(opa_bin, faulty_dir) -> OpaServer:
    server = OpaServer(opa_bin, faulty_dir.parent, str(faulty_dir))
    yield server
    server.stop()


def _decide(engine, path, policy_input, deadline=5.0):
    async def go():
        try:
            return await decide(engine, path, policy_input, deadline=deadline)
        finally:
            await engine.aclose()

    return asyncio.run(go())


def test_a_builtin_error_is_a_refusal_in_both_engines(faulty_dir, faulty_opa):
    bad = {"token": "not-a-jwt", "when": "yesterday"}
    for engine in (EmbeddedEngine(faulty_dir), OpaEngine(faulty_opa.url)):
        decision = _decide(engine, "faulty/deny", bad)
        assert decision.verdict == "refused", engine.name
        assert "(evaluation)" in decision.deny[0], (engine.name, decision.deny)


def test_a_builtin_error_is_named_with_its_policy_and_line(faulty_dir):
    decision = _decide(EmbeddedEngine(faulty_dir), "faulty/allow", {"token": "a.b.c"})
    assert decision.verdict == "refused"
    assert "eval_builtin_error: io.jwt.decode" in decision.deny[0], decision.deny
    assert "faulty.rego:4" in decision.deny[0], "the error names the policy file and line"


def test_an_undefined_path_is_a_refusal_in_both_engines(opa_server):
    for engine in (EmbeddedEngine(POLICIES), OpaEngine(opa_server.url)):
        decision = _decide(engine, "prefect/governance/nothing_here", {})
        assert decision.verdict == "refused"
        assert "(undefined)" in decision.deny[0], (engine.name, decision.deny)


def test_a_result_of_the_wrong_shape_is_a_refusal(faulty_opa):
    decision = _decide(OpaEngine(faulty_opa.url), "faulty/deny", {"when": "2026-01-01T00:00:00Z"})
    assert decision.verdict == "refused" and "(shape)" in decision.deny[0]


def test_a_slow_opa_is_a_refusal_after_the_timeout(faulty_opa):
    engine = OpaEngine(faulty_opa.url, timeout=0.3, retries=0)
    decision = _decide(engine, "faulty/slow", {}, deadline=2.0)
    assert decision.verdict == "refused"
    assert "(timeout)" in decision.deny[0], decision.deny
    assert decision.latency_ms < 2000


def test_a_stopped_opa_is_a_refusal_that_says_unreachable(opa_bin, tmp_path):
    server = OpaServer(opa_bin, tmp_path)
    server.stop()
    decision = _decide(OpaEngine(server.url, retries=0), PATH, {})
    assert decision.verdict == "refused"
    assert "(unreachable)" in decision.deny[0], decision.deny


def test_the_embedded_engine_rejects_a_directory_without_policies(tmp_path):
    with pytest.raises(EngineError, match="no Rego policies"):
        EmbeddedEngine(tmp_path)


def test_the_embedded_revision_changes_with_the_policy(tmp_path):
    (tmp_path / "p.rego").write_text("package p\n\nallow := true\n")
    before = EmbeddedEngine(tmp_path).revision
    (tmp_path / "p.rego").write_text("package p\n\nallow := false\n")
    assert EmbeddedEngine(tmp_path).revision != before


def test_the_embedded_engine_picks_up_a_policy_change_without_a_restart(tmp_path):
    policy = tmp_path / "p.rego"
    policy.write_text("package p\n\nallow := true\n")
    engine = EmbeddedEngine(tmp_path, reload_interval=0)
    first = engine.evaluate_sync("p/allow", {})
    policy.write_text("package p\n\nallow := false # now refused\n")
    second = engine.evaluate_sync("p/allow", {})
    assert (first.result, second.result) == (True, False)
    assert first.revision != second.revision, "the new policy is a new revision"
    policy.write_text("package p\n\nallow := \n")  # a change that does not compile
    with pytest.raises(EngineError, match="cannot load"):
        engine.evaluate_sync("p/allow", {})
    policy.unlink()
    with pytest.raises(EngineError, match="no Rego policies"):
        engine.evaluate_sync("p/allow", {})


def test_a_policy_that_stops_compiling_refuses_until_it_is_fixed(tmp_path):
    """Not just the first decision after the bad edit: every one until a good load."""
    policy = tmp_path / "p.rego"
    policy.write_text("package p\n\nallow := true\n")
    engine = EmbeddedEngine(tmp_path, reload_interval=0)
    good = engine.evaluate_sync("p/allow", {}).revision
    policy.write_text("package p\n\nallow := \n")
    with pytest.raises(EngineError, match="cannot load"):
        engine.evaluate_sync("p/allow", {})
    engine.reload_interval = 3600  # no new look at the files: the old policy stays refused
    with pytest.raises(EngineError, match="cannot load"):
        engine.evaluate_sync("p/allow", {})
    policy.write_text("package p\n\nallow := true\n")
    engine.reload_interval = 0
    assert engine.evaluate_sync("p/allow", {}).revision == good


def test_the_embedded_engine_sees_modules_added_and_removed_anywhere(tmp_path):
    (tmp_path / "p.rego").write_text("package p\n\nallow := true\n")
    engine = EmbeddedEngine(tmp_path, reload_interval=0)
    first = engine.evaluate_sync("p/allow", {}).revision
    nested = tmp_path / "team" / "rules"
    nested.mkdir(parents=True)
    (nested / "q.rego").write_text("package q\n\nallow := false\n")
    assert engine.evaluate_sync("q/allow", {}).result is False
    (nested / "q_test.rego").write_text("package q_test\n\ntest_x if true\n")
    (tmp_path / "notes.json").write_text("{}")
    second = engine.evaluate_sync("q/allow", {}).revision
    assert second != first, "a new module is a new revision; tests and data are not"
    (nested / "q.rego").unlink()
    assert engine.evaluate_sync("q/allow", {}).result is None
    assert engine.evaluate_sync("p/allow", {}).revision == first


def test_the_embedded_reload_check_scans_only_after_a_change(tmp_path, monkeypatch):
    """Each check is one stat per directory and module; a scan only when one changed."""
    import prefect_governance.core.engines.embedded as embedded

    shutil.copytree(POLICIES / "prefect", tmp_path / "prefect")
    hour_ago = time.time() - 3600
    for path in [tmp_path, *tmp_path.rglob("*")]:
        os.utime(path, (hour_ago, hour_ago))
    engine = EmbeddedEngine(tmp_path, reload_interval=0)
    revision = engine.revision
    scans = []
    monkeypatch.setattr(embedded, "policy_files", lambda d: scans.append(d) or policy_files(d))
    for _ in range(50):
        engine.evaluate_sync(PATH, {})
    assert scans == []
    (tmp_path / "prefect" / "notes.md").write_text("not a module")
    engine.evaluate_sync(PATH, {})
    assert len(scans) == 1 and engine.revision == revision


def test_opa_reports_the_bundle_revision(opa_bin, tmp_path):
    """When OPA serves a bundle, the decision carries its revision."""
    bundle = tmp_path / "policies.tar.gz"
    subprocess.run(
        [opa_bin, "build", "-b", str(POLICIES), "--revision", "rev-42", "-o", str(bundle)],
        check=True,
        capture_output=True,
    )
    server = OpaServer(opa_bin, tmp_path, "--bundle", paths=(bundle,))
    try:
        policy_input = json.loads((EXAMPLES[0] / "input.json").read_text())
        decision = _decide(OpaEngine(server.url), PATH, policy_input)
    finally:
        server.stop()
    assert decision.policy_revision and decision.policy_revision.endswith("@rev-42")
