"""OPA's conformance suite, run through the embedded engine (issue 16, part 3).

The cases are OPA's own: ``v1/test/cases/testdata/v1/**/*.yaml`` in the OPA Go module
the native library is built from (``native/go.mod``), never copied here. They are
read by OPA itself: one ``opa eval`` (the reference binary, the same version) turns
every file into JSON with ``yaml.unmarshal``, the function OPA's case loader
(``util.Unmarshal``) uses, so YAML's rules and every number's text are OPA's. The
engine under test does not read its own test cases.

Each case is then run the way the product runs a policy, through
:class:`~prefect_governance.core.engines.native.Policy` and ``Policy.query``: modules
named ``test-N.rego`` as OPA's runner names them, the case's data and input passed as
the JSON text OPA's loader made of them (the data's top-level values as
``orjson.Fragment``, so no number goes through a float), strict builtin errors always
(the product's setting). Results are
compared as OPA's runner (``v1/topdown/exported_test.go``, ``testAssertResultSet``)
compares them: a *set* of binding objects, numbers compared by value and exactly
(JSON numbers are read as :class:`~decimal.Decimal`, never float), binding arrays
compared as multisets under ``sort_bindings``, ``__localq*`` bindings dropped under
``ignore_generated_vars``.

Two differences between the SDK's ``rego`` API (what the product calls) and the bare
``topdown`` query OPA's runner calls are translated, not counted:

* ``rego`` captures the value of an expression that is a term (``data.test.p``,
  ``1 > 2``) and returns a result whose value is ``false`` where ``topdown`` fails the
  expression. A result with a ``false`` expression value is therefore "undefined"
  here, as it is for OPA's runner.
* ``rego`` leaves generated variables out of the bindings; OPA's expected results
  never name one.

Classes: ``same`` (OPA's expected result; or OPA expects an error and we raise one),
``refused`` (we raise where OPA expects a result: the product turns an error into a
refusal, failing closed), ``different`` (a result that is not OPA's, or a result where
OPA expects an error), ``not applicable`` (the case cannot be given to the product as
it is written: an ``input_term`` that is not plain JSON, e.g. a set; ``env``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from prefect_governance.core.engines.native import NativeError, Policy

ROOT = Path(__file__).resolve().parent.parent
NATIVE = ROOT / "native"
OPA_MODULE = "github.com/open-policy-agent/opa"
CASES_DIR = Path("v1", "test", "cases", "testdata", "v1")
# A case's deadline: far above any case's cost (the slowest takes well under a second),
# so a timeout would be a finding, not noise.
TIMEOUT = 30.0

SAME, REFUSED, DIFFERENT, NOT_APPLICABLE = "same", "refused", "different", "not applicable"
# The builtins the embedded engine does not offer (native/main.go's `withheld`): they
# would act with the worker's network identity and files. A case calling one is not
# applicable, and counted as such.
WITHHELD = ("http.send", "net.lookup_ip_addr")
CLASSES = (SAME, REFUSED, DIFFERENT, NOT_APPLICABLE)

# Read by `opa eval`: every case file as OPA reads it, and the exact JSON text of each
# case's data (per top-level key) and input, and the parsed AST of an input_term.
LOADER = """
package conformance

cases := [c |
	some path, text in input.files
	some i, raw in yaml.unmarshal(text).cases
	c := {
		"file": path,
		"index": i,
		"case": raw,
		"input_json": input_json(raw),
		"data_json": data_json(raw),
		"input_ast": input_ast(raw),
	}
]

input_json(raw) := json.marshal(raw.input) if raw.input != null
else := null

data_json(raw) := {k: json.marshal(v) | some k, v in raw.data} if raw.data != null
else := null

input_ast(raw) := parsed.rules[0].head.value if {
	raw.input_term != null
	parsed := rego.parse_module("term.rego", concat("", ["package t\\nx := ", raw.input_term]))
} else := null
"""


class Unavailable(Exception):
    """A real part the suite needs is not here (go, the OPA module, the opa binary)."""


def opa_module_dir() -> Path:
    """The OPA Go module's directory, as the native build resolves it."""
    go = shutil.which("go")
    if go is None:
        raise Unavailable("the go toolchain (it builds the native library)")
    command = [go, "list", "-m", "-f", "{{.Dir}}", OPA_MODULE]
    listed = subprocess.run(command, cwd=NATIVE, capture_output=True, text=True)
    directory = listed.stdout.strip()
    if listed.returncode != 0 or not directory:
        raise Unavailable(
            f"the OPA Go module (`go mod download` in native/): {listed.stderr.strip()}"
        )
    return Path(directory)


