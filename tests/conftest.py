"""Real parts for the tests: a Prefect server, an OPA server, PostgreSQL.

Outside CI a missing part skips the tests that need it; with CI=true it fails them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefect_governance.cli.local import PrefectServer, free_port, spawn, stop, wait_http
from tests.agents import TEST_AGENT_KEYS
from tests.kube_support import flow_image, kube_cluster  # noqa: F401  (session fixtures)
from tests.lineage_keys import LINEAGE_ENV

# Every governor in this process and every worker it spawns pins the test pool-owner key
# (agents are saved signed with it: tests/agents.py).
os.environ["PREFECT_GOVERNANCE_AGENT_KEYS"] = TEST_AGENT_KEYS
# ... and signs the lineage with the test lineage key, which every store here believes.
os.environ.update(LINEAGE_ENV)

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"
IN_CI = os.environ.get("CI", "").lower() == "true"


# The fixtures that give a test a real Prefect server. A test that gets one, through any
# of its fixtures, is marked e2e whether or not its file says so (a test that starts a
# server of its own, like the demo's, says so itself).
PREFECT_SERVERS = {"prefect_server", "pg_prefect"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if PREFECT_SERVERS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


def missing(part: str) -> None:
    """A real part is not here: a failure in CI, a skip elsewhere."""
    message = f"{part} is not available"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: real parts are required, not skipped)")
    pytest.skip(message)


def opa_path() -> str | None:
    for candidate in (
        os.environ.get("OPA_BIN"),
        str(ROOT / ".tools" / "bin" / "opa"),
        shutil.which("opa"),
    ):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="session")
def opa_bin() -> str:
    path = opa_path()
    if path is None:
        missing("the opa binary (make opa builds it with go install)")
    return path


class OpaServer:
    """``opa run --server`` on a free loopback port with policies/ loaded."""

    def __init__(
        self, binary: str, workdir: Path, *extra: str, paths: tuple[Path, ...] = (POLICIES,)
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"opa-{self.port}.log"
        self.process = spawn(
            [
                binary,
                "run",
                "--server",
                "--addr",
                f"127.0.0.1:{self.port}",
                "--set",
                "decision_logs.console=true",
                *extra,
                *map(str, paths),
            ],
            os.environ,
            self.log,
        )
        wait_http(f"{self.url}/health", 30, self.process)

    def stop(self) -> None:
        stop(self.process)


@pytest.fixture(scope="session")
def opa_server(opa_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpaServer]:
    server = OpaServer(opa_bin, tmp_path_factory.mktemp("opa"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def prefect_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrefectServer]:
    """One Prefect server for the session, on PostgreSQL as in production.

    A session's e2e workers poll one server at once; on SQLite its writers queue on
    one lock and answer 503 past the client's retries (seen in CI). SQLite is used
    only where no PostgreSQL exists outside CI (the README's main job covers it).
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from tests.pg_support import scratch_database

    home = tmp_path_factory.mktemp("prefect-home")
    with contextlib.ExitStack() as stack:
        database = None
        try:
            postgres = request.getfixturevalue("postgres")
        except pytest.skip.Exception:
            postgres = None
        if postgres is not None:
            url = stack.enter_context(scratch_database(postgres.url, "prefect"))
            database = url.replace("postgresql+psycopg://", "postgresql+asyncpg://")
        try:
            server = PrefectServer(home, database).start()
        except Exception as exc:  # pragma: no cover - depends on the machine
            missing(f"a local Prefect server ({exc})")
        stack.callback(server.stop)
        with temporary_settings({PREFECT_API_URL: server.api_url, PREFECT_HOME: str(home)}):
            yield server


class Postgres:
    """A throwaway PostgreSQL cluster from Debian's packages, on a loopback port."""

    def __init__(self, root: Path):
        bindir = _pg_bindir()
        if bindir is None:
            missing("PostgreSQL server binaries (apt-get install postgresql)")
        self.port = free_port()
        self.data = root / "data"
        self.data.mkdir(parents=True)
        self.run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.run_as:
            shutil.chown(root, "postgres")
            shutil.chown(self.data, "postgres")
        subprocess.run(
            [
                *self.run_as,
                str(bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "governance",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
            check=True,
            capture_output=True,
        )
        self.bindir, self.root = bindir, root
        self.url = f"postgresql+psycopg://governance@127.0.0.1:{self.port}/postgres"
        self.start()

    def start(self) -> None:
        """Start the server (again, on the same port and data) and wait until it accepts."""
        self.process = spawn(
            [
                *self.run_as,
                str(self.bindir / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-h",
                "127.0.0.1",
                "-k",
                str(self.root),
            ],
            os.environ,
            self.root / "postgres.log",
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready = subprocess.run(
                [str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                capture_output=True,
            )
            if ready.returncode == 0:
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"PostgreSQL did not start; see {self.root / 'postgres.log'}")

    def stop(self) -> None:
        """A fast shutdown (clients disconnected), so the cluster can start again."""
        if self.process.poll() is None:
            pg_ctl = [*self.run_as, str(self.bindir / "pg_ctl"), "-D", str(self.data)]
            subprocess.run([*pg_ctl, "-m", "fast", "-w", "-t", "30", "stop"], capture_output=True)
        stop(self.process)


def _pg_bindir() -> Path | None:
    for base in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (base / "initdb").exists():
            return base
    return None


@contextlib.contextmanager
def own_postgres(prefix: str = "governance-pg-") -> Iterator[Postgres]:
    """A throwaway cluster of one's own, removed afterwards.

    Not under pytest's tmp dir: that is private to root, and PostgreSQL runs as postgres.
    """
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    try:
        server = Postgres(root)
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    with own_postgres() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def lineage_url(request, tmp_path) -> Iterator[str]:
    """A new, empty lineage database: a SQLite file, or one on the test PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'lineage.db'}"
        return
    from tests.pg_support import scratch_database

    with scratch_database(request.getfixturevalue("postgres").url, "lineage") as made:
        yield made


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable
