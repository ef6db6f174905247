"""Real parts for the security tests: a private PKI, OPA servers with token or TLS auth, flows.

The flows at the bottom are deployed from this file, so it imports nothing from the
test suite: a flow-run process loads it by path.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prefect import flow
from pydantic import BaseModel, SecretStr

from prefect_governance.cli.local import free_port, spawn, stop

# --- a private PKI ------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, OPA's server certificate (127.0.0.1, localhost), a worker's client
    certificate, and a client certificate from another CA that OPA does not trust."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    usage: x509.ObjectIdentifier | None = None,
    san: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    """A CA certificate (no issuer: self-signed) or a leaf signed by ``issuer``."""
    now = dt.datetime.now(dt.timezone.utc)
    signer_cert, signer_key = issuer if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(signer_cert.subject if signer_cert else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()),
            critical=False,
        )
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(signer_key, hashes.SHA256())


def _pem(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def make_pki(directory: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1/localhost, client certificates (good, rogue)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("governance test CA", ca_key, None)
    rogue_ca_key = ec.generate_private_key(ec.SECP256R1())
    rogue_ca = _certificate("some other CA", rogue_ca_key, None)

    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _certificate(
        "opa",
        server_key,
        (ca, ca_key),
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _certificate(
        "governance-worker", client_key, (ca, ca_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH
    )
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue = _certificate(
        "governance-worker",
        rogue_key,
        (rogue_ca, rogue_ca_key),
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    return Pki(
        ca=_pem(ca, directory / "ca.pem"),
        server_cert=_pem(server, directory / "server.pem"),
        server_key=_write_key(server_key, directory / "server-key.pem"),
        client_cert=_pem(client, directory / "client.pem"),
        client_key=_write_key(client_key, directory / "client-key.pem"),
        rogue_cert=_pem(rogue, directory / "rogue.pem"),
        rogue_key=_write_key(rogue_key, directory / "rogue-key.pem"),
    )


# --- OPA with authentication ------------------------------------------------------

# OPA's documented pattern for token authentication: the system.authz policy decides
# every request; here, only the bearer token below is let in.
AUTHZ_POLICY = """package system.authz

default allow := false

allow if input.identity == "{token}"
"""


class SecuredOpa:
    """``opa run --server`` with extra (auth/TLS) flags; waits with the right credentials."""

    def __init__(
        self,
        binary: str,
        workdir: Path,
        policies: Path,
        *flags: str,
        token: str | None = None,
        pki: Pki | None = None,
    ):
        self.port = free_port()
        scheme = "https" if pki else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.log = workdir / f"opa-secured-{self.port}.log"
        paths = [str(policies)]
        if token is not None:
            authz = workdir / f"authz-{self.port}.rego"
            authz.write_text(AUTHZ_POLICY.format(token=token))
            paths.append(str(authz))
            flags = (*flags, "--authentication=token", "--authorization=basic")
        self.process = spawn(
            [binary, "run", "--server", "--addr", f"127.0.0.1:{self.port}", *flags, *paths],
            os.environ,
            self.log,
        )
        context = None
        if pki:
            context = ssl.create_default_context(cafile=str(pki.ca))
            context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        self._wait(token, context)

    def _wait(self, token: str | None, context: ssl.SSLContext | None, timeout: float = 30) -> None:
        """Until /health answers 200 to a request that carries the credentials."""
        request = urllib.request.Request(f"{self.url}/health")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"opa exited with {self.process.returncode}; see {self.log}")
            try:
                with urllib.request.urlopen(request, timeout=2, context=context) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"{self.url}/health did not answer within {timeout:g}s; see {self.log}")

    def stop(self) -> None:
        stop(self.process)


# --- flows deployed by the end-to-end tests ---------------------------------------


def _governance_env() -> dict[str, Any]:
    """What a governed run's environment holds of governance: variable names, signing key id."""
    signed = os.environ.get("PREFECT_GOVERNANCE_ENVELOPE")
    return {
        "variables": sorted(k for k in os.environ if k.startswith("PREFECT_GOVERNANCE_")),
        "kid": json.loads(signed).get("kid") if signed else None,
    }


@flow
def secret_flow(
    marker: str,
    db_password: str = "",
    conn: dict[str, Any] | None = None,
    warehouse_dsn: SecretStr | None = None,
    payload: Any = None,
) -> None:
    """Takes secrets as parameters (never printing them); leaves a marker that it ran."""
    Path(marker).write_text(json.dumps(_governance_env()))


@flow
def probe_flow(
    marker: str,
    lineage_store: str | None = None,
    signing_key: str | None = None,
    engine: str | None = None,
    policy_path: str | None = None,
    task_policy_path: str | None = None,
    env_allow: list[str] | None = None,
) -> None:
    """Parameters named like the pool-only settings; leaves a marker of its governance env."""
    Path(marker).write_text(json.dumps(_governance_env()))


# --- flows of the secrets attack suite (tests/attacks/test_secrets.py) -------------------
# Parameter names here match no redaction pattern: only the schema or the value's shape
# can tell that they are secrets.


class Vault(BaseModel):
    name: str
    unlock: SecretStr


class Estate(BaseModel):
    vaults: list[Vault]
    extra: dict[str, Vault] = {}


@flow
def tuple_flow(marker: str, pair: tuple[str, SecretStr]) -> None:
    """A tuple whose second item is a SecretStr (its schema: ``prefixItems``)."""
    Path(marker).write_text("ran")


@flow
def model_flow(marker: str, estate: Estate) -> None:
    """A SecretStr inside models inside a list and a dict (``$ref``, ``items``,
    ``additionalProperties``)."""
    Path(marker).write_text("ran")


@flow
def edited_flow(marker: str, unlock: SecretStr | None = None) -> None:
    """A SecretStr whose deployment schema an API client edits afterwards."""
    Path(marker).write_text("ran")


@flow
def values_flow(
    marker: str,
    target: str = "",
    note: str = "",
    blob: str = "",
    headers: dict[str, str] | None = None,
) -> None:
    """Plain strings that hold secrets: only their shape (or a header's name) says so."""
    Path(marker).write_text("ran")