def module_version(module_dir: Path) -> str:
    """``v1.22.2`` from ``.../opa@v1.22.2``."""
    return module_dir.name.rpartition("@")[2]


def opa_binary_version(opa_bin: str) -> str:
    out = subprocess.run([opa_bin, "version"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith("Version:"):
            return "v" + line.split(":", 1)[1].strip().lstrip("v")
    raise RuntimeError(f"no version in `opa version`: {out!r}")


def loads(raw: str | bytes) -> Any:
    """JSON with every number a Decimal: exact, whatever its size or precision."""
    return json.loads(raw, parse_float=Decimal, parse_int=Decimal)


@dataclass
class Case:
    file: str  # relative to the cases directory
    index: int  # position in its file
    spec: dict[str, Any]  # the case as OPA loads it (numbers are Decimal)
    input_json: str | None  # the input's JSON text, as OPA's loader has it
    data_json: dict[str, str] | None  # each top-level data key's JSON text
    input_ast: Any  # an input_term, parsed by OPA

    @property
    def note(self) -> str:
        return str(self.spec.get("note"))


def load_cases(module_dir: Path, opa_bin: str) -> list[Case]:
    """Every case of the suite, read by ``opa eval`` in one call."""
    base = module_dir / CASES_DIR
    paths = sorted(p for p in base.rglob("*") if p.is_file())
    files = {str(p.relative_to(base)): p.read_text() for p in paths}
    with tempfile.TemporaryDirectory(prefix="conformance-") as tmp:
        loader, given = Path(tmp, "loader.rego"), Path(tmp, "input.json")
        loader.write_text(LOADER)
        given.write_bytes(orjson.dumps({"files": files}))
        evaluated = subprocess.run(
            [
                opa_bin,
                "eval",
                "--strict-builtin-errors",
                "--format",
                "json",
                "--data",
                str(loader),
                "--input",
                str(given),
                "data.conformance.cases",
            ],
            capture_output=True,
            check=False,
        )
    if evaluated.returncode != 0:
        raise RuntimeError(f"opa eval could not read the cases: {evaluated.stderr.decode()}")
    output = loads(evaluated.stdout)
    if "errors" in output or not output.get("result"):
        raise RuntimeError(f"opa eval could not read the cases: {output}")
    rows = output["result"][0]["expressions"][0]["value"]
    if {row["file"] for row in rows} != set(files):
        raise RuntimeError("opa eval read cases from fewer files than there are")
    cases = [
        Case(
            file=row["file"],
            index=int(row["index"]),
            spec=row["case"],
            input_json=row["input_json"],
            data_json=row["data_json"],
            input_ast=row["input_ast"],
        )
        for row in rows
    ]
    cases.sort(key=lambda c: (c.file, c.index))
    return cases


# ---------------------------------------------------------------------------------------
# Values compared as OPA compares them (ast.Compare): numbers by value, objects by keys.


def number_key(value: Decimal) -> tuple[int, tuple[int, ...], int]:
    """One key per numeric value (1, 1.0, 10e-1 alike), exact at any size."""
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int), f"not a finite number: {value}"
    digits = tuple(digits)
    while digits and digits[0] == 0:
        digits = digits[1:]
    if not digits:
        return (0, (), 0)
    while digits[-1] == 0:
        digits, exponent = digits[:-1], exponent + 1
    return (sign, digits, exponent)


def canon(value: Any) -> tuple:
    """A hashable, totally ordered form of a JSON value; equal iff OPA deems them equal."""
    if value is None:
        return ("null",)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, Decimal):
        return ("number", number_key(value))
    if isinstance(value, int | float):  # from a mutated test case, not from JSON
        return ("number", number_key(Decimal(str(value))))
    if isinstance(value, str):
        return ("string", value)
    if isinstance(value, list):
        return ("array", tuple(canon(item) for item in value))
    if isinstance(value, dict):
        return ("object", tuple(sorted((str(k), canon(v)) for k, v in value.items())))
    raise TypeError(f"not a JSON value: {value!r}")


