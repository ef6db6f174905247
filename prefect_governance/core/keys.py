"""The key blocks: the worker's signing key and the public keys runs verify with.

Apart from the other blocks, so that a run that looks up a verify key by its id
loads no storage (``prefect_governance.worker.blocks`` holds the lineage block).
"""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, HttpUrl, SecretStr

from prefect_governance.core.signing import SigningKey

# An HttpUrl, as Prefect types a block's logo (and its own blocks set it).
LOGO = HttpUrl("https://raw.githubusercontent.com/open-policy-agent/opa/main/logo/logo.png")


class GovernanceSigningKey(Block):
    """The private key a governed worker signs allowed runs' envelopes with."""

    _block_type_name = "Governance Signing Key"
    _block_type_slug = "governance-signing-key"
    _logo_url = LOGO
    _description = "Ed25519 private key (raw, URL-safe base64) for signing governance envelopes."

    key_id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$", description="Published as this id.")
    private_key: SecretStr = Field(description="32-byte Ed25519 seed, URL-safe base64.")

    def signing_key(self) -> SigningKey:
        return SigningKey.from_seed(self.key_id, self.private_key.get_secret_value())


class GovernanceVerifyKey(Block):
    """A public key runs verify their envelope with; the block's name is the key id."""

    _block_type_name = "Governance Verify Key"
    _block_type_slug = "governance-verify-key"
    _logo_url = LOGO
    _description = "Ed25519 public key (raw, URL-safe base64) that verifies governance envelopes."

    public_key: str = Field(min_length=40, max_length=48)
