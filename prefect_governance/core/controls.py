"""Which governance settings apply to a run: the pool sets them, a deployment may only tighten.

A deployment author must not be able to switch governance off with a job
variable, so the settings below are read from the work pool's template and an
override from a deployment or flow run is honoured only when it is stricter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prefect_governance.core.models import (
    DEFAULT_POLICY_PATH,
    DEFAULT_TASK_POLICY_PATH,
    FailMode,
    Mode,
)

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
    "policy_path": DEFAULT_POLICY_PATH,
    "task_policy_path": DEFAULT_TASK_POLICY_PATH,
    "engine": None,
    "lineage_store": None,
    "signing_key": None,
    "env_allow": [],
    "mode": "enforce",
    "fail_mode": "closed",
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
