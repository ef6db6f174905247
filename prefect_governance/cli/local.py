"""Local processes for the demo and the tests: a Prefect server and workers.

Every process is started in its own session with SIGINT restored, so it can be
stopped as a group and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _restore_sigint() -> None:  # pragma: no cover - runs in the child
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn(args: list[str], env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start a process in its own session, output to a log file."""
    handle = log.open("ab")
    return subprocess.Popen(
        args,
        env=dict(env),
        stdout=handle,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_restore_sigint,
    )


def stop(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):  # children that outlived their leader
        os.killpg(process.pid, signal.SIGKILL)


def wait_http(url: str, timeout: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until a URL answers 200, or raise (early if the process died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            args = process.args
            shown = args[:4] if isinstance(args, (list, tuple)) else str(args)
            raise RuntimeError(f"{shown} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer within {timeout:g}s")


def prefect_env(home: Path, api_url: str | None = None, **extra: str) -> dict[str, str]:
    """Environment for a Prefect process in a private home."""
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL", "INFO"),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "1",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


class PrefectServer:
    """``prefect server start`` on a free loopback port, in a private home.

    Its database is SQLite in that home, or ``database_url`` (PostgreSQL, through
    ``postgresql+asyncpg://``) as in production.
    """

    def __init__(self, home: Path, database_url: str | None = None):
        self.home = home
        self.database_url = database_url
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.log = home / "server.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> PrefectServer:
        self.home.mkdir(parents=True, exist_ok=True)
        self.process = spawn(
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            prefect_env(self.home, **self._database_env()),
            self.log,
        )
        try:
            wait_http(f"{self.api_url}/health", timeout, self.process)
        except Exception:
            self.stop()
            raise RuntimeError(f"Prefect server did not start; see {self.log}") from None
        return self

    def _database_env(self) -> dict[str, str]:
        if self.database_url is None:
            # SQLite: a writer waits up to 30 s for the lock (Prefect's default, 5 s,
            # answers 503 past the client's retries when many workers poll one server).
            return {
                "PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT": "30",
                "PREFECT_SERVER_DATABASE_TIMEOUT": "30",
            }
        return {"PREFECT_API_DATABASE_CONNECTION_URL": self.database_url}

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)

    def __enter__(self) -> PrefectServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_worker(
    pool: str,
    home: Path,
    api_url: str,
    log: Path,
    *,
    worker_type: str | None = None,
    extra_env: Mapping[str, str] | None = None,
    limit: int | None = None,
) -> subprocess.Popen[bytes]:
    """``prefect worker start --pool POOL`` (our type unless told otherwise)."""
    args = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool]
    if worker_type:
        args += ["--type", worker_type]
    if limit:
        args += ["--limit", str(limit)]
    return spawn(args, prefect_env(home, api_url, **(extra_env or {})), log)
