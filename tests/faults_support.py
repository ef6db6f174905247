"""A faulty OPA for the fault tests: a real HTTP server on a loopback port.

It answers ``POST /v1/data/...`` the way a broken OPA (or whatever stands in
front of it) would, as told by its current :class:`Fault`, and counts the
requests that reach it, so tests can see how many attempts the engine made.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prefect_governance.cli.local import free_port, spawn, wait_http


@dataclass(frozen=True)
class Fault:
    """How to answer: status and body, after a delay; ``cut`` breaks off the body."""

    status: int = 200
    body: Any = None  # a JSON document, or bytes sent as they are
    delay: float = 0.0
    cut: bool = False

    def payload(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        return json.dumps(self.body).encode()


ALLOW = Fault(body={"result": {"allow": True}})
FAULTS = {
    "slow": Fault(body={"result": {"allow": True}}, delay=30.0),
    "http-500": Fault(500, b"upstream exploded"),
    "http-503": Fault(503, b"<html>Service Unavailable</html>"),
    "http-400": Fault(
        400,
        {
            "code": "invalid_parameter",
            "message": "error(s) occurred while parsing query: bad input document",
        },
    ),
    "internal-error": Fault(500, {"code": "internal_error", "message": "eval_builtin_error"}),
    "result-string": Fault(body={"result": "yes"}),
    "allow-string": Fault(body={"result": {"allow": "true"}}),
    "undefined": Fault(body={"decision_id": "d-1"}),
    "not-json": Fault(body=b"allow"),
    "cut": Fault(body={"result": {"allow": True, "deny": []}}, cut=True),
}


class FaultyOpa:
    """The server; set ``fault`` at any time, read ``requests`` for the count so far."""

    def __init__(self, fault: Fault = ALLOW, port: int | None = None):
        self.fault = fault
        self.requests = 0
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._released = threading.Event()  # wakes sleeping handlers on stop
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):  # HTTP/1.0: one request per connection
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                fault = owner.count()
                if fault.delay and owner._released.wait(fault.delay):
                    return
                payload = fault.payload()
                self.send_response(fault.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if fault.cut:  # half the body, then the connection goes away
                    self.wfile.write(payload[: len(payload) // 2])
                    return
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def count(self) -> Fault:
        """Count one request; the fault that answers it."""
        with self._lock:
            self.requests += 1
            return self.fault

    def stop(self) -> None:
        """Stop listening (the port then refuses connections); again is a no-op."""
        if self._released.is_set():
            return
        self._released.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> FaultyOpa:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_opa(
    binary: str, port: int, log: Path, *paths: Path, extra: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    """A real ``opa run --server`` on a given loopback port (to come back where it was)."""
    process = spawn(
        [binary, "run", "--server", "--addr", f"127.0.0.1:{port}", *extra, *map(str, paths)],
        os.environ,
        log,
    )
    wait_http(f"http://127.0.0.1:{port}/health", 30, process)
    return process