def result_set(
    rows: Iterable[dict[str, Any]], *, sort_bindings: bool, ignore_generated: bool
) -> frozenset:
    """Binding maps as OPA's runner compares them: a set of objects."""
    out = set()
    for row in rows:
        bindings = {}
        for name, value in row.items():
            if ignore_generated and name.startswith("__localq"):
                continue
            if sort_bindings and isinstance(value, list):
                # OPA sorts the binding's array (util.Compare) and expects the sorted
                # order; sorting both sides is the same test.
                bindings[name] = ("array", tuple(sorted(canon(item) for item in value)))
            else:
                bindings[name] = canon(value)
        out.add(tuple(sorted(bindings.items())))
    return frozenset(out)


# ---------------------------------------------------------------------------------------
# Running a case.


@dataclass
class Outcome:
    case: Case
    verdict: str
    why: str = ""  # for refused/different/not applicable: the reason
    expected: Any = None  # OPA's answer (a want_result, or the error wanted)
    got: Any = None  # ours (the binding maps, or the error)
    error_code: str | None = None  # the code we raised, if any

    def describe(self) -> str:
        return (
            f"{self.case.file}#{self.case.index} {self.case.note!r}: {self.why}\n"
            f"    query:    {self.case.spec.get('query')}\n"
            f"    OPA:      {self.expected}\n"
            f"    embedded: {self.got}"
        )


def ast_to_json(term: dict[str, Any]) -> str | None:
    """The JSON text of a parsed input_term, or None if it is not plain JSON data."""
    kind, value = term.get("type"), term.get("value")
    if kind == "null":
        return "null"
    if kind == "boolean":
        return "true" if value else "false"
    if kind == "number":
        return str(value)  # OPA's text of the number (json.Number)
    if kind == "string":
        return json.dumps(value)
    if kind == "array":
        items = [ast_to_json(item) for item in value]
        return None if None in items else "[" + ",".join(items) + "]"  # type: ignore[arg-type]
    if kind == "object":
        pairs = []
        for key, item in value:
            if key.get("type") != "string":
                return None
            text = ast_to_json(item)
            if text is None:
                return None
            pairs.append(json.dumps(key["value"]) + ":" + text)
        return "{" + ",".join(pairs) + "}"
    return None  # a set, a reference, a call, a comprehension: not JSON data


def policy_input(case: Case) -> tuple[bytes | None, str | None]:
    """The input to give the engine, or (None, why the case is not applicable)."""
    spec = case.spec
    if spec.get("input_term") is not None:
        text = ast_to_json(case.input_ast)
        if text is None:
            return None, f"input_term is not plain JSON data: {spec['input_term']}"
        return text.encode(), None
    if case.input_json is not None:
        return case.input_json.encode(), None
    return None, None


