"""Attack: the embedded engine (OPA's Go SDK in-process, through ctypes).

Written from the public surface only (EmbeddedEngine, decide_sync, native's
open_handles/panic_check), as a policy author, a flow-run parameter author and the
flow's own code would attack it. Each test fails if its door opens (again).

The promise under attack: every decision is the policy's own answer for its own
input, labelled with the revision that produced it; any failure of the engine is a
refusal with its reason, within the deadline, and the process survives it.

Anything that could hang or exhaust memory runs in a child process under a
watchdog, so a door that opens fails its test instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from prefect_governance.core.decision import decide_sync
from prefect_governance.core.engines import native
from prefect_governance.core.engines.base import EngineError
from prefect_governance.core.engines.embedded import EmbeddedEngine, policy_files, policy_revision

ROOT = Path(__file__).resolve().parents[2]


def _policy(directory: Path, text: str, name: str = "p.rego") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def _isolated(
    code: str, *, timeout: float, max_rss_mb: int = 1500, env: dict[str, str] | None = None
) -> tuple[str, str]:
    """Run ``code`` in a fresh interpreter; (outcome, output). Kill it on a hang or a bloat.

    outcome is "exited:<rc>", "hung" (still running after ``timeout``) or "bloated"
    (its resident memory passed ``max_rss_mb``).
    """
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    outcome = "hung"
    ends = time.monotonic() + timeout
    while time.monotonic() < ends:
        if process.poll() is not None:
            outcome = f"exited:{process.returncode}"
            break
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
            line = next(ln for ln in status.splitlines() if ln.startswith("VmRSS"))
            rss_kb = int(line.split()[1])
        except (OSError, StopIteration, ValueError):
            rss_kb = 0
        if rss_kb > max_rss_mb * 1024:
            outcome = "bloated"
            break
        time.sleep(0.05)
    if process.poll() is None:
        process.kill()
    output, _ = process.communicate(timeout=30)
    return outcome, output


# --- the deadline -----------------------------------------------------------------


def test_a_rule_that_never_ends_is_refused_near_the_timeout_and_the_engine_stays_usable(
    tmp_path,
):
    _policy(
        tmp_path,
        """\
        package p
        import rego.v1
        forever contains x if { some x in numbers.range(1, 1000000000000) }
        loops := {"allow": count(forever) > 0}
        walks := {"allow": count([x | walk([[y | some y in numbers.range(1, 100000)] |
            some _ in numbers.range(1, 100000)], x)]) > 0}
        fine := {"allow": true}
        """,
    )
    engine = EmbeddedEngine(tmp_path, reload_interval=0, timeout=0.5)
    for rule in ("p/loops", "p/walks"):
        started = time.monotonic()
        decision = decide_sync(engine, rule, {})
        took = time.monotonic() - started
        assert decision.verdict == "refused", (rule, decision)
        assert "(timeout)" in decision.deny[0], decision.deny
        assert took < 0.5 + 1.5, f"{rule}: refused only after {took:.1f}s (timeout 0.5s)"
        after = decide_sync(engine, "p/fine", {})
        assert after.verdict == "allowed", "the engine is usable after a timed-out decision"
    assert native.open_handles() >= 1


@pytest.mark.parametrize("where", ["input"])
def test_the_deadline_covers_the_whole_decision_not_only_the_rule(tmp_path, where):
    """A 1 s deadline and a decision whose time goes into reading the input (two million
    tiny objects, ~25 MB of JSON, a trivial rule) or into handing back the result
    (a rule done within the deadline whose result is ~250 MB of strings).

    The worker caps a run's parameters (max_parameter_bytes), so the input case is the
    engine's own contract; the result case is the policy author's. Found: the library's
    timer runs only around Eval (not the input's parsing, the query's first preparation,
    the result's encoding, nor its decoding here), so the decision takes several times
    the timeout, and, called inline from the worker's event loop, stalls the worker.
    The "result" case took 2.4-7.5 s alone but sometimes under 2.5 s in a process whose
    Go heap had already grown: not kept as a parameter (a test must not be a coin toss).
    """
    _policy(
        tmp_path,
        """\
        package p
        import rego.v1
        result := {"allow": true}
        big := sprintf("%09999d", [1])
        bulky := {"allow": true, "annotations": {"s": [big | some _ in numbers.range(1, 25000)]}}
        """,
    )
    engine = EmbeddedEngine(tmp_path, reload_interval=0, timeout=1.0)
    if where == "input":
        rule, policy_input = "p/result", {"rows": [{"k": i} for i in range(2_000_000)]}
    else:
        rule, policy_input = "p/bulky", {}
    started = time.monotonic()
    decision = decide_sync(engine, rule, policy_input)
    took = time.monotonic() - started
    assert took < 1.0 + 1.5, f"a 1s-deadline decision took {took:.1f}s ({decision.verdict})"


# --- policy files a policy author can plant ----------------------------------------


@pytest.mark.parametrize(
    "plant",
    [
        pytest.param("os.mkfifo(d / 'q.rego')", id="fifo-named-like-a-module"),
        pytest.param("os.symlink('/dev/zero', d / 'q.rego')", id="symlink-to-dev-zero"),
    ],
)
def test_a_module_that_cannot_be_read_is_a_refusal_not_a_hang(plant):
    """A policy file that blocks (a FIFO) or never ends (/dev/zero) when read.

    Expected: the decision is refused with its reason within seconds and the process
    survives. Found: the reload reads it with no deadline, so the decision (and,
    from the worker's event loop, the whole worker) hangs, or grows without bound.
    """
    outcome, output = _isolated(
        f"""
        import os, tempfile, time
        from pathlib import Path
        from prefect_governance.core.decision import decide_sync
        from prefect_governance.core.engines.embedded import EmbeddedEngine
        d = Path(tempfile.mkdtemp())
        (d / "p.rego").write_text('package p\\nresult := {{"allow": true}}\\n')
        engine = EmbeddedEngine(d, reload_interval=0, timeout=1.0)
        assert decide_sync(engine, "p/result", {{}}).verdict == "allowed"
        {plant}
        started = time.monotonic()
        decision = decide_sync(engine, "p/result", {{}})
        print("VERDICT", decision.verdict, round(time.monotonic() - started, 2), decision.deny)
        """,
        timeout=10,
    )
    assert outcome == "exited:0", f"{outcome}: {output[-2000:]}"
    assert "VERDICT refused" in output, output[-2000:]


# Open: one builtin call that asks Go for more memory than the process may have
# aborts the process ("fatal error: out of memory" cannot be recovered in-process).
# The sidecar survives it (a refusal: unreachable); in-process, only isolation (a
# process of its own) or output caps inside OPA's builtins would. Kept failing, so
# that the day it holds, the xfail fails and says so.
OUT_OF_MEMORY_IS_FATAL = pytest.mark.xfail(
    strict=True, reason="Go's out-of-memory is fatal to the process: not fixed (see comment)"
)


@OUT_OF_MEMORY_IS_FATAL
@pytest.mark.parametrize(
    "rule",
    [
        pytest.param(
            'count(replace(sprintf("%01000000d", [1]), "0", sprintf("%01000000d", [1])))',
            id="replace",
        ),
        pytest.param(
            'count(strings.replace_n({"0": sprintf("%0100000d", [1])}, sprintf("%0100000d", [1])))',
            id="replace_n",
        ),
    ],
)
def test_a_rule_that_allocates_without_bound_is_a_refusal_not_a_dead_worker(rule):
    """One builtin call asked for ~1e10..1e12 bytes (a 1 MB string, each byte replaced by it).

    Expected: refused with a reason, the process survives (as with the OPA sidecar,
    whose death is an "unreachable" refusal). Found: Go's runtime aborts the whole
    process ("fatal error: out of memory", SIGABRT): nothing can catch it, and the
    worker dies with every run it was serving. Without an address-space limit it first
    takes all the host's memory. The child here runs under RLIMIT_AS = 3 GB, with a
    deadline far past the abort (~2 s here): with 3 s, a loaded CI machine let the
    deadline win the race once, and a test must not be a coin toss.
    (regex.replace on the same strings races the deadline: sometimes refused, sometimes
    the same abort; it is not kept here, as a test must not be a coin toss.)
    """
    outcome, output = _isolated(
        f"""
        import resource, tempfile, time
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))
        from pathlib import Path
        from prefect_governance.core.decision import decide_sync
        from prefect_governance.core.engines.embedded import EmbeddedEngine
        d = Path(tempfile.mkdtemp())
        (d / "p.rego").write_text(
            'package p\\nresult := {{"allow": true, "n": ' + {rule!r} + '}}\\n'
        )
        engine = EmbeddedEngine(d, reload_interval=0, timeout=60.0)
        decision = decide_sync(engine, "p/result", {{}})
        print("VERDICT", decision.verdict, decision.deny, flush=True)
        """,
        timeout=120,
        max_rss_mb=3500,
    )
    assert outcome == "exited:0", f"{outcome}: {output[:600]}"
    assert "VERDICT refused" in output, output[:600]


def test_a_symlinked_module_is_reloaded_when_its_target_changes(tmp_path):
    """A module may be a symlink (out of the tree): its edits must not go unseen."""
    outside = tmp_path / "outside"
    outside.mkdir()
    target = _policy(outside, "package evil\nallow := true\n", "evil.rego")
    tree = tmp_path / "policies"
    tree.mkdir()
    _policy(tree, "package p\nallow := true\n")
    (tree / "link.rego").symlink_to(target)
    engine = EmbeddedEngine(tree, reload_interval=0)
    assert engine.evaluate_sync("evil/allow", {}).result is True
    time.sleep(0.02)
    target.write_text("package evil\nallow := false # the edit\n")
    answer = engine.evaluate_sync("evil/allow", {})
    assert answer.result is False
    assert answer.revision == policy_revision(policy_files(tree), tree)


def test_a_module_that_stops_compiling_refuses_until_it_is_fixed(tmp_path):
    policy = _policy(tmp_path, 'package p\nresult := {"allow": true}\n')
    engine = EmbeddedEngine(tmp_path, reload_interval=0)
    assert decide_sync(engine, "p/result", {}).verdict == "allowed"
    policy.write_text('package p\nresult := {"allow": true\n')
    for _ in range(5):
        decision = decide_sync(engine, "p/result", {})
        assert decision.verdict == "refused" and "cannot load" in decision.deny[0]
    _policy(tmp_path, 'package p\nresult := {"allow": true}\n', "other.rego")  # still broken
    assert decide_sync(engine, "p/result", {}).verdict == "refused"
    policy.write_text('package p\nresult := {"allow": true, "deny": ["fixed"]}\n')
    (tmp_path / "other.rego").unlink()
    decision = decide_sync(engine, "p/result", {})
    assert decision.verdict == "refused" and decision.deny == ["fixed"]


# --- revisions and reloads ---------------------------------------------------------


def _race_edits(tmp_path: Path, threads: int, versions: int = 200):
    """Replace p.rego atomically (as git and editors do) while ``threads`` decide."""

    def text(k: int) -> str:
        return f"package p\nv := {k}\n" + "# padding\n" * (k % 3)

    def write(k: int) -> None:
        scratch = tmp_path / "p.rego.tmp"
        scratch.write_text(text(k))
        os.replace(scratch, tmp_path / "p.rego")

    revisions = {}
    for k in range(versions):
        write(k)
        revisions[policy_revision(policy_files(tmp_path), tmp_path)] = k
    assert len(revisions) == versions
    write(0)
    engine = EmbeddedEngine(tmp_path, reload_interval=0, timeout=5.0)
    stop = threading.Event()
    wrong: list[tuple[int, int | None]] = []
    failures: list[str] = []

    def decide_loop() -> None:
        while not stop.is_set():
            try:
                answer = engine.evaluate_sync("p/v", {})
            except EngineError as exc:
                failures.append(str(exc))
                continue
            if revisions.get(answer.revision) != answer.result:
                wrong.append((answer.result, revisions.get(answer.revision)))

    workers = [threading.Thread(target=decide_loop) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for k in range(1, versions):
        write(k)
        time.sleep(0.005)
    time.sleep(0.2)
    stop.set()
    for worker in workers:
        worker.join()
    time.sleep(0.2)
    return engine, revisions, versions - 1, wrong, failures


def test_a_policy_edited_while_threads_decide_labels_each_answer_with_its_own_revision(
    tmp_path,
):
    """The revision in an answer must be that of the modules that produced it.

    Found: answers produced by version k carry the revision of version k+1 (or later),
    and after the edits stop the engine can stay on an old version for good while
    labelling every answer with the revision on disk: a policy edit (a new deny)
    silently never takes effect, and the lineage records a revision that did not
    decide. (One deciding thread hits it too, in about half the runs: not kept, as a
    test must not be a coin toss; 16 threads hit it every time.)
    """
    engine, revisions, last, wrong, failures = _race_edits(tmp_path, 16)
    assert failures == [], failures[:3]  # atomic replacement: never a half-written module
    final = engine.evaluate_sync("p/v", {})
    assert (final.result, revisions.get(final.revision)) == (last, last), (
        f"the files on disk are version {last}; the engine answers with version "
        f"{final.result} under the revision of version {revisions.get(final.revision)}"
    )
    assert wrong == [], (
        f"{len(wrong)} answers carried another version's revision, "
        f"e.g. (produced by, labelled as): {sorted(set(wrong))[:8]}"
    )


def test_hundreds_of_reloads_release_their_compiled_policies():
    """600 reloads: no compiled policy kept, no memory growth (in a fresh process, so
    other tests' garbage does not blur the measure)."""
    outcome, output = _isolated(
        """
        import tempfile
        from pathlib import Path
        from prefect_governance.core.engines import native
        from prefect_governance.core.engines.embedded import EmbeddedEngine
        d = Path(tempfile.mkdtemp())
        policy = d / "p.rego"
        policy.write_text("package p\\nv := -1\\n")
        engine = EmbeddedEngine(d, reload_interval=0)
        assert engine.evaluate_sync("p/v", {}).result == -1
        handles = native.open_handles()
        def rss_kb():
            status = Path("/proc/self/status").read_text()
            line = next(ln for ln in status.splitlines() if ln.startswith("VmRSS"))
            return int(line.split()[1])
        def reload(k):
            policy.write_text(
                f"package p\\nv := {k}\\nbig := [x | some x in numbers.range(1, {k})]\\n"
            )
            assert engine.evaluate_sync("p/v", {}).result == k, k
        for k in range(100):
            reload(k)
        before = rss_kb()
        for k in range(100, 700):
            reload(k)
        print("HANDLES", handles, native.open_handles(), "GROWTH_MB", (rss_kb() - before) // 1024)
        assert native.open_handles() == handles, "old compiled policies are released"
        assert rss_kb() - before < 64 * 1024, "memory grew"
        """,
        timeout=120,
    )
    assert outcome == "exited:0", f"{outcome}: {output[-1500:]}"


# --- one engine, many threads ------------------------------------------------------


def test_sixteen_threads_a_thousand_decisions_each_get_their_own_answers(tmp_path):
    _policy(
        tmp_path,
        """\
        package p
        import rego.v1
        echo := {"n": input.n, "square": input.n * input.n, "tag": concat("/", [input.tag, "x"]),
                 "keys": object.keys(input.extra)}
        """,
    )
    engine = EmbeddedEngine(tmp_path, reload_interval=0)
    crossed: list[tuple[int, int]] = []

    def thread(t: int) -> None:
        for i in range(1000):
            n = t * 100_000 + i
            extra = {f"k{t}-{i}-{j}": j for j in range(i % 4)}
            answer = engine.evaluate_sync("p/echo", {"n": n, "tag": f"t{t}i{i}", "extra": extra})
            expected = {"n": n, "square": n * n, "tag": f"t{t}i{i}/x", "keys": sorted(extra)}
            result = dict(answer.result, keys=sorted(answer.result["keys"]))
            if result != expected:
                crossed.append((t, i))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(thread, range(16)))
    assert crossed == [], f"{len(crossed)} answers were another input's"


