"""The embedded engine is OPA in-process: shared by threads, bounded in time, safe
across fork, a panic is a refusal, old revisions are released, a wheel needs no Go."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from email.parser import Parser
from pathlib import Path

import pytest

import prefect_governance
from prefect_governance.core.decision import decide_sync
from prefect_governance.core.engines import EmbeddedEngine, native
from prefect_governance.core.engines.base import EngineAnswer
from tests.conftest import ROOT, missing

ECHO = """package p

allow := input.n * 2

deny contains sprintf("odd %d", [input.n]) if input.n % 2 == 1
"""
SLOW = """package q

slow := count([x | some x in numbers.range(1, 200000000)])
"""


@pytest.fixture
def echo_dir(tmp_path: Path) -> Path:
    (tmp_path / "p.rego").write_text(ECHO)
    (tmp_path / "q.rego").write_text(SLOW)
    return tmp_path


def test_one_engine_answers_many_threads_each_its_own_input(echo_dir):
    engine = EmbeddedEngine(echo_dir)

    def ask(n: int) -> tuple[int, EngineAnswer]:
        return n, engine.evaluate_sync("p", {"n": n})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(2000)))
    for n, answer in answers:
        expected_deny = [f"odd {n}"] if n % 2 else []
        assert answer.result["allow"] == 2 * n and answer.result["deny"] == expected_deny, n
    assert len({answer.revision for _, answer in answers}) == 1


def test_the_deadline_stops_an_evaluation_inside_the_library(echo_dir):
    engine = EmbeddedEngine(echo_dir, timeout=0.3)
    started = time.monotonic()
    decision = decide_sync(engine, "q/slow", {})
    took = time.monotonic() - started
    assert decision.verdict == "refused"
    assert decision.deny[0].startswith("policy engine failed (timeout)"), decision.deny
    assert 0.25 < took < 2.0, took
    assert engine.evaluate_sync("p/allow", {"n": 21}).result == 42, "the engine still answers"


def test_a_go_panic_comes_back_as_an_error_and_the_library_keeps_working(echo_dir):
    error = native.panic_check()
    assert error.code == "go_panic" and "nil map" in error.message
    assert EmbeddedEngine(echo_dir).evaluate_sync("p/allow", {"n": 1}).result == 2


class _Exploding:
    """An engine whose call raises what an extension may raise: not an Exception."""

    name = "exploding"

    def __init__(self, error: BaseException):
        self.error = error

    def evaluate_sync(self, policy_path, policy_input):
        raise self.error


def test_any_base_exception_from_the_engine_is_a_refusal_but_an_interrupt_is_not():
    class PanicException(BaseException):  # what regorus raised on a Rust panic
        pass

    decision = decide_sync(_Exploding(PanicException("boom")), "p", {})
    assert decision.verdict == "refused" and "PanicException: boom" in decision.deny[0]
    with pytest.raises(KeyboardInterrupt):
        decide_sync(_Exploding(KeyboardInterrupt()), "p", {})


def test_every_reload_releases_the_revision_it_replaces(echo_dir):
    gc.collect()
    before = native.open_handles()
    engine = EmbeddedEngine(echo_dir, reload_interval=0)
    for i in range(30):
        (echo_dir / "p.rego").write_text(ECHO.replace("input.n * 2", f"input.n * {i + 3}"))
        assert engine.evaluate_sync("p/allow", {"n": 1}).result == i + 3
    gc.collect()
    assert native.open_handles() == before + 1, "only the current revision stays compiled"
    del engine
    gc.collect()
    assert native.open_handles() == before


FORKED = """
import os, sys
from pathlib import Path
from prefect_governance.core.engines import EmbeddedEngine
from prefect_governance.core.engines.base import EngineError

