"""The OPA sidecar engine: ``POST /v1/data/<path>`` through opa-python-client.

Each decision is one or more attempts (retries on transient failures only:
OPA unreachable, timing out, answering 5xx), all within the decision's
deadline: an attempt's timeout is cut to the time left, and no retry starts
that could not finish before the deadline. A circuit breaker (engines/breaker.py)
stops asking an OPA that keeps failing, so decisions fail at once instead of
each waiting out the timeout.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import anyio
import orjson
from opa_client import AsyncOpaClient

from prefect_governance.core.engines.base import (
    EngineAnswer,
    EngineError,
    FailureKind,
    encode_input,
)
from prefect_governance.core.engines.breaker import Breaker
from prefect_governance.core.models import EngineRef

# Every builtin error is an error, never an undefined rule; provenance carries
# the bundle revision when OPA serves a bundle.
QUERY = "strict-builtin-errors=true&provenance=true"
BACKOFF = 0.3  # seconds before the first retry, doubled before each next one
MIN_ATTEMPT = 0.1  # an attempt with less time than this left is not started
MARGIN = 0.05  # an attempt ends this long before the deadline, so the error is ours
JSON_CONTENT = {"Content-Type": "application/json"}


class OpaError(EngineError):
    """An attempt failed; ``transient`` failures are retried and trip the breaker."""

    def __init__(self, kind: FailureKind, message: str, *, transient: bool):
        super().__init__(kind, message)
        self.transient = transient


class _SidecarClient(AsyncOpaClient):
    """opa-python-client's async client, with a CA bundle for OPA's certificate."""

    def __init__(self, *args: Any, ca_cert: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.ca_cert = ca_cert

    async def _init_session(self) -> None:
        context: ssl.SSLContext | None = None
        if self.ssl:
            context = ssl.create_default_context(cafile=self.ca_cert)
            if self.cert:
                certs = self.cert if isinstance(self.cert, tuple) else (self.cert,)
                context.load_cert_chain(*certs)
        self._connector = aiohttp.TCPConnector(ssl=context if context else False)
        self._session = aiohttp.ClientSession(
            headers=self.headers,
            connector=self._connector,
            timeout=aiohttp.ClientTimeout(total=self.timeout),
        )

    async def post_data(
        self, policy_path: str, policy_input: dict[str, Any], *, timeout: float
    ) -> dict[str, Any]:
        """One POST of the input; OPA's response document, or raise OpaError."""
        if self._session is None:
            await self._init_session()
        assert self._session is not None
        url = f"{self.root_url}/data/{policy_path.strip('/')}?{QUERY}"
        async with self._session.post(
            url,
            data=b'{"input":' + encode_input(policy_input) + b"}",
            headers=JSON_CONTENT,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            raw = await response.read()
        try:
            body = orjson.loads(raw)
        except ValueError:
            body = None
        if response.status != 200:
            raise _http_error(response.status, body, raw)
        if not isinstance(body, dict):
            raise OpaError(
                "shape", "OPA answered with a body that is not a JSON object", transient=False
            )
        return body


def _http_error(status: int, body: Any, raw: bytes) -> OpaError:
    """OPA's error document (``code``, ``message``) as a failure; 5xx are transient."""
    if isinstance(body, dict):
        code, detail = body.get("code"), body.get("message")
    else:  # not OPA's document (a proxy's page?): its start, on one line
        code, detail = None, " ".join(raw[:200].decode(errors="replace").split())
    said = " ".join(str(part) for part in (code, detail) if part)
    message = f"OPA answered HTTP {status}" + (f": {said}" if said else "")
    if code == "internal_error":  # the policy failed to evaluate: asking again will not help
        return OpaError("evaluation", message, transient=False)
    return OpaError("http", message, transient=status >= 500)


def _time_left() -> float:
    """Seconds until the enclosing deadline (``anyio.fail_after`` in decide), or inf."""
    return anyio.current_effective_deadline() - anyio.current_time()


class OpaEngine:
    """Ask an OPA server (the sidecar) for each decision."""

    name = "opa"

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        ca_cert: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        timeout: float = 2.0,
        retries: int = 1,
        breaker_failures: int = 3,
        breaker_reset_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"OPA URL must be http(s)://host:port, got {url!r}")
        self.url = url
        self.ca_cert = ca_cert
        self.timeout = timeout
        self.retries = retries
        self.breaker = Breaker(breaker_failures, breaker_reset_seconds, clock=clock)
        cert: str | tuple[str, str] | None = None
        if client_cert:
            cert = (client_cert, client_key) if client_key else client_cert
        self._client = _SidecarClient(
            host=parts.hostname,
            port=parts.port or (443 if parts.scheme == "https" else 8181),
            ssl=parts.scheme == "https",
            cert=cert,
            token=token,
            retries=retries,
            timeout=timeout,
            ca_cert=ca_cert,
        )

    async def evaluate(self, policy_path: str, policy_input: dict[str, Any]) -> EngineAnswer:
        refusal = self.breaker.admit()
        if refusal is not None:
            raise EngineError("unreachable", refusal)
        try:
            body = await self._ask(policy_path, policy_input)
        except OpaError as exc:
            if exc.transient:
                self.breaker.failure(str(exc))
            else:
                self.breaker.success()  # OPA answered; the answer is what failed
            raise
        except BaseException:  # cancelled: at the decision deadline, or shutting down
            if _time_left() <= 0:
                self.breaker.failure(f"timeout: OPA at {self.url} did not answer by the deadline")
            else:
                self.breaker.abandon()
            raise
        self.breaker.success()
        return EngineAnswer(
            result=body.get("result"),
            decision_id=body.get("decision_id"),
            revision=_revision(body.get("provenance")),
        )

    async def _ask(self, policy_path: str, policy_input: dict[str, Any]) -> dict[str, Any]:
        """Attempts until an answer, a lasting failure, the retries or the deadline run out."""
        attempt = 1
        while True:
            per_attempt = min(self.timeout, max(_time_left() - MARGIN, MIN_ATTEMPT))
            try:
                return await self._attempt(policy_path, policy_input, per_attempt)
            except OpaError as exc:
                if not exc.transient or attempt > self.retries:
                    raise _with_attempts(exc, attempt, "") from exc
                pause = BACKOFF * 2 ** (attempt - 1)
                if _time_left() - pause < MIN_ATTEMPT:
                    raise _with_attempts(
                        exc, attempt, "; no time left for a retry before the decision deadline"
                    ) from exc
            attempt += 1
            await anyio.sleep(pause)

    async def _attempt(
        self, policy_path: str, policy_input: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        """One request; every transport failure becomes an OpaError."""
        try:
            return await self._client.post_data(policy_path, policy_input, timeout=timeout)
        except OpaError:
            raise
        except (asyncio.TimeoutError, TimeoutError) as exc:
            raise OpaError(
                "timeout", f"OPA at {self.url} did not answer in {timeout:.3g}s", transient=True
            ) from exc
        except aiohttp.ClientConnectionError as exc:  # a TLS mismatch lasts: not retried
            raise OpaError(
                "unreachable",
                f"OPA at {self.url} is unreachable: {_describe(exc)}",
                transient=not _is_tls(exc),
            ) from exc
        except aiohttp.ClientPayloadError as exc:
            raise OpaError(
                "http", f"OPA at {self.url} broke off its answer: {_describe(exc)}", transient=True
            ) from exc
        except aiohttp.ClientError as exc:
            raise OpaError("http", f"OPA at {self.url}: {_describe(exc)}", transient=False) from exc

    def reference(self) -> EngineRef:
        return EngineRef(
            kind="opa",
            url=self.url,
            ca_cert=self.ca_cert,
            timeout=self.timeout,
            retries=self.retries,
        )

    async def aclose(self) -> None:
        await self._client.close_connection()


def _with_attempts(exc: OpaError, attempts: int, why: str) -> OpaError:
    """The last attempt's failure, saying how many attempts were made (if more than one)."""
    if attempts == 1 and not why:
        return exc
    plural = "s" if attempts > 1 else ""
    return OpaError(
        exc.kind, f"{exc.message} ({attempts} attempt{plural}{why})", transient=exc.transient
    )


def _is_tls(exc: BaseException) -> bool:
    """A TLS failure (certificates, handshake), which asking again will not mend."""
    causes = (exc, getattr(exc, "os_error", None), exc.__cause__, exc.__context__)
    return any(isinstance(c, (aiohttp.ClientSSLError, ssl.SSLError)) for c in causes)


def _describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


def _revision(provenance: Any) -> str | None:
    """The bundle revision(s) from OPA's provenance, if OPA serves bundles."""
    if not isinstance(provenance, dict):
        return None
    bundles = provenance.get("bundles") or {}
    revisions = sorted(
        f"{name}@{info['revision']}"
        for name, info in bundles.items()
        if isinstance(info, dict) and info.get("revision")
    )
    if revisions:
        return ",".join(revisions)
    return provenance.get("revision")