# --- inputs a parameter author controls --------------------------------------------


def test_hostile_inputs_are_answered_faithfully_or_refused(tmp_path):
    _policy(
        tmp_path,
        """\
        package p
        import rego.v1
        deny contains "too many rows" if input.rows > 1000
        deny contains "not a number" if not is_number(input.rows)
        result := {"allow": true, "deny": deny}
        big_equal if input.rows == 1180591620717411303425
        echo := input
        """,
    )
    engine = EmbeddedEngine(tmp_path, reload_interval=0)
    # beyond 64 bits: compared exactly inside the policy
    assert engine.evaluate_sync("p/big_equal", {"rows": 2**70 + 1}).result is True
    assert engine.evaluate_sync("p/big_equal", {"rows": 2**70}).result is None
    assert decide_sync(engine, "p/result", {"rows": 10**400}).verdict == "refused"
    # NaN and infinities are no number the policy can compare: never an allow
    for value in (float("nan"), float("inf"), float("-inf")):
        decision = decide_sync(engine, "p/result", {"rows": value})
        assert decision.verdict == "refused", (value, decision)
    # NUL bytes survive; keys that are not strings become strings
    assert engine.evaluate_sync("p/echo", {"s": "a\x00b"}).result == {"s": "a\x00b"}
    assert engine.evaluate_sync("p/echo", {1: "a", None: "b"}).result == {"1": "a", "null": "b"}
    # 10k levels of nesting: refused with a reason, and the engine is still usable
    nested: object = 1
    for _ in range(10_000):
        nested = [nested]
    decision = decide_sync(engine, "p/result", {"rows": 1, "deep": nested})
    assert decision.verdict == "refused" and decision.deny, decision
    assert decide_sync(engine, "p/result", {"rows": 1}).verdict == "allowed"


@pytest.mark.xfail(
    strict=True,
    reason="open, as in OPA's server (the sidecar reads the same JSON the same way); the "
    "worker refuses such parameters before any policy is asked",
)
def test_a_lone_surrogate_is_not_silently_turned_into_another_string(tmp_path):
    """'\\ud800' arrives in the policy as U+FFFD: a policy comparing strings sees another.

    Expected: the exact string, or a refusal. (The worker's envelope may refuse such
    parameters earlier; this is the engine's own contract.)
    """
    _policy(tmp_path, 'package p\nresult := {"allow": input.name != "\\ufffd"}\n')
    engine = EmbeddedEngine(tmp_path, reload_interval=0)
    decision = decide_sync(engine, "p/result", {"name": "\ud800"})
    assert decision.verdict in ("allowed", "refused")
    assert not (decision.verdict == "refused" and not decision.error), (
        "the policy refused '\\ud800' as if it were '\\ufffd': the input was rewritten"
    )


@pytest.mark.parametrize(
    "path",
    [
        'p/"allow',
        'p/allow"] = true; x := data["p',
        "p/../q/allow",
        "../p/secret",
        "p/ällow",
        "p/allow\x00",
        "p.allow",
        "p/allow[0]",
        "data.p.secret",
    ],
)
def test_a_policy_path_cannot_reach_another_document(tmp_path, path):
    _policy(tmp_path, 'package p\nallow := {"allow": true}\nsecret := {"allow": true}\n')
    engine = EmbeddedEngine(tmp_path, reload_interval=0)
    decision = decide_sync(engine, path, {})
    assert decision.verdict == "refused", (path, decision)


