"""Ed25519 signatures over canonical JSON: the worker signs, the run verifies.

A signed document is ``{"kid": ..., "alg": "Ed25519", "payload": {...}, "signature": ...}``
with the signature over the canonical JSON of ``payload``. Keys are raw 32-byte
Ed25519 keys in URL-safe base64.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from prefect_governance.core.canonical import canonical_json
from prefect_governance.core.errors import GovernanceError

ALGORITHM = "Ed25519"


class SignatureError(GovernanceError, ValueError):
    """A signed document that does not verify."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class SigningKey:
    """A private key and the id the verifier looks its public half up by."""

    key_id: str
    private: Ed25519PrivateKey

    @classmethod
    def generate(cls, key_id: str) -> SigningKey:
        return cls(key_id, Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, key_id: str, seed_b64: str) -> SigningKey:
        seed = _unb64(seed_b64.strip())
        if len(seed) != 32:
            raise ValueError("an Ed25519 private key is 32 bytes (URL-safe base64)")
        return cls(key_id, Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def seed(self) -> bytes:
        return self.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    @property
    def seed_b64(self) -> str:
        return _b64(self.seed)

    @property
    def public_b64(self) -> str:
        return _b64(self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))

    @property
    def trusted_key(self) -> str:
        """``KID=PUBLIC``: how a verifier is told to trust this key."""
        return f"{self.key_id}={self.public_b64}"


def sign_bytes(message: bytes, key: SigningKey) -> str:
    """The signature of some bytes, in URL-safe base64."""
    return _b64(key.private.sign(message))


@functools.lru_cache(maxsize=256)
def _public(public_b64: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(_unb64(public_b64))


def verify_bytes(message: bytes, signature: str, public_b64: str) -> None:
    """Raise SignatureError unless ``signature`` is the key's signature of ``message``."""
    try:
        _public(public_b64).verify(_unb64(signature), message)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise SignatureError("the signature does not verify") from exc


def sign(payload: Mapping[str, Any], key: SigningKey) -> dict[str, Any]:
    """Wrap a payload with its signature."""
    return {
        "kid": key.key_id,
        "alg": ALGORITHM,
        "payload": dict(payload),
        "signature": sign_bytes(canonical_json(payload), key),
    }


def verify(signed: Any, public_keys: Mapping[str, str]) -> dict[str, Any]:
    """The payload of a signed document, or SignatureError saying why not."""
    if not isinstance(signed, dict) or not {"kid", "payload", "signature"} <= set(signed):
        raise SignatureError("not a signed document (kid, payload and signature are required)")
    if signed.get("alg") != ALGORITHM:
        raise SignatureError(f"unsupported signature algorithm {signed.get('alg')!r}")
    kid = signed["kid"]
    if kid not in public_keys:
        raise SignatureError(f"signed with an unknown key {kid!r}")
    try:
        verify_bytes(canonical_json(signed["payload"]), signed["signature"], public_keys[kid])
    except SignatureError as exc:
        raise SignatureError(f"the signature does not verify with key {kid!r}") from exc
    return signed["payload"]
