"""Prefect blocks the worker reads: the agent object, the policy engine and the lineage store.

The key blocks (which a run may read too) are in ``prefect_governance.core.keys``.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect.blocks.core import Block
from pydantic import ConfigDict, Field, SecretStr

from prefect_governance.core.canonical import sha256_of
from prefect_governance.core.engines import PolicyEngine, build_engine
from prefect_governance.core.exceptions import ExceptionSpec
from prefect_governance.core.keys import LOGO
from prefect_governance.core.models import (
    DEFAULT_POLICY_PATH,
    AgentObject,
    Constraints,
    EngineRef,
    Mode,
    TrustState,
)
from prefect_governance.core.trust import TrustWeights
from prefect_governance.lineage.store import LineageStore


class GovernanceAgent(Block):
    """The typed identity a deployment runs as: who it is, what it may do, how far it is trusted."""

    _block_type_name = "Governance Agent"
    _block_type_slug = "governance-agent"
    _logo_url = LOGO
    _description = (
        "An agent object for prefect-governance: identity, capabilities, trust scope, "
        "memory schema and governance constraints. Deployments name it in the `agent` job variable."
    )

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", description="Stable agent id.")
    version: int = Field(1, ge=1)
    owner: str = Field(min_length=1, description="Who answers for this agent.")
    trust_scope: list[str] = Field(description="Work pools this agent may run in.")
    capabilities: list[str] = Field(default_factory=list, description="Capabilities it may use.")
    memory_schema: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object"}, description="JSON Schema of its memory."
    )
    policy_ref: str | None = Field(
        None, description=f"OPA path of its policy (default: the pool's, {DEFAULT_POLICY_PATH})."
    )
    constraints: Constraints = Field(default_factory=Constraints)
    mode: Mode | None = Field(
        None,
        description="`enforce` makes the agent's runs enforced even in an audit pool; "
        "`audit` is ignored (only the work pool may relax enforcement).",
    )
    deployments: list[str] = Field(
        default_factory=list,
        description="Who may act as this agent: `flow-name/deployment-name`, fnmatch globs "
        "over that name, or deployment UUIDs. Empty: no deployment may.",
    )
    trust_baseline: float = Field(1.0, ge=0.0, le=1.0, description="Trust before any history.")
    trust_weights: TrustWeights = Field(
        default_factory=TrustWeights, description="How much each kind of event moves trust."
    )
    trust_window: int = Field(3, ge=2, le=100, description="Runs the trust slope is taken over.")
    attestation: dict[str, Any] | None = Field(
        None,
        description="The pool owner's signature over this block's name and every other field "
        "(written by `prefect-governance apply --signing-key`; see "
        "prefect_governance.core.attestation).",
    )

    @property
    def memory_schema_hash(self) -> str:
        return sha256_of(self.memory_schema)

    def to_agent_object(self, policy_path: str, trust: TrustState) -> AgentObject:
        """The agent as the policy sees it."""
        return AgentObject(
            id=self.id,
            version=self.version,
            owner=self.owner,
            trust_scope=list(self.trust_scope),
            capabilities=list(self.capabilities),
            memory_schema_hash=self.memory_schema_hash,
            policy_ref=policy_path,
            constraints=self.constraints,
            trust=trust,
        )


class GovernanceException(Block, ExceptionSpec):
    """A signed waiver of named rules for some agents, deployments or pools, until it expires."""

    _block_type_name = "Governance Exception"
    _block_type_slug = "governance-exception"
    _logo_url = LOGO
    _description = (
        "A policy exception for prefect-governance: the rules it waives, its scope, owner, "
        "reason, ticket and expiry, signed by the security team's key "
        "(see prefect_governance.core.exceptions)."
    )
    # A block takes Prefect's own keys (block_type_slug); the worker validates the data as
    # an ExceptionSpec, which forbids any other field.
    model_config = ConfigDict(extra="allow")


class GovernancePolicyEngine(Block):
    """Where decisions are made: the embedded Rego engine or an OPA sidecar."""

    _block_type_name = "Governance Policy Engine"
    _block_type_slug = "governance-policy-engine"
    _logo_url = LOGO
    _description = "The policy engine a governed work pool asks: embedded Rego or an OPA sidecar."

    kind: Literal["embedded", "opa"] = "embedded"
    policy_dir: str | None = Field(
        None, description="Embedded: directory of Rego modules (default: the packaged library)."
    )
    opa_url: str | None = Field(None, description="OPA: base URL, e.g. http://127.0.0.1:8181.")
    token: SecretStr | None = Field(None, description="OPA: bearer token.")
    ca_cert: str | None = Field(None, description="OPA: CA bundle that signed OPA's certificate.")
    client_cert: str | None = Field(None, description="OPA: client certificate (mutual TLS).")
    client_key: str | None = Field(None, description="OPA: client key (mutual TLS).")
    timeout_seconds: float = Field(
        2.0, gt=0, description="Seconds one evaluation may take (OPA: per request)."
    )
    retries: int = Field(
        1, ge=0, le=5, description="OPA: retries on connection errors, timeouts and 5xx."
    )
    breaker_failures: int = Field(
        3, ge=0, description="OPA: consecutive failures that open the circuit (0: never)."
    )
    breaker_reset_seconds: float = Field(
        30.0, ge=0, description="OPA: seconds the circuit stays open before a trial request."
    )

    def build(self) -> PolicyEngine:
        """A ready engine; the embedded one compiles its policies here, once."""
        return build_engine(
            EngineRef(
                kind=self.kind,
                policy_dir=self.policy_dir,
                url=self.opa_url,
                ca_cert=self.ca_cert,
                timeout=self.timeout_seconds,
                retries=self.retries,
            ),
            token=self.token.get_secret_value() if self.token else None,
            client_cert=self.client_cert,
            client_key=self.client_key,
            breaker_failures=self.breaker_failures,
            breaker_reset_seconds=self.breaker_reset_seconds,
        )


class GovernanceLineageStore(Block):
    """The database that keeps the lineage (SQLite file or PostgreSQL)."""

    _block_type_name = "Governance Lineage Store"
    _block_type_slug = "governance-lineage-store"
    _logo_url = LOGO
    _description = "SQLAlchemy URL of the prefect-governance lineage database."

    url: SecretStr = Field(description="e.g. postgresql+psycopg://user:pw@host/db or sqlite:///...")

    def open(self) -> LineageStore:
        return LineageStore(self.url.get_secret_value())