def test_a_policy_path_with_empty_parts_names_the_same_document(tmp_path):
    _policy(tmp_path, 'package p\nallow := {"allow": true}\n')
    engine = EmbeddedEngine(tmp_path, reload_interval=0)
    for path in ("p/allow", "p//allow", "/p/allow/"):
        assert decide_sync(engine, path, {}).verdict == "allowed", path
    for path in ("", "/", "//"):
        assert decide_sync(engine, path, {}).verdict == "refused", path


# --- what a policy can see and do --------------------------------------------------


def test_a_policy_cannot_read_the_workers_environment(tmp_path):
    """opa.runtime() in the worker: no env (the sidecar's shows the sidecar's own env).

    In a child started with the secrets in its environment: the Go runtime copies the
    environment the process started with, so a variable set later would prove nothing.
    """
    planted = "lineage-key-planted-" + os.urandom(8).hex()
    _policy(
        tmp_path,
        """\
        package p
        answer := {"runtime": opa.runtime(), "env": object.get(opa.runtime(), "env", null)}
        """,
    )
    outcome, output = _isolated(
        f"""
        import json, os
        from pathlib import Path
        from prefect_governance.core.engines.embedded import EmbeddedEngine
        assert os.environ["PREFECT_GOVERNANCE_LINEAGE_KEY"] == {planted!r}
        engine = EmbeddedEngine(Path({str(tmp_path)!r}), reload_interval=0)
        print("ANSWER", json.dumps(engine.evaluate_sync("p/answer", {{}}).result))
        """,
        timeout=30,
        env={"PREFECT_GOVERNANCE_LINEAGE_KEY": planted, "PREFECT_API_KEY": "pnu_" + planted},
    )
    assert outcome == "exited:0" and "ANSWER" in output, output
    assert planted not in output, f"a policy read the worker's secrets: {output}"
    assert '"env": null' in output or '"env": {}' in output, output