def run_case(case: Case) -> Outcome:
    """Run one case through the embedded engine and classify it."""
    spec = case.spec
    if spec.get("env"):
        # The Go runtime in the library reads the environment once, when it loads.
        return Outcome(case, NOT_APPLICABLE, f"needs environment variables {spec['env']}")
    given, not_applicable = policy_input(case)
    if not_applicable:
        return Outcome(case, NOT_APPLICABLE, not_applicable)

    want_error = spec.get("want_error_code") is not None or spec.get("want_error") is not None
    want_result = spec.get("want_result")
    if want_error:
        expected: Any = {"code": spec.get("want_error_code"), "error": spec.get("want_error")}
    elif want_result is not None:
        expected = want_result
    elif spec.get("want_defined") is not None:
        expected = {"defined": spec["want_defined"]}
    else:
        return Outcome(case, NOT_APPLICABLE, "the case states no expectation")

    sources = [spec["query"], *(spec.get("modules") or [])]
    withheld = sorted({name for name in WITHHELD for text in sources if f"{name}(" in text})
    if withheld:
        return Outcome(case, NOT_APPLICABLE, f"calls a builtin the engine withholds: {withheld}")

    modules = [(f"test-{i}.rego", source) for i, source in enumerate(spec.get("modules") or [])]
    data = None
    if case.data_json is not None:
        data = {key: orjson.Fragment(text.encode()) for key, text in case.data_json.items()}
    try:
        policy = Policy(modules, data)
        try:
            raw = policy.query(spec["query"], given, timeout=TIMEOUT)
        finally:
            policy.close()
    except NativeError as exc:
        got_error = {"code": exc.code, "error": exc.message}
        if want_error:
            return Outcome(case, SAME, "error as expected", expected, got_error, exc.code)
        return Outcome(case, REFUSED, f"error {exc.code}", expected, got_error, exc.code)

    # rego returns a term expression's value; topdown fails an expression that is false.
    rows = [r["bindings"] for r in loads(raw) if not any(e is False for e in r["expressions"])]
    if want_error:
        return Outcome(case, DIFFERENT, "a result where OPA raises an error", expected, rows)
    if want_result is None:
        if bool(rows) == bool(spec["want_defined"]):
            return Outcome(case, SAME, "", expected, rows)
        return Outcome(case, DIFFERENT, "definedness differs", expected, rows)
    options = {
        "sort_bindings": bool(spec.get("sort_bindings")),
        "ignore_generated": bool(spec.get("ignore_generated_vars")),
    }
    if result_set(rows, **options) == result_set(want_result, **options):
        return Outcome(case, SAME, "", expected, rows)
    return Outcome(case, DIFFERENT, "another result", expected, rows)


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def counts(self) -> Counter:
        return Counter(o.verdict for o in self.outcomes)

    def of(self, verdict: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.verdict == verdict]

    def error_mismatches(self) -> list[Outcome]:
        """Expected errors we raise with another code, or without OPA's message."""
        return [
            o
            for o in self.of(SAME)
            if o.error_code is not None
            and (
                o.expected.get("code") not in (None, o.error_code)
                or (o.expected.get("error") or "") not in o.got["error"]
            )
        ]

    def summary(self) -> str:
        counts = self.counts
        lines = [
            "OPA conformance suite through the embedded engine: "
            + ", ".join(f"{counts[v]} {v}" for v in CLASSES)
            + f", {len(self.outcomes)} in all"
        ]
        expected_errors = [o for o in self.of(SAME) if o.error_code is not None]
        lines.append(
            f"  of the {len(expected_errors)} expected errors, "
            f"{len(expected_errors) - len(self.error_mismatches())} with OPA's code and message"
        )
        refused = Counter(o.error_code for o in self.of(REFUSED))
        if refused:
            lines.append(
                "  refused, by error code: " + ", ".join(f"{c} {n}" for c, n in refused.items())
            )
        not_applicable = Counter(o.why.split(":")[0] for o in self.of(NOT_APPLICABLE))
        if not_applicable:
            lines.append(
                "  not applicable: " + ", ".join(f"{n} {why}" for why, n in not_applicable.items())
            )
        converted = sum(
            1
            for o in self.outcomes
            if o.case.spec.get("input_term") is not None and o.verdict != NOT_APPLICABLE
        )
        lines.append(f"  input_term cases run with the term as its JSON text: {converted}")
        return "\n".join(lines)


def run_with_opa(case: Case, opa_bin: str, *, strict: bool) -> dict[str, Any]:
    """The case run by the reference ``opa eval``: ``{"error": code}`` or ``{"rows": [...]}``.

    The check that a refusal is OPA's own answer under strict builtin errors, not the
    embedded engine's.
    """
    given, _ = policy_input(case)
    with tempfile.TemporaryDirectory(prefix="conformance-case-") as tmp:
        bundle = Path(tmp, "policy")
        bundle.mkdir()
        for i, source in enumerate(case.spec.get("modules") or []):
            Path(bundle, f"test-{i}.rego").write_text(source)
        if case.data_json is not None:
            text = ",".join(f"{json.dumps(k)}:{v}" for k, v in case.data_json.items())
            Path(bundle, "data.json").write_text("{" + text + "}")
        command = [opa_bin, "eval", "--format", "json", "--data", str(bundle)]
        if strict:
            command.append("--strict-builtin-errors")
        if given is not None:
            Path(tmp, "input.json").write_bytes(given)
            command += ["--input", str(Path(tmp, "input.json"))]
        evaluated = subprocess.run([*command, case.spec["query"]], capture_output=True)
    output = loads(evaluated.stdout)
    if output.get("errors"):
        return {"error": output["errors"][0].get("code")}
    rows = [
        r.get("bindings") or {}
        for r in output.get("result") or []
        if not any(e["value"] is False for e in r["expressions"])
    ]
    return {"rows": rows}


def run_all(cases: Iterable[Case]) -> Report:
    return Report([run_case(case) for case in cases])
