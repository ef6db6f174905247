"""Policy authoring tools: run Rego unit tests in both engines, evaluate one input.

``policy test`` runs the ``test_*`` rules of a policy directory through the
embedded engine (OPA's evaluator, in-process) and through ``opa test``, and
reports every test whose outcome differs: the sidecar's OPA may be another
version than the one the worker embeds.

``policy eval`` decides one policy input exactly as the worker would (through
:func:`prefect_governance.core.decision.decide`, fail closed) and explains why.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from prefect_governance.cli.schema import DocumentKind, guess_kind, validate_document
from prefect_governance.core.decision import decide, decision_for
from prefect_governance.core.engines.base import EngineError, PolicyEngine
from prefect_governance.core.engines.embedded import first_value
from prefect_governance.core.engines.native import NativeError, Policy
from prefect_governance.core.errors import GovernanceError
from prefect_governance.core.models import (
    DEFAULT_POLICY_PATH,
    DEFAULT_TASK_POLICY_PATH,
    Decision,
    Mode,
)


class PolicyToolError(GovernanceError):
    """The tool itself could not run (no opa binary, unreadable directory, ...)."""


# --- discovering tests --------------------------------------------------------

_PACKAGE = re.compile(r"^package\s+(\S+)", re.MULTILINE)
# A test rule's head at the start of a line (``default`` heads count as definitions too).
_TEST_HEAD = re.compile(r"^(?:default[ \t]+)?(test_\w*)\b", re.MULTILINE)
# Data files ``opa test DIR`` loads besides the Rego modules.
DATA_SUFFIXES = (".json", ".yaml", ".yml")


@dataclass(frozen=True)
class RegoTest:
    """One test as ``opa test`` names it: a definition of a ``test_`` rule.

    A rule defined more than once is run once per definition, the later ones
    named ``test_x#01``, ``test_x#02``..., like OPA does.
    """

    package: str
    rule: str
    index: int
    file: Path
    offset: int
    line: int

    @property
    def name(self) -> str:
        return self.rule if self.index == 0 else f"{self.rule}#{self.index:02d}"

    @property
    def ref(self) -> str:
        return f"data.{self.package}.{self.name}"


def discover_tests(policy_dir: Path) -> list[RegoTest]:
    """Every ``test_`` rule definition in the ``*_test.rego`` files under a directory.

    ``todo_`` rules (skipped by OPA) are not tests. Found with regular expressions
    over the source: a rule head must start its line, as ``opa fmt`` writes it.
    """
    root = Path(policy_dir)
    found: dict[tuple[str, str], list[tuple[Path, int, int]]] = {}
    for path in sorted(root.rglob("*_test.rego")):
        source = path.read_text()
        package = _PACKAGE.search(source)
        if package is None:
            continue
        for match in _TEST_HEAD.finditer(source):
            line = source.count("\n", 0, match.start()) + 1
            found.setdefault((package.group(1), match.group(1)), []).append(
                (path.relative_to(root), match.start(1), line)
            )
    return sorted(
        (
            RegoTest(package, rule, index, file, offset, line)
            for (package, rule), definitions in found.items()
            for index, (file, offset, line) in enumerate(definitions)
        ),
        key=lambda test: test.ref,
    )


# --- data documents -------------------------------------------------------------


def _merge(node: dict[str, Any], value: dict[str, Any], where: list[str], source: Path) -> None:
    """Merge an object into ``node`` (at ``data.<where>``); conflicting values are an error."""
    for key, item in value.items():
        here = [*where, key]
        if key not in node:
            node[key] = item
        elif isinstance(node[key], dict) and isinstance(item, dict):
            _merge(node[key], item, here, source)
        else:
            raise PolicyToolError(
                f"{source}: merge error: conflicting values at data.{'.'.join(here)}"
            )


def load_data_documents(policy_dir: Path) -> dict[str, Any]:
    """The ``data`` document ``opa test DIR`` builds from the data files under DIR.

    A file at ``DIR/a/b/x.json`` (or ``.yaml``/``.yml``) is merged in at ``data.a.b``:
    the file name is ignored, files of one directory are merged, and two files giving
    a value for one key (equal or not) are a merge error, as in OPA.
    """
    root = Path(policy_dir)
    data: dict[str, Any] = {}
    for path in sorted(p for p in root.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file()):
        text = path.read_text()
        if not text.strip() and path.suffix != ".json":
            continue  # an empty YAML file adds nothing; an empty JSON file is an error, as in OPA
        try:
            value = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise PolicyToolError(f"{path}: cannot parse: {exc}") from exc
        source = path.relative_to(root)
        for key in reversed(source.parent.parts):
            value = {key: value}
        if not isinstance(value, dict):
            raise PolicyToolError(f"{source}: a data file at the top must hold an object")
        _merge(data, value, [], source)
    return data


# --- running tests ----------------------------------------------------------------

TEST_TIMEOUT = 30.0  # seconds one test rule may take, as a runaway guard


@dataclass(frozen=True)
class Outcome:
    """One engine's result for one test."""

    passed: bool
    message: str | None = None