def test_print_and_trace_do_not_leak_the_input_to_the_workers_output(tmp_path):
    outcome, output = _isolated(
        """
        import tempfile
        from pathlib import Path
        from prefect_governance.core.engines.embedded import EmbeddedEngine
        d = Path(tempfile.mkdtemp())
        (d / "p.rego").write_text(
            'package p\\nimport rego.v1\\n'
            'x if { print("PRINTED", input); trace("TRACED"); true }\\n'
        )
        print("RESULT", EmbeddedEngine(d).evaluate_sync("p/x", {"s": "planted-9f2"}).result)
        """,
        timeout=30,
    )
    assert outcome == "exited:0", output
    assert "RESULT True" in output
    assert "planted-9f2" not in output, output


# --- failures of the engine itself -------------------------------------------------


def test_a_go_panic_is_an_error_and_the_engine_goes_on(tmp_path):
    _policy(tmp_path, 'package p\nresult := {"allow": true}\n')
    engine = EmbeddedEngine(tmp_path, reload_interval=0)
    for _ in range(3):
        error = native.panic_check()  # the library panics on purpose, behind its guard
        assert isinstance(error, native.NativeError) and "panicked" in str(error), error
    assert decide_sync(engine, "p/result", {}).verdict == "allowed"


def test_a_python_failure_inside_the_decision_is_a_refusal_and_an_interrupt_is_not(tmp_path):
    _policy(tmp_path, 'package p\nresult := {"allow": true}\n')
    engine = EmbeddedEngine(tmp_path, reload_interval=0)

    class Hostile:
        def __init__(self, exc: BaseException):
            self.exc = exc

        def __str__(self) -> str:
            raise self.exc

    class Odd(BaseException):
        pass

    for exc in (ValueError("boom"), MemoryError(), RecursionError(), Odd("odd")):
        decision = decide_sync(engine, "p/result", {"x": Hostile(exc)})
        assert decision.verdict == "refused", (exc, decision)
        assert type(exc).__name__ in decision.deny[0], decision.deny
    with pytest.raises(KeyboardInterrupt):
        decide_sync(engine, "p/result", {"x": Hostile(KeyboardInterrupt())})
    assert decide_sync(engine, "p/result", {}).verdict == "allowed"


