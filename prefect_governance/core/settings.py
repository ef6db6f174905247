"""Worker-wide settings, read from ``PREFECT_GOVERNANCE_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from prefect_governance.core.envelope import MAX_PARAMETER_BYTES, MAX_PARAMETER_DEPTH
from prefect_governance.core.signing import SigningKey

# Worker credentials that must never reach a flow run's environment.
WORKER_SECRETS = (
    "PREFECT_GOVERNANCE_SIGNING_KEY",
    "PREFECT_GOVERNANCE_LINEAGE_URL",
    "PREFECT_GOVERNANCE_OPA_TOKEN",
    # The pool owner's agent signing seed belongs with `apply`, not on a worker's host;
    # if it is there anyway, a run's code must not get it (and sign its own agents).
    "PREFECT_GOVERNANCE_AGENT_SIGNING_KEY",
    "PREFECT_GOVERNANCE_LINEAGE_KEY",
    # The security team's exception signing seed: a run must not sign its own waivers.
    "PREFECT_GOVERNANCE_EXCEPTION_SIGNING_KEY",
)


class GovernanceSettings(BaseSettings):
    """Defaults used when the work pool names no engine or lineage-store block."""

    model_config = SettingsConfigDict(env_prefix="PREFECT_GOVERNANCE_", extra="ignore")

    lineage_url: SecretStr | None = Field(
        None,
        description="SQLAlchemy URL of the lineage database (default: SQLite in PREFECT_HOME).",
    )
    policy_dir: Path | None = Field(
        None, description="Rego directory for the embedded engine (default: the packaged policies)."
    )
    opa_url: str | None = Field(
        None, description="Use this OPA sidecar instead of the embedded engine."
    )
    opa_token: SecretStr | None = None
    opa_breaker_failures: int = Field(
        3, ge=0, description="Consecutive OPA failures that open the circuit (0: never)."
    )
    opa_breaker_reset_seconds: float = Field(
        30.0, ge=0, description="Seconds the circuit stays open before a trial request."
    )
    decision_timeout: float = Field(5.0, gt=0, description="Seconds a decision may take in all.")
    signing_key: SecretStr | None = Field(
        None, description="Ed25519 seed (URL-safe base64) the worker signs envelopes with."
    )
    signing_key_id: str = Field("governance-worker", description="Id of that key's public half.")
    agent_keys: dict[str, str] = Field(
        default_factory=dict,
        description="The pool owner's public keys agent blocks must be signed with, as JSON "
        '{"KID": "PUBLIC"} (URL-safe base64). Never read from blocks; none pinned: every run '
        "is refused.",
    )
    lineage_key: SecretStr | None = Field(
        None,
        description="Ed25519 seed (URL-safe base64) the worker signs lineage records with, and "
        "derives each run's report secret from. Only the worker holds it (never a block); "
        "unset: a key for this worker process only, which no verifier pins.",
    )
    lineage_key_id: str = Field("governance-lineage", description="Id of the lineage key.")
    lineage_keys: dict[str, str] = Field(
        default_factory=dict,
        description="Public keys lineage records must be signed with, as JSON "
        '{"KID": "PUBLIC"} (URL-safe base64): what `lineage verify`, `audit` and the worker '
        "accept. Never read from blocks.",
    )
    envelope_ttl: float = Field(600.0, gt=0, description="Seconds an envelope stays valid.")
    approver_keys: dict[str, str] = Field(
        default_factory=dict,
        description="Approvers the worker trusts, as JSON {approver: Ed25519 public key "
        "(URL-safe base64)}: a signed approval counts only when it verifies with the key "
        "pinned here for the approver it names.",
    )
    approval_recheck_seconds: float = Field(
        60.0,
        gt=0,
        description="Seconds after which a run awaiting approval is decided again (it waits "
        "Scheduled, named AwaitingApproval; Prefect hands it back to a worker then, or at "
        "the worker's next poll within its prefetch window).",
    )
    exception_keys: dict[str, str] = Field(
        default_factory=dict,
        description="The security team's public keys exceptions must be signed with, as JSON "
        '{"KID": "PUBLIC"} (URL-safe base64); kept apart from the agent keys, so the pool '
        "owner's key cannot waive a policy. Never read from blocks; none pinned: no exception "
        "is read and none waives anything.",
    )
    exception_max_days: float = Field(
        90.0,
        gt=0,
        description="Longest an exception may live (issued_at to expires_at), in days: "
        "`apply` refuses to sign a longer one and the worker ignores it.",
    )
    exception_expiring_days: float = Field(
        7.0,
        ge=0,
        description="An exception that waives a deny and expires within this many days is "
        "logged as a warning on the run (not a policy warning: it costs no trust).",
    )
    max_parameter_bytes: int = Field(
        MAX_PARAMETER_BYTES,
        gt=0,
        description="Largest parameter document (JSON bytes) sent to a policy.",
    )
    max_parameter_depth: int = Field(
        MAX_PARAMETER_DEPTH,
        gt=0,
        description="Deepest nesting of the parameter document sent to a policy.",
    )
    lineage_append_timeout: float = Field(
        15.0, gt=0, description="Seconds a lineage write may wait for locks before it fails."
    )
    reconcile_interval: float = Field(
        60.0, gt=0, description="Seconds between the worker's passes over unsettled runs."
    )
    reconcile_grace: float = Field(
        60.0,
        ge=0,
        description="Seconds a run may sit Pending after its decision, or ended without its "
        "outcome recorded, before the reconciler settles it.",
    )
    redact_patterns: list[str] = Field(
        default_factory=lambda: [
            "password",
            "passwd",
            "secret",
            "token",
            "api_key",
            "apikey",
            "credential",
            "private",
            "auth",
            "bearer",
            "dsn",
            "cookie",
            "session",
            "passphrase",
            "pwd",
            "access_key",
            "signature",
            "conn_str",
            "connection_string",
        ],
        description="Parameter names (and member names at any depth) containing any of these "
        "(case-insensitive) are redacted. `auth` covers authorization/authentication/oauth, "
        "`credential` credentials, `private` private_key.",
    )
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Serve the worker's Prometheus metrics on this port of its own (besides "
        "`/metrics` of Prefect's worker webserver, `--with-healthcheck`).",
    )
    metrics_host: str = Field(
        "0.0.0.0", description="The address that metrics port binds to (as Prefect's webserver)."
    )

    @field_validator("agent_keys", "lineage_keys", "exception_keys")
    @classmethod
    def _public_keys(cls, keys: dict[str, str]) -> dict[str, str]:
        for kid, public in keys.items():
            check_public_key(kid, public)
        return keys


def check_public_key(kid: str, public: str) -> None:
    """A pinned agent key must be a 32-byte Ed25519 public key in URL-safe base64."""
    import base64
    import binascii

    try:
        raw = base64.urlsafe_b64decode(public + "=" * (-len(public) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValueError(f"agent key {kid!r} is not an Ed25519 public key (32 bytes, base64)")


def lineage_signer(settings: GovernanceSettings, *, ephemeral: bool) -> SigningKey | None:
    """The key lineage records are signed with: the configured one; else, with
    ``ephemeral``, a new key for this process only (which no verifier pins)."""
    if settings.lineage_key is not None:
        return SigningKey.from_seed(
            settings.lineage_key_id, settings.lineage_key.get_secret_value()
        )
    if ephemeral:
        import uuid

        return SigningKey.generate(f"lineage-{uuid.uuid4().hex[:12]}")
    return None


def worker_policy_dir(settings: GovernanceSettings) -> Path:
    """Where the embedded engine reads Rego when no engine block says otherwise."""
    return settings.policy_dir or packaged_policy_dir()


def packaged_policy_dir() -> Path:
    """The Rego library shipped inside the package."""
    from importlib.resources import files

    return Path(str(files("prefect_governance.policies")))


def worker_lineage_url(settings: GovernanceSettings) -> str:
    """The lineage a worker writes to when no lineage-store block is named:
    PREFECT_GOVERNANCE_LINEAGE_URL, else SQLite under PREFECT_HOME."""
    if settings.lineage_url is not None:
        return settings.lineage_url.get_secret_value()
    return default_lineage_url()


def default_lineage_url() -> str:
    """SQLite under PREFECT_HOME, where Prefect keeps its own local state."""
    from prefect.settings import get_current_settings

    home = Path(get_current_settings().home).expanduser()
    (home / "governance").mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'governance' / 'lineage.db'}"
