"""Which governance settings apply to a run: the pool sets them, a deployment may only tighten.

A deployment author must not be able to switch governance off with a job
variable, so the settings below are read from the work pool's template and an
override from a deployment or flow run is honoured only when it is stricter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field

from prefect_governance.core.models import (
    DEFAULT_POLICY_PATH,
    DEFAULT_TASK_POLICY_PATH,
    FailMode,
    Mode,
)


class GovernedVariables(BaseModel):
    """The governed job variables, one definition for every governed worker type.

    A governed worker's job variables and job configuration both derive from this
    (with Prefect's own for its infrastructure); what they resolve to is ``Controls``.
    """

    agent: str | None = Field(
        default=None,
        title="Agent",
        description="Name of the governance-agent block this deployment runs as.",
    )
    capabilities: list[str] = Field(
        default_factory=list,
        title="Capabilities",
        description="Capabilities the run asks for; each must be granted to the agent.",
    )
    policy_path: str = Field(
        default=DEFAULT_POLICY_PATH,
        title="Policy path",
        description="OPA path of the decision (set on the pool; an agent's policy_ref wins).",
    )
    task_policy_path: str = Field(
        default=DEFAULT_TASK_POLICY_PATH,
        title="Task policy path",
        description="OPA path of the decision on each governed task in a run (set on the pool).",
    )
    mode: Mode = Field(
        default="enforce",
        title="Mode",
        description="`enforce` refuses denied runs; `audit` records and labels them but runs them.",
    )
    fail_mode: FailMode = Field(
        default="closed",
        title="Fail mode",
        description="When the engine cannot decide: `closed` refuses, `open` runs ungoverned.",
    )
    engine: str | None = Field(
        default=None,
        title="Policy engine block",
        description="Name of a governance-policy-engine block (default: embedded engine).",
    )
    lineage_store: str | None = Field(
        default=None,
        title="Lineage store block",
        description="Name of a governance-lineage-store block (default: SQLite in PREFECT_HOME).",
    )
    signing_key: str | None = Field(
        default=None,
        title="Signing key block",
        description="Name of a governance-signing-key block (default: the "
        "PREFECT_GOVERNANCE_SIGNING_KEY seed, else a key generated per worker process).",
    )
    env_allow: list[str] = Field(
        default_factory=list,
        title="Environment variables allowed",
        description="Names or patterns (e.g. `PYTHONPATH`, `LD_*`) of variables that change "
        "what a run's process starts or loads and that jobs may still set (set on the pool).",
    )

    def requested(self) -> dict[str, Any]:
        """What these variables ask for, as ``resolve_controls`` takes it."""
        return {name: getattr(self, name) for name in GovernedVariables.model_fields}


# Settings only the work pool (its base job template) may set.
POOL_ONLY = (
    "policy_path",
    "task_policy_path",
    "engine",
    "lineage_store",
    "signing_key",
    "env_allow",
)
# Settings a deployment may change only in the stricter direction.
STRICTER = {"mode": "enforce", "fail_mode": "closed"}
DEFAULTS: dict[str, Any] = {
    name: GovernedVariables.model_fields[name].get_default(call_default_factory=True)
    for name in (*POOL_ONLY, *STRICTER)
}


@dataclass(frozen=True)
class Controls:
    agent: str | None
    capabilities: list[str]
    policy_path: str = DEFAULT_POLICY_PATH
    task_policy_path: str = DEFAULT_TASK_POLICY_PATH
    mode: Mode = "enforce"
    fail_mode: FailMode = "closed"
    engine: str | None = None
    lineage_store: str | None = None
    signing_key: str | None = None
    # Patterns of environment variables a job may set though they change what starts.
    env_allow: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def pool_defaults(base_job_template: dict[str, Any] | None) -> dict[str, Any]:
    """The defaults of the pool's job variables for the governance settings."""
    properties = ((base_job_template or {}).get("variables") or {}).get("properties") or {}
    return {
        key: (properties.get(key) or {}).get("default", default)
        for key, default in DEFAULTS.items()
    }


def resolve_controls(pool: dict[str, Any], requested: dict[str, Any]) -> Controls:
    """Merge the pool's settings with what the run's job variables ask for."""
    chosen: dict[str, Any] = {}
    notes: list[str] = []
    for key, default in DEFAULTS.items():
        pool_value = pool.get(key, default)
        wanted = requested.get(key, pool_value)
        if wanted == pool_value or (key in STRICTER and wanted == STRICTER[key]):
            chosen[key] = wanted
        else:
            chosen[key] = pool_value
            notes.append(
                f"job variable {key}={wanted!r} from the deployment or run is ignored: "
                f"only the work pool may set it{' less strictly' if key in STRICTER else ''} "
                f"(pool: {pool_value!r})"
            )
    capabilities = requested.get("capabilities") or []
    return Controls(
        agent=requested.get("agent") or None,
        capabilities=[str(c) for c in capabilities],
        notes=notes,
        **chosen,
    )


def controls_for(base_job_template: dict[str, Any] | None, requested: dict[str, Any]) -> Controls:
    """The controls of one run: what its job variables ask for, as the pool allows it."""
    return resolve_controls(pool_defaults(base_job_template), requested)