# --- fork without exec -------------------------------------------------------------


@pytest.mark.parametrize("how", ["same-engine", "new-engine", "decide"])
def test_a_forked_child_gets_a_clear_error_within_seconds(how):
    outcome, output = _isolated(
        f"""
        import os, sys, tempfile, time
        from pathlib import Path
        from prefect_governance.core.decision import decide_sync
        from prefect_governance.core.engines.embedded import EmbeddedEngine
        d = Path(tempfile.mkdtemp())
        (d / "p.rego").write_text('package p\\nresult := {{"allow": true}}\\n')
        engine = EmbeddedEngine(d, reload_interval=0)
        assert engine.evaluate_sync("p/result", {{}}).result == {{"allow": True}}
        pid = os.fork()
        if pid == 0:
            try:
                if "{how}" == "same-engine":
                    engine.evaluate_sync("p/result", {{}})
                elif "{how}" == "new-engine":
                    EmbeddedEngine(d).evaluate_sync("p/result", {{}})
                else:
                    decision = decide_sync(engine, "p/result", {{}})
                    print("CHILD", decision.verdict, decision.deny, flush=True)
                    os._exit(0 if decision.verdict == "refused" else 3)
                print("CHILD allowed", flush=True)
                os._exit(3)
            except BaseException as exc:
                print("CHILD", type(exc).__name__, exc, flush=True)
                os._exit(0 if "fork" in str(exc) else 4)
        ends = time.monotonic() + 8
        while time.monotonic() < ends:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
            print("CHILD HUNG", flush=True)
            sys.exit(5)
        assert os.waitstatus_to_exitcode(status) == 0, status
        assert engine.evaluate_sync("p/result", {{}}).result == {{"allow": True}}
        print("PARENT OK")
        """,
        timeout=20,
    )
    assert outcome == "exited:0", f"{outcome}: {output}"
    assert "PARENT OK" in output and "fork" in output, output


# --- end to end: a governed worker with an embedded policy that misbehaves ---------

E2E_RULES = """\
package prefect.governance.rules.attack

import rego.v1

# Would deny nothing if it ever ended: only the deadline can refuse these runs.
deny contains "never reached" if {
	input.envelope.parameters.table == "forever"
	some x in numbers.range(1, 1000000000000)
	x < 0
}

# One builtin call asking for ~1e12 bytes.
deny contains message if {
	input.envelope.parameters.table == "boom"
	big := sprintf("%01000000d", [1])
	message := sprintf("%d", [count(replace(big, "0", big))])
}
"""


def _e2e_pool(gov, pool: str, agent: str, timeout: float) -> None:
    """The pool (no store named: the worker's own in its home) on an embedded engine whose
    policies hold the attack rules, and its agent."""
    import asyncio
    import shutil

    from prefect_governance.testing import create_pool
    from prefect_governance.worker.blocks import GovernanceAgent

    policies = gov.workdir / "policies"
    shutil.copytree(ROOT / "policies" / "prefect", policies / "prefect")
    (policies / "prefect" / "governance" / "rules" / "attack.rego").write_text(E2E_RULES)

    async def create() -> None:
        await gov.save_agent(
            GovernanceAgent(
                id=agent,
                owner="sec@example.com",
                trust_scope=[pool],
                capabilities=["read:warehouse"],
            ),
            agent,
        )
        engine = await gov.save_engine(
            f"{pool}-engine", policy_dir=str(policies), timeout_seconds=timeout
        )
        await create_pool(pool, engine=engine, overwrite=True)

    asyncio.run(create())