def brief(message: str) -> str:
    """A multi-line error (OPA's count line, source excerpt) on one line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if lines and re.fullmatch(r"\d+ errors? occurred:?.*", lines[0]) and len(lines) > 1:
        first = lines[0].split(":", 1)[1].strip()
        lines = [first, *lines[1:]] if first else lines[1:]
    return " ".join(lines)


def _rego_sources(policy_dir: Path) -> dict[Path, str]:
    root = Path(policy_dir)
    return {path.relative_to(root): path.read_text() for path in sorted(root.rglob("*.rego"))}


def _engine(sources: dict[Path, str], data: dict[str, Any]) -> Policy:
    return Policy(((path.as_posix(), source) for path, source in sources.items()), data)


def _isolate(sources: dict[Path, str], test: RegoTest, siblings: list[RegoTest]) -> dict[Path, str]:
    """The sources with every other definition of the test's rule renamed away."""
    edited = dict(sources)
    for other in sorted(siblings, key=lambda t: t.offset, reverse=True):
        if other.index == test.index:
            continue
        text = edited[other.file]
        hidden = f"__skipped{other.index}_{other.rule}"
        edited[other.file] = text[: other.offset] + hidden + text[other.offset + len(other.rule) :]
    return edited


def _run_one(engine: Policy, test: RegoTest) -> Outcome:
    query = f"data.{test.package}.{test.rule}"
    try:
        value = first_value(engine.query(query, None, timeout=TEST_TIMEOUT))
    except NativeError as exc:
        return Outcome(False, exc.message)
    if value is None:
        return Outcome(False, "undefined")
    if value is True:
        return Outcome(True)
    return Outcome(False, f"the rule is {json.dumps(value)}, not true")


def run_embedded_tests(policy_dir: Path, tests: list[RegoTest] | None = None) -> dict[str, Outcome]:
    """Run the tests in one embedded engine holding every ``.rego`` and data file of DIR.

    No input is set, as in ``opa test``. A test passes iff its rule is ``true``; an
    error (a builtin error, a conflict...) fails it with the error's message.
    A rule with several definitions is run once per definition, each on its own.
    """
    root = Path(policy_dir)
    tests = discover_tests(root) if tests is None else tests
    sources = _rego_sources(root)
    try:
        data = load_data_documents(root)
    except PolicyToolError as exc:
        failed = Outcome(False, f"cannot load the data: {exc}")
        return {test.ref: failed for test in tests}
    by_rule: dict[tuple[str, str], list[RegoTest]] = {}
    for test in tests:
        by_rule.setdefault((test.package, test.rule), []).append(test)
    outcomes: dict[str, Outcome] = {}
    try:
        shared = _engine(sources, data)
    except NativeError as exc:
        failed = Outcome(False, f"cannot load the policies: {exc.message}")
        return {test.ref: failed for test in tests}
    for test in tests:
        siblings = by_rule[(test.package, test.rule)]
        if len(siblings) == 1:
            outcomes[test.ref] = _run_one(shared, test)
            continue
        try:
            engine = _engine(_isolate(sources, test, siblings), data)
        except NativeError as exc:
            outcomes[test.ref] = Outcome(False, exc.message)
        else:
            outcomes[test.ref] = _run_one(engine, test)
    return outcomes


def find_opa(explicit: str | None = None) -> str | None:
    """The opa binary: ``explicit``, else ``$OPA_BIN``, else ``opa`` on the PATH.

    Raises :class:`PolicyToolError` when one was named but is not an executable.
    """
    named = explicit or os.environ.get("OPA_BIN")
    if named:
        resolved = shutil.which(named)
        if resolved is None:
            raise PolicyToolError(f"opa binary {named!r} is not an executable file")
        return resolved
    return shutil.which("opa")


def _opa_message(error: Any) -> str:
    errors = error if isinstance(error, list) else [error]
    return "; ".join(
        f"{e.get('code', 'error')}: {e.get('message', '')}" if isinstance(e, dict) else str(e)
        for e in errors
    )


def parse_opa_test_report(report: list[dict[str, Any]]) -> dict[str, Outcome]:
    """Read ``opa test --format json`` output: skipped (``todo_``) tests are left out.

    Each entry has ``package`` (``data.pkg``), ``name``, and ``fail: true`` when the
    rule was false or undefined, or ``error`` (an object or a list) when it failed to
    evaluate, or ``skip: true``; a passing test has none of the three.
    """
    outcomes: dict[str, Outcome] = {}
    for entry in report:
        if entry.get("skip"):
            continue
        ref = f"{entry['package']}.{entry['name']}"
        if entry.get("error"):
            outcomes[ref] = Outcome(False, _opa_message(entry["error"]))
        elif entry.get("fail"):
            outcomes[ref] = Outcome(False, "false or undefined")
        else:
            outcomes[ref] = Outcome(True)
    return outcomes


