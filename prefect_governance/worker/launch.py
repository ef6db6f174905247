"""How the governed worker starts an allowed run: the gate, hermetically (pure functions).

The gate process gets the worker's interpreter in isolated mode, a fresh working
directory and an environment of the worker's own; the run's environment and
working directory reach Prefect's engine only after the gate's checks (see
``prefect_governance.gate``). Before that, a run whose job variables set an
environment variable that changes what a process starts or loads is refused,
unless the pool allows it (``env_allow``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase

from prefect_governance.core.handoff import (
    FLOW_CWD,
    FLOW_ENV,
    GATE_MODULE,
    ISOLATED,
    UNSTARTABLE_PYTHON,
)

# Variables that change which program starts, which code it loads or where its
# configuration comes from; a job may set them only where the pool allows it.
UNSAFE_ENV = (
    "PATH",
    "PYTHON*",
    "LD_*",
    "DYLD_*",
    "GCONV_PATH",
    "OPENSSL_CONF",
    "OPENSSL_ENGINES",
    "OPENSSL_MODULES",
    "PREFECT_HOME",
    "PREFECT_PROFILES_PATH",
    "PREFECT_LOGGING_SETTINGS_PATH",
    "PREFECT_GOVERNANCE_*",
)
# What the gate keeps of the worker's own environment (never the job's values).
GATE_KEEPS = (
    "HOME",
    "TMPDIR",
    "TZ",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
)


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(key, pattern) for pattern in patterns)


def unsafe_env(
    job_env: Mapping[str, str | None], worker_env: Mapping[str, str], allowed: Sequence[str]
) -> list[str]:
    """The variables the job's environment sets (to a value other than the worker's own)
    that change what starts or loads, and that the pool does not allow; sorted."""
    return sorted(
        key
        for key, value in job_env.items()
        if value is not None
        and value != worker_env.get(key)
        and _matches(key, UNSAFE_ENV)
        and not _matches(key, allowed)
    )


def unsafe_env_reason(keys: Sequence[str]) -> str:
    return (
        f"the job sets {', '.join(keys)} in the run's environment, which changes what the "
        "run's process starts or loads; only the work pool may allow that (env_allow)"
    )


def uses_gate(command: str | None) -> bool:
    """Whether a pool's command starts runs through the gate."""
    return GATE_MODULE in (command or "")


def is_current_gate(command: str | None) -> bool:
    """Whether it is today's gate command, which no stock worker can start."""
    return uses_gate(command) and (command or "").startswith(UNSTARTABLE_PYTHON)


def gate_argv(python: str, trusted_key: str) -> list[str]:
    """The gate's command line: this interpreter, isolated, trusting this key only."""
    return [python, ISOLATED, "-m", GATE_MODULE, "--trusted-key", trusted_key]


def gate_environment(
    run_env: Mapping[str, str | None],
    worker_env: Mapping[str, str],
    *,
    secrets: Iterable[str],
    add: Mapping[str, str],
    working_dir: str | None,
) -> dict[str, str | None]:
    """The gate process's environment, as overrides of Prefect's runner (``None`` unsets).

    Every variable is unset but a few of the worker's own (``GATE_KEEPS``) and ``add``;
    Prefect's runner puts the worker's Prefect settings and its ``PREFECT__*`` back on
    top. The run's environment (without the worker's secrets, with ``add``) and working
    directory travel as data, for the gate to apply after its checks.
    """
    hidden = set(secrets)
    flow_env = {k: v for k, v in run_env.items() if v is not None and k not in hidden}
    flow_env.update(add)
    overrides: dict[str, str | None] = dict.fromkeys({*run_env, *worker_env})
    overrides.update((k, worker_env[k]) for k in GATE_KEEPS if k in worker_env)
    overrides.update(add)
    overrides[FLOW_ENV] = json.dumps(flow_env)
    if working_dir:
        overrides[FLOW_CWD] = working_dir
    return overrides