def _e2e_runs(pool: str, agent: str, tables: list[str], tmp: Path, worker=None) -> dict:
    """Deploy, start one run per table (in order), wait for them all; (run, marker) by name."""
    import asyncio

    from prefect import get_client

    from prefect_governance.testing import deploy_example, wait_final

    async def go() -> dict:
        deployment = await deploy_example(
            f"{pool}-flow", pool, {"agent": agent, "capabilities": ["read:warehouse"]}
        )
        runs = {}
        async with get_client() as client:
            for i, table in enumerate(tables):
                marker = tmp / f"{i}-{table}.ran"
                run = await client.create_flow_run_from_deployment(
                    deployment, parameters={"rows": 1, "table": table, "marker": str(marker)}
                )
                runs[f"{i}-{table}"] = (run.id, marker)
        ids = [run_id for run_id, _ in runs.values()]
        ends = time.monotonic() + 180
        while True:  # until all are final, or the worker is dead (then nothing will be)
            final = await wait_final(ids, timeout=5)
            settled = all(r.state and r.state.is_final() for r in final.values())
            dead = worker is not None and worker.poll() is not None
            if settled or dead or time.monotonic() > ends:
                break
        return {name: (final[run_id], marker) for name, (run_id, marker) in runs.items()}

    return asyncio.run(go())


@pytest.mark.e2e
def test_e2e_a_policy_that_never_ends_refuses_by_the_deadline_and_the_worker_serves_on(
    prefect_server, tmp_path
):
    from tests.agents import harness

    pool, agent = "attack-embedded-forever", "embedded-forever-agent"
    with harness(prefect_server, tmp_path) as gov:
        _e2e_pool(gov, pool, agent, timeout=1.0)
        worker = gov.start_worker(pool, log=tmp_path / "w.log")
        try:
            runs = _e2e_runs(
                pool, agent, ["forever", "orders", "forever", "orders"], tmp_path, worker
            )
            alive = worker.poll() is None
        finally:
            gov.stop_workers()
    log = (tmp_path / "w.log").read_text(errors="replace")[-3000:]
    for name, (run, marker) in runs.items():
        if name.endswith("forever"):
            assert run.state.name == "Refused", (name, run.state, log)
            assert "timeout" in run.state.message, run.state.message
            assert not marker.exists(), f"{name}: the refused run's body ran"
        else:
            assert run.state.is_completed(), (name, run.state, log)
            assert marker.exists(), f"{name}: the allowed run did not run"
    assert alive, f"the worker died: {log}"


@OUT_OF_MEMORY_IS_FATAL
@pytest.mark.e2e
def test_e2e_a_policy_that_allocates_without_bound_does_not_kill_the_worker(
    prefect_server, tmp_path
):
    """Expected: the 'boom' run is refused, the next run is served. Found: Go's fatal
    out-of-memory aborts the worker; the run is never settled and nothing after it runs.
    The worker runs under a 3 GB address-space limit (as a container's memory limit
    would bound it; it also keeps the host's memory): Go allocates ~1-3 GB/s here, so
    the abort comes ~2 s in. The deadline is set far past it (30 s) so that a loaded
    machine cannot let the deadline win the race. (With 1 s and 6 GB the deadline wins.)
    """
    from prefect_governance.cli.local import prefect_env, spawn, stop
    from tests.agents import harness

    pool, agent = "attack-embedded-boom", "embedded-boom-agent"
    with harness(prefect_server, tmp_path) as gov:
        _e2e_pool(gov, pool, agent, timeout=30.0)
    log = tmp_path / "w.log"
    # Started by hand, not by the harness: under an address-space limit (prlimit).
    limited = ["prlimit", f"--as={3 * 2**30}", sys.executable, "-m", "prefect"]
    worker = spawn(
        [*limited, "worker", "start", "--pool", pool],
        prefect_env(prefect_server.home, prefect_server.api_url),
        log,
    )
    try:
        runs = _e2e_runs(pool, agent, ["boom", "orders"], tmp_path, worker)
        alive = worker.poll() is None
    finally:
        stop(worker)
    text = log.read_text(errors="replace")
    died = "fatal error: out of memory" in text
    (boom, boom_marker), (orders, orders_marker) = runs["0-boom"], runs["1-orders"]
    assert not boom_marker.exists(), "the run whose policy blew up executed"
    assert alive and not died, f"the worker died: {text[:1500]}"
    assert boom.state.name == "Refused", boom.state
    assert orders.state.is_completed() and orders_marker.exists(), orders.state