def run_opa_tests(
    policy_dir: Path, opa: str, tests: list[RegoTest] | None = None, timeout: float = 600.0
) -> dict[str, Outcome]:
    """Run ``opa test --format json DIR`` and read its report.

    When OPA cannot load the directory (a parse or merge error) it prints no report;
    every discovered test then fails with OPA's message.
    """
    root = Path(policy_dir)
    try:
        completed = subprocess.run(
            [opa, "test", "--format", "json", str(root)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PolicyToolError(f"cannot run {opa} test: {exc}") from exc
    try:
        report = json.loads(completed.stdout)
    except json.JSONDecodeError:
        report = None
    if not isinstance(report, list):
        message = (completed.stderr or completed.stdout).strip() or f"exit {completed.returncode}"
        tests = discover_tests(root) if tests is None else tests
        return {test.ref: Outcome(False, f"opa test: {message}") for test in tests}
    return parse_opa_test_report(report)


@dataclass(frozen=True)
class Comparison:
    """One test's outcome in each engine (None: the engine has no such test / did not run)."""

    ref: str
    embedded: Outcome | None
    opa: Outcome | None

    @property
    def differs(self) -> bool:
        if self.opa is None and self.embedded is None:
            return False
        if self.opa is None or self.embedded is None:
            return True
        return self.opa.passed != self.embedded.passed


def compare(embedded: dict[str, Outcome], opa: dict[str, Outcome] | None) -> list[Comparison]:
    """Line the two engines' outcomes up by test; ``opa=None`` when OPA did not run."""
    if opa is None:
        return [Comparison(ref, outcome, None) for ref, outcome in sorted(embedded.items())]
    return [Comparison(ref, embedded.get(ref), opa.get(ref)) for ref in sorted({*embedded, *opa})]


def _label(outcome: Outcome | None, ran: bool) -> str:
    if not ran:
        return "n/a"
    if outcome is None:
        return "----"
    return "PASS" if outcome.passed else "FAIL"


def report_lines(comparisons: list[Comparison], opa_ran: bool) -> list[str]:
    """One line per test, details under failures and differences, then a summary line."""
    lines: list[str] = []
    for item in comparisons:
        lines.append(
            f"{_label(item.embedded, True):4}  embedded  {_label(item.opa, opa_ran):4}  opa  "
            f"{item.ref}"
        )
        for engine, outcome in (("embedded", item.embedded), ("opa", item.opa)):
            if outcome is None and opa_ran:
                lines.append(f"      {engine}: no such test")
            elif outcome is not None and not outcome.passed and outcome.message:
                lines.append(f"      {engine}: {brief(outcome.message)}")
        if opa_ran and item.differs:
            lines.append("      difference: the engines disagree on this test")
    passed_embedded = sum(1 for c in comparisons if c.embedded and c.embedded.passed)
    summary = f"{len(comparisons)} tests, embedded: {passed_embedded} passed, "
    if opa_ran:
        passed_opa = sum(1 for c in comparisons if c.opa and c.opa.passed)
        differences = sum(1 for c in comparisons if c.differs)
        summary += f"opa: {passed_opa} passed, differences: {differences}"
    else:
        summary += "opa: not run, differences: 0"
    lines.append(summary)
    return lines


def all_passed(comparisons: list[Comparison], opa_ran: bool) -> bool:
    """No test failed in either engine and the engines agree on every test."""
    for item in comparisons:
        if item.embedded is None or not item.embedded.passed:
            return False
        if opa_ran and (item.opa is None or not item.opa.passed):
            return False
    return True


# --- evaluating one input -----------------------------------------------------------


def read_policy_input(path: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """The policy input in a JSON file, or the reasons it is not a valid one."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return None, [f"{path}: not a JSON document: {exc}"]
    kind: DocumentKind = "task_input" if guess_kind(document) == "task_input" else "input"
    errors = validate_document(document, kind)
    if errors:
        return None, [f"{path}: {error}" for error in errors]
    return document, []


def policy_path_for(policy_input: dict[str, Any], explicit: str | None = None) -> str:
    """The policy path the worker would ask: the agent's ``policy_ref``, else the default
    (for a task input: the task policy's default path)."""
    if explicit:
        return explicit
    if guess_kind(policy_input) == "task_input":
        return DEFAULT_TASK_POLICY_PATH
    return (policy_input.get("agent") or {}).get("policy_ref") or DEFAULT_POLICY_PATH


async def evaluate_input(
    engine: PolicyEngine | EngineError,
    policy_input: dict[str, Any],
    policy_path: str,
    *,
    engine_name: str,
    deadline: float = 5.0,
) -> Decision:
    """Decide one input as the worker would: the input's mode, fail closed.

    ``engine`` may be the error that prevented building it, which refuses like the worker.
    """
    mode: Mode = (policy_input.get("context") or {}).get("mode") or "enforce"
    if isinstance(engine, EngineError):
        return decision_for(
            engine, engine=engine_name, policy_path=policy_path, mode=mode, fail_mode="closed"
        )
    return await decide(engine, policy_path, policy_input, mode=mode, deadline=deadline)


DECISION_FIELDS = (
    "verdict",
    "allow",
    "deny",
    "warn",
    "annotations",
    "reasons",
    "grants",
    "approval",
    "engine",
    "policy_revision",
    "error",
)


def decision_document(decision: Decision) -> dict[str, Any]:
    """The parts of a decision ``policy eval`` prints."""
    dumped = decision.model_dump(mode="json")
    return {key: dumped[key] for key in DECISION_FIELDS}


def explain_reasons(decision: Decision) -> list[str]:
    """Why, in words: ``deny|warn  <rule>  <message>`` for each rule that fired."""
    then = "runs" if decision.runs else "waits" if decision.waits else "is refused"
    lines = [f"verdict: {decision.verdict} (the run {then})"]
    if decision.error:
        lines.append(f"the engine gave no usable answer: {decision.error}")
    if decision.reasons:
        lines += [f"{r.kind:4}  {r.rule}  {r.message}" for r in decision.reasons]
    elif decision.deny or decision.warn:
        if not decision.error:
            lines.append("the policy returned no reasons (no rule names); its messages:")
        lines += [f"deny  {message}" for message in decision.deny]
        lines += [f"warn  {message}" for message in decision.warn]
    lines += [
        f"wait  {r.rule or '-'}  {r.reason} (approvers {', '.join(r.approvers)}, "
        f"{r.timeout_seconds} s)"
        for r in decision.approval
    ]
    if not decision.deny and not decision.warn and not decision.approval:
        lines.append("no deny or warn rule fired")
    return lines


OPA_EXPLAIN_MODES = ("fails", "full", "notes", "debug")


def opa_explain(
    url: str,
    policy_path: str,
    policy_input: dict[str, Any],
    *,
    mode: str = "fails",
    token: str | None = None,
    timeout: float = 10.0,
) -> list[str]:
    """OPA's own trace of the decision: ``POST /v1/data/<path>?explain=<mode>&pretty=true``.

    ``fails`` (the default) lists the rules entered and the expressions that failed;
    ``full`` every step; ``notes`` only ``trace()`` calls, so it is empty for a policy
    that makes none.
    """
    if mode not in OPA_EXPLAIN_MODES:
        raise ValueError(f"explain mode must be one of {OPA_EXPLAIN_MODES}, got {mode!r}")
    target = (
        f"{url.rstrip('/')}/v1/data/{policy_path.strip('/')}"
        f"?explain={mode}&pretty=true&strict-builtin-errors=true"
    )
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        target, data=json.dumps({"input": policy_input}).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return [f"OPA answered HTTP {exc.code}: {exc.read().decode(errors='replace').strip()}"]
    except (OSError, ValueError) as exc:
        return [f"cannot ask OPA for an explanation: {exc}"]
    explanation = body.get("explanation") if isinstance(body, dict) else None
    lines = [line for line in explanation or [] if isinstance(line, str) and line.strip()]
    if not lines:
        return [f"(OPA gave no explanation in {mode!r} mode)"]
    return lines


@contextlib.contextmanager
def temporary_opa_server(opa: str, policy_dir: Path, timeout: float = 30.0) -> Iterator[str]:
    """``opa run --server`` on a free loopback port with DIR loaded; yields its URL.

    Raises :class:`EngineError` (``unreachable``) with the end of OPA's log when it
    does not come up; the server is stopped on exit either way.
    """
    from prefect_governance.cli.local import free_port, spawn, stop, wait_http

    workdir = Path(tempfile.mkdtemp(prefix="governance-opa-"))
    log = workdir / "opa.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = spawn(
        [opa, "run", "--server", "--addr", f"127.0.0.1:{port}", str(policy_dir)],
        os.environ,
        log,
    )
    try:
        try:
            wait_http(f"{url}/health", timeout, process)
        except (RuntimeError, TimeoutError) as exc:
            tail = log.read_text(errors="replace").strip()[-2000:]
            raise EngineError(
                "unreachable", f"the temporary OPA server did not start ({exc}): {tail}"
            ) from exc
        yield url
    finally:
        stop(process)
        shutil.rmtree(workdir, ignore_errors=True)
