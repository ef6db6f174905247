"""The README's "Using it in your Prefect installation" sequence, run as written.

The commands are read from the README between its ``readme-sequence`` markers, so
this fails when the README drifts from what works. They run in bash, in a copy of
the repository's ``blocks/`` with no governance variable set beforehand, against a
Prefect server of their own (fresh home, as a new installation is). Two things are
the reader's, not the README's: the package is installed already (this venv), and
``PUBLIC`` is replaced by the key ``keygen`` printed. The last command, the worker,
runs until it has registered with the pool.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prefect_governance.cli.local import PrefectServer, spawn, stop
from tests.conftest import ROOT, missing

README = ROOT / "README.md"
SEQUENCE = re.compile(
    r"<!-- readme-sequence:start[^>]*-->\s*```bash\n(.*?)```\s*<!-- readme-sequence:end -->",
    re.DOTALL,
)

pytestmark = pytest.mark.e2e


def readme_commands() -> list[str]:
    """The sequence's command lines, comments and blank lines left out."""
    (block,) = SEQUENCE.findall(README.read_text())
    lines = [re.sub(r"\s+#\s.*$", "", line).strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_the_readme_names_a_sequence_that_installs_applies_and_starts_a_worker():
    commands = readme_commands()
    assert commands[0].startswith("pip install prefect-governance")
    assert commands[-1].endswith("prefect worker start --pool governed")
    assert any(c.startswith("prefect-governance apply blocks/") for c in commands)


def _bash(script: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + script],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _workers(api_url: str, pool: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read():
        async with get_client() as client:
            return await client.read_workers_for_work_pool(pool)

    with temporary_settings({PREFECT_API_URL: api_url}):
        return asyncio.run(read())


def test_the_readme_sequence_runs_as_written(tmp_path):
    if shutil.which("bash") is None:
        missing("bash")
    commands = readme_commands()
    install, setup, worker = commands[0], commands[1:-1], commands[-1]
    assert install.startswith("pip install"), "the first step installs the package"
    exports = [c for c in setup if c.startswith("export ")]

    try:
        server = PrefectServer(tmp_path / "prefect-home").start(timeout=180)
    except Exception as exc:  # pragma: no cover - depends on the machine
        missing(f"a local Prefect server ({exc})")
    try:
        work = tmp_path / "checkout"
        shutil.copytree(ROOT / "blocks", work / "blocks")
        bin_dir = str(Path(sys.executable).parent)
        # No Prefect or governance setting of the test session reaches the sequence.
        env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
        env.update(
            PATH=os.pathsep.join([bin_dir, env.get("PATH", "")]),
            HOME=str(tmp_path),
            PREFECT_HOME=str(server.home),
            PREFECT_API_URL=server.api_url,
            PYTHONUNBUFFERED="1",
        )

        done = _bash("\n".join(setup), env, work)
        assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
        (public,) = re.findall(r"^pool-owner=(\S+)$", done.stdout, re.MULTILINE)
        assert "created    lineage-store  default" in done.stdout, done.stdout
        assert (work / "owner.key").exists()

        assert "PUBLIC" in worker, "the README's worker line pins the printed key"
        # The same shell as the steps before: the checkout's directory, the exports.
        script = "\n".join(
            [f"cd {shlex.quote(str(work))}", *exports, worker.replace("PUBLIC", public)]
        )
        log = tmp_path / "worker.log"
        process = spawn(["bash", "-c", "set -euo pipefail\n" + script], env, log)
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                assert process.poll() is None, log.read_text()
                # Registered with the pool, and writing where the README pointed it.
                if (work / "lineage.db").exists() and _workers(server.api_url, "governed"):
                    break
                time.sleep(2)
            else:
                pytest.fail(f"the worker never served the pool:\n{log.read_text()}")
        finally:
            stop(process)
    finally:
        server.stop()