@pytest.mark.parametrize("source", ["env", "files"])
def test_a_policy_cannot_use_the_workers_environment_or_files_as_credentials(tmp_path, source):
    """http.send's tls_client_{cert,key}_env_variable / _file read the worker's own
    environment and files: a policy can present the worker's client certificate (its
    mTLS identity, e.g. towards OPA or any service that trusts it) to a server of its
    choosing, and learn which of the worker's variables and files exist.

    Expected: a policy reads nothing of the worker's process but its input (the embedded
    engine's opa.runtime() already shows no env). Found: the loopback server below
    receives the worker's certificate, taken from the worker's files or from the
    environment the worker process started with (the Go runtime's copy of it).
    """
    import socket
    import ssl

    from tests.security_support import make_pki

    pki = make_pki(tmp_path / "pki")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    context.verify_mode = ssl.CERT_OPTIONAL
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    presented: list[object] = []

    def serve() -> None:
        listener.settimeout(20)
        try:
            raw, _ = listener.accept()
        except OSError:
            return
        try:
            with context.wrap_socket(raw, server_side=True) as tls:
                presented.append(tls.getpeercert())
                tls.recv(4096)
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        except (OSError, ssl.SSLError):
            presented.append(None)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    credentials = (
        {
            "tls_client_cert_env_variable": "PLANTED_WORKER_CERT",
            "tls_client_key_env_variable": "PLANTED_WORKER_KEY",
        }
        if source == "env"
        else {
            "tls_client_cert_file": str(pki.client_cert),
            "tls_client_key_file": str(pki.client_key),
        }
    )
    request = {
        "method": "GET",
        "url": f"https://127.0.0.1:{port}/",
        "tls_ca_cert_file": str(pki.ca),
        "raise_error": False,
        "timeout": "3s",
        **credentials,
    }
    policies = tmp_path / "policies"
    policies.mkdir()
    _policy(policies, f"package p\nanswer := http.send({json.dumps(request)})\n")
    _, output = _isolated(
        f"""
        from pathlib import Path
        from prefect_governance.core.engines.embedded import EmbeddedEngine
        engine = EmbeddedEngine(Path({str(policies)!r}), reload_interval=0)
        try:
            print("ANSWER", engine.evaluate_sync("p/answer", {{}}).result)
        except Exception as exc:
            print("ERROR", exc)
        """,
        timeout=30,
        env={
            "PLANTED_WORKER_CERT": pki.client_cert.read_text(),
            "PLANTED_WORKER_KEY": pki.client_key.read_text(),
        },
    )
    listener.close()
    server.join(timeout=25)
    identities = [
        dict(part[0] for part in cert["subject"]).get("commonName") for cert in presented if cert
    ]
    assert "governance-worker" not in identities, (
        f"a policy presented the worker's client certificate ({source}): {identities}; {output}"
    )


def test_a_child_forked_past_pythons_fork_hooks_gets_an_error_not_a_hang():
    """libc's fork() called directly (ctypes, or a C extension) skips os.register_at_fork.

    Low severity (the forking code is the flow's own), but the promise is "never a
    hang". Expected: a clear error in the child. Found: the child's evaluations hang
    (Go's runtime lost its threads), here within 200 decisions that allocate.
    """
    outcome, output = _isolated(
        """
        import ctypes, os, sys, tempfile, time
        from pathlib import Path
        from prefect_governance.core.engines.embedded import EmbeddedEngine
        d = Path(tempfile.mkdtemp())
        (d / "p.rego").write_text(
            "package p\\nimport rego.v1\\nv := count([x | some x in numbers.range(1, 200000)])\\n"
        )
        engine = EmbeddedEngine(d, reload_interval=0)
        engine.evaluate_sync("p/v", {})
        pid = ctypes.CDLL(None).fork()
        if pid == 0:
            try:
                for _ in range(200):
                    engine.evaluate_sync("p/v", {"pad": "x" * 100000})
                print("CHILD answered", flush=True)
                os._exit(3)
            except BaseException as exc:
                print("CHILD", type(exc).__name__, exc, flush=True)
                os._exit(0 if "fork" in str(exc) else 4)
        ends = time.monotonic() + 10
        while time.monotonic() < ends:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
            print("CHILD HUNG", flush=True)
            sys.exit(5)
        sys.exit(os.waitstatus_to_exitcode(status))
        """,
        timeout=30,
    )
    assert outcome == "exited:0", f"{outcome}: {output}"
