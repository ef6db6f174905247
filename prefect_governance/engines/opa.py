"""The OPA sidecar engine: ``POST /v1/data/<path>`` through opa-python-client."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from opa_client import AsyncOpaClient

from prefect_governance.engines.base import EngineAnswer, EngineError

# Every builtin error is an error, never an undefined rule; provenance carries
# the bundle revision when OPA serves a bundle.
QUERY = "strict-builtin-errors=true&provenance=true"


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

    async def post_data(self, policy_path: str, policy_input: dict[str, Any]) -> dict[str, Any]:
        """POST the input; return OPA's response document, or raise EngineError."""
        if self._session is None:
            await self._init_session()
        url = f"{self.root_url}/data/{policy_path.strip('/')}?{QUERY}"
        async with self._request("POST", url, json={"input": policy_input}) as response:
            try:
                body = await response.json(content_type=None)
            except (aiohttp.ContentTypeError, ValueError):
                body = None
            if response.status != 200:
                detail = body.get("message") if isinstance(body, dict) else None
                code = body.get("code") if isinstance(body, dict) else None
                kind = "evaluation" if code == "internal_error" else "http"
                raise EngineError(
                    kind,
                    f"OPA answered HTTP {response.status}: {code or ''} {detail or ''}".strip(),
                )
            if not isinstance(body, dict):
                raise EngineError("shape", "OPA answered with a body that is not a JSON object")
            return body


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
    ):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"OPA URL must be http(s)://host:port, got {url!r}")
        self.url = url
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
        try:
            body = await self._client.post_data(policy_path, policy_input)
        except EngineError:
            raise
        except (asyncio.TimeoutError, TimeoutError) as exc:
            raise EngineError("timeout", f"OPA at {self.url} did not answer in time") from exc
        except aiohttp.ClientConnectionError as exc:
            raise EngineError("unreachable", f"OPA at {self.url} is unreachable: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise EngineError("http", f"OPA at {self.url}: {exc}") from exc
        return EngineAnswer(
            result=body.get("result"),
            decision_id=body.get("decision_id"),
            revision=_revision(body.get("provenance")),
        )

    async def aclose(self) -> None:
        await self._client.close_connection()


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
