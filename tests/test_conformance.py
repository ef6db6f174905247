"""Proof of sameness: OPA's own conformance suite, run through the embedded engine.

Every case of ``v1/test/cases/testdata/v1`` in the OPA Go module the native library is
built from runs through ``Policy`` and ``Policy.query``, exactly as the worker's
embedded engine calls them; a case whose answer differs from OPA's fails the build.
``pytest tests/test_conformance.py -s`` prints the counts. The method is described in
tests/conformance_support.py.
"""

from __future__ import annotations

import copy
from decimal import Decimal

import pytest

from prefect_governance.core.engines.native import NativeError, opa_version
from tests.conformance_support import (
    DIFFERENT,
    NOT_APPLICABLE,
    REFUSED,
    SAME,
    Case,
    Report,
    Unavailable,
    load_cases,
    module_version,
    opa_binary_version,
    opa_module_dir,
    run_all,
    run_case,
    run_with_opa,
)
from tests.conftest import missing


@pytest.fixture(scope="module")
def cases(opa_bin: str) -> list[Case]:
    try:
        module_dir = opa_module_dir()
    except Unavailable as exc:
        missing(str(exc))
    try:
        engine = opa_version()
    except NativeError as exc:
        missing(f"the embedded engine's library ({exc.message})")
    version = module_version(module_dir)
    # The cases, the engine and the reference binary that reads the cases are one OPA.
    assert "v" + engine.lstrip("v") == version, (engine, version)
    assert opa_binary_version(opa_bin) == version, f"{opa_bin} is not OPA {version}"
    return load_cases(module_dir, opa_bin)


@pytest.fixture(scope="module")
def report(cases: list[Case]) -> Report:
    return run_all(cases)


def test_opa_conformance_suite_gives_opas_answers(cases, report):
    print("\n" + report.summary())
    counts = report.counts
    # It cannot pass by running nothing: the suite has 2,400 cases in 1,178 files.
    assert len({case.file for case in cases}) > 1000
    assert len(report.outcomes) == len(cases) > 2000
    assert counts[SAME] > 2000
    assert counts[REFUSED] + counts[NOT_APPLICABLE] < 100
    different = report.of(DIFFERENT)
    assert not different, f"{len(different)} cases differ from OPA:\n" + "\n".join(
        outcome.describe() for outcome in different
    )
    # An expected error is raised with OPA's error code and message, as OPA's runner checks.
    mismatched = report.error_mismatches()
    assert not mismatched, "\n".join(outcome.describe() for outcome in mismatched)


def test_every_refusal_is_opas_own_answer_with_strict_builtin_errors(report, opa_bin):
    """The product evaluates with strict builtin errors (an error refuses, fail closed);
    OPA's suite runs most cases without. Each refusal is checked against the reference
    binary: with strict errors it fails with the same code, so it is OPA's answer under
    the product's setting, not the embedded engine's."""
    reasons = []
    for outcome in report.of(REFUSED):
        strict = run_with_opa(outcome.case, opa_bin, strict=True)
        assert strict == {"error": outcome.error_code}, outcome.describe()
        lenient = run_with_opa(outcome.case, opa_bin, strict=False)
        if "rows" in lenient:
            reasons.append("without strict builtin errors OPA gives the expected answer")
        else:  # time/time caching calls test.sleep, a builtin only OPA's test binary has
            reasons.append(f"OPA fails too ({lenient['error']}): {outcome.got['error']}")
    print("\nrefused:", {reason: reasons.count(reason) for reason in set(reasons)})


def _first_same(report: Report, predicate) -> Case:
    for outcome in report.of(SAME):
        if predicate(outcome.case.spec):
            return outcome.case
    raise AssertionError("no case of that kind was the same")


def _mutated(case: Case, **changes) -> Case:
    spec = copy.deepcopy(case.spec)
    spec.update(changes)
    return Case(case.file, case.index, spec, case.input_json, case.data_json, case.input_ast)


def test_the_comparison_can_fail(report):
    """A deliberately wrong expected answer is classified different."""
    case = _first_same(
        report,
        lambda s: (
            s.get("want_result")
            and s["query"] == "data.test.p = x"
            and isinstance(s["want_result"][0].get("x"), Decimal)
            and str(s["want_result"][0]["x"]).isdigit()
        ),
    )
    want = case.spec["want_result"]
    assert run_case(case).verdict == SAME
    x = want[0]["x"]
    # The same number written otherwise is the same answer (OPA compares by value) ...
    assert run_case(_mutated(case, want_result=[{"x": Decimal(f"{x}.000")}])).verdict == SAME
    # ... but a number off in its 30th digit is not (as floats they would be equal).
    nearly = Decimal(f"{x}.{'0' * 29}1")
    assert float(nearly) == float(x)
    wrong = [
        [{"x": nearly}],
        [{"x": x + 1}],
        [{"x": str(x)}],
        [*want, {"x": x + 1}],
        [{"y": x}],
        [],
    ]
    for want_result in wrong:
        mutated = run_case(_mutated(case, want_result=want_result))
        assert mutated.verdict == DIFFERENT, (want_result, mutated)
    # A result where OPA expects an error is different too.
    erring = run_case(_mutated(case, want_result=None, want_error_code="eval_type_error"))
    assert erring.verdict == DIFFERENT

    # A defined expectation where the answer is undefined ([] above: the other way round).
    undefined = _first_same(report, lambda s: s.get("want_result") == [])
    assert run_case(_mutated(undefined, want_result=[{"x": True}])).verdict == DIFFERENT

    # Under sort_bindings the elements are compared as a multiset, not a set.
    sorted_case = _first_same(
        report,
        lambda s: (
            s.get("sort_bindings")
            and s.get("want_result")
            and len(s["want_result"][0].get("x") or []) > 1
        ),
    )
    elements = sorted_case.spec["want_result"][0]["x"]
    for want_x in (elements[:-1], [*elements, elements[0]], list(reversed(elements))):
        verdict = run_case(_mutated(sorted_case, want_result=[{"x": want_x}])).verdict
        assert verdict == (
            SAME if sorted(map(repr, want_x)) == sorted(map(repr, elements)) else DIFFERENT
        ), want_x

    # OPA expecting an answer where we raise an error: refused, not different.
    expected_error = _first_same(report, lambda s: s.get("want_error_code") is not None)
    refused = run_case(
        _mutated(expected_error, want_error_code=None, want_error=None, want_result=[{"x": True}])
    )
    assert refused.verdict == REFUSED