engine = EmbeddedEngine(Path(sys.argv[1]))
assert engine.evaluate_sync("p/allow", {"n": 2}).result == 4
pid = os.fork()
if pid == 0:
    try:
        engine.evaluate_sync("p/allow", {"n": 2})
    except EngineError as exc:
        print("child:", exc.message, flush=True)
        os._exit(3)
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("parent:", engine.evaluate_sync("p/allow", {"n": 5}).result, flush=True)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_a_child_forked_without_exec_gets_an_error_not_a_hang(echo_dir):
    completed = subprocess.run(
        [sys.executable, "-c", FORKED, str(echo_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert completed.returncode == 3, completed.stdout + completed.stderr
    assert "child: the embedded engine cannot run in a process forked without exec" in (
        completed.stdout
    )
    assert "parent: 10" in completed.stdout, "the parent's engine still answers"


def test_the_embedded_opa_is_the_sidecars_version(opa_bin):
    printed = subprocess.run([opa_bin, "version"], capture_output=True, text=True, check=True)
    assert f"Version: {native.opa_version()}\n" in printed.stdout


def build_wheel(into: Path, env: dict[str, str] | None = None) -> Path:
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(into), str(ROOT)]
    subprocess.run(command, check=True, timeout=600, env=env)
    (wheel,) = into.glob("prefect_governance-*.whl")
    return wheel


def test_a_wheel_carries_the_library_and_decides_without_go(tmp_path):
    """Build the wheel as a release would, then use it where no Go is on the PATH.

    The image installs the package, not the source tree, so the wheel must hold every
    subpackage and the policy library (the editable install of the tests would hide a
    missing one)."""
    if shutil.which("go") is None:
        missing("Go (building the wheel compiles the embedded engine)")
    wheel = build_wheel(tmp_path / "wheels")
    assert not wheel.name.endswith("-none-any.whl"), f"{wheel.name} must be a platform wheel"
    unpacked = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(unpacked)
    assert f"prefect_governance/core/engines/{native.LIBRARY_NAME}" in names
    assert "prefect_governance/policies/prefect/governance/decision.rego" in names
    assert not [n for n in names if n.endswith(".h") or n.startswith("native/")], names
    for init in (ROOT / "prefect_governance").rglob("__init__.py"):
        assert init.relative_to(ROOT).as_posix() in names, f"{init} is not in the wheel"
    policies = ROOT / "policies"
    for path in policies.rglob("*"):
        if path.suffix in (".rego", ".json", ".md"):
            shipped = f"prefect_governance/policies/{path.relative_to(policies).as_posix()}"
            assert shipped in names, f"{path} is not in the wheel"
    check = textwrap.dedent(
        """
        import shutil, sys
        import prefect_governance
        from prefect_governance.core.engines import EmbeddedEngine
        from prefect_governance.core.engines.native import LIBRARY_PATH
        from prefect_governance.core.settings import packaged_policy_dir
        assert shutil.which("go") is None
        assert LIBRARY_PATH.is_relative_to(sys.argv[1]), LIBRARY_PATH
        engine = EmbeddedEngine(packaged_policy_dir())
        result = engine.evaluate_sync("prefect/governance/decision", {}).result
        print("denied:", bool(result["deny"]))
        """
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(unpacked), "HOME": str(tmp_path)}
    completed = subprocess.run(
        [sys.executable, "-c", check, str(unpacked)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert "denied: True" in completed.stdout, "an empty input is refused by the packaged policy"


def test_a_library_built_elsewhere_is_shipped_as_it_is_without_go(tmp_path):
    """The Dockerfile's way: native/build.sh in a Go stage, then the wheel without Go."""
    prebuilt = tmp_path / native.LIBRARY_NAME
    prebuilt.write_bytes(native.LIBRARY_PATH.read_bytes())
    path = [p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "go").exists()]
    env = {
        **os.environ,
        "PATH": os.pathsep.join(path),
        "PREFECT_GOVERNANCE_PREBUILT_ENGINE": str(prebuilt),
    }
    wheel = build_wheel(tmp_path / "wheels", env)
    version = prefect_governance.__version__
    with zipfile.ZipFile(wheel) as archive:
        shipped = archive.read(f"prefect_governance/core/engines/{native.LIBRARY_NAME}")
        metadata = archive.read(f"prefect_governance-{version}.dist-info/METADATA").decode()
    assert shipped == prebuilt.read_bytes()
    # The version, read from the source by setuptools, is the package's own.
    assert wheel.name.startswith(f"prefect_governance-{version}-")
    assert Parser().parsestr(metadata)["Version"] == version
