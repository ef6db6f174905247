"""Worker-wide settings, read from ``PREFECT_GOVERNANCE_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from prefect_governance.envelope import MAX_PARAMETER_BYTES, MAX_PARAMETER_DEPTH

# Worker credentials that must never reach a flow run's environment.
WORKER_SECRETS = (
    "PREFECT_GOVERNANCE_SIGNING_KEY",
    "PREFECT_GOVERNANCE_LINEAGE_URL",
    "PREFECT_GOVERNANCE_OPA_TOKEN",
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
    envelope_ttl: float = Field(600.0, gt=0, description="Seconds an envelope stays valid.")
    approver_keys: dict[str, str] = Field(
        default_factory=dict,
        description="Approvers the worker trusts, as JSON {approver: Ed25519 public key "
        "(URL-safe base64)}: a signed approval counts only when it verifies with the key "
        "pinned here for the approver it names.",
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
            "private_key",
        ],
        description="Parameter names containing any of these (case-insensitive) are redacted.",
    )


def worker_policy_dir(settings: GovernanceSettings) -> Path:
    """Where the embedded engine reads Rego when no engine block says otherwise."""
    return settings.policy_dir or packaged_policy_dir()


def packaged_policy_dir() -> Path:
    """The Rego library shipped inside the package."""
    from importlib.resources import files

    return Path(str(files("prefect_governance.policies")))


def default_lineage_url() -> str:
    """SQLite under PREFECT_HOME, where Prefect keeps its own local state."""
    from prefect.settings import get_current_settings

    home = Path(get_current_settings().home).expanduser()
    (home / "governance").mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'governance' / 'lineage.db'}"
