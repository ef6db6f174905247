"""The run-side gate: a governed pool's flow runs start here, not in Prefect's bare engine.

A governed pool's base job template fixes the command (not a job variable, so
no deployment can change it) to ``/dev/null/governed-worker-python -I -m
prefect_governance.gate``. No process can start from that path, so a stock
worker that takes the pool's runs starts nothing, whatever the job's
environment or working directory. The governed worker replaces the path with
its own interpreter's and names its key. It starts the gate hermetically:
Python's isolated mode (no ``PYTHON*`` variables, no user site, no working
directory on ``sys.path``), a fresh empty working directory and an environment
of the worker's own (the run's environment and working directory travel in
``PREFECT_GOVERNANCE_FLOW_ENV`` / ``..._FLOW_CWD``, applied only after the checks).

Before any flow code loads, the gate checks that this very flow run holds
authority to run:

1. a grant (``PREFECT_GOVERNANCE_ENVELOPE``) signed by a key this process was
   told to trust on its command line (``--trusted-key KID=PUBLIC``; the governed
   worker adds its own key when it starts the run; the pool's template names
   none, so a run started by any other worker has no trusted key), issued for
   this flow run and not expired;
2. the flow run, as the Prefect server holds it, carries that grant's decision
   (``governance.decision_id``) and was never refused (no ``Refused`` state in its
   history: refused is final);
3. the grant was not used before: its envelope id is claimed once, atomically,
   as a Prefect variable (``governance-envelope-<id>``).

Then it enters the run's working directory and replaces itself (``execve``) with
Prefect's engine under the run's own environment, exactly as Prefect's process
worker would have started it. Otherwise it marks the flow run Crashed with the
reason and exits 3; the flow's code never loads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any
from uuid import UUID

from prefect_governance.core.errors import GovernanceError
from prefect_governance.core.handoff import (
    ENVELOPE_ENV,
    FLOW_CWD,
    FLOW_ENV,
    GATE_MODULE,
    STARTED_AT_ENV,
    TRUSTED_KEYS_ENV,
    prior_refusal,
)
from prefect_governance.core.models import RUNNABLE, Grant
from prefect_governance.runtime import EnvelopeError, Verified, verify_signed_grant

REFUSED_EXIT = 3
# How the gate starts Prefect's engine after its checks: as `python -m prefect.engine`
# would, but with no working directory on sys.path and this package imported first, so
# nothing in the run's working directory shadows Prefect or the governance runtime
# (Prefect adds the working directory itself while it imports the flow's module).
ENGINE_BOOT = (
    "import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
    "import prefect_governance, runpy; "
    "runpy.run_module('prefect.engine', run_name='__main__', alter_sys=True)"
)
NONCE_PREFIX = "governance-envelope-"


class GateRefusal(GovernanceError):
    """This process may not run the flow run; the message says why."""


def trusted_keys(pairs: Sequence[str]) -> dict[str, str]:
    """``KID=PUBLIC`` arguments as a key id to public key mapping."""
    keys = {}
    for pair in pairs:
        kid, sep, public = pair.partition("=")
        if not sep or not kid or not public:
            raise GateRefusal(f"--trusted-key {pair!r} is not KID=PUBLIC_KEY")
        keys[kid] = public
    return keys


def check_grant(
    signed_text: str | None,
    *,
    flow_run_id: str | None,
    keys: Mapping[str, str],
    now: datetime,
) -> Verified:
    """The grant, verified against the trusted keys only, or GateRefusal saying why."""
    if not keys:
        raise GateRefusal(
            "no trusted key on the command line: this run was not started by a governed "
            "worker (a governed pool's runs start only through governed-process workers)"
        )
    try:
        return verify_signed_grant(
            signed_text, flow_run_id=flow_run_id, now=now, public_key=keys.get
        )
    except EnvelopeError as exc:
        raise GateRefusal(str(exc)) from None


def check_history(state_names: Iterable[str | None]) -> None:
    """GateRefusal when the run's state history holds a refusal."""
    reason = prior_refusal(state_names)
    if reason:
        raise GateRefusal(reason)


def check_run(grant: Grant, labels: Mapping[str, Any]) -> None:
    """The flow run as the server holds it must carry this grant's decision, not a refusal."""
    verdict = labels.get("governance.decision")
    decision_id = labels.get("governance.decision_id")
    if verdict == "refused":
        raise GateRefusal(f"governance refused this flow run (decision {decision_id})")
    if decision_id != grant.decision_id:
        raise GateRefusal(
            f"the flow run carries decision {decision_id!r}, not the grant's "
            f"{grant.decision_id!r}: the grant is not this run's current authority"
        )
    if verdict not in RUNNABLE:
        raise GateRefusal(f"the flow run's decision is {verdict!r}, not one that runs")


def _claim(client: Any, grant: Grant) -> None:
    """Claim the grant's envelope once; GateRefusal if it was claimed before (a replay)."""
    from prefect.client.schemas.actions import VariableCreate
    from prefect.exceptions import ObjectAlreadyExists

    name = f"{NONCE_PREFIX}{grant.envelope.id}"
    try:
        client.create_variable(
            VariableCreate(name=name, value=grant.envelope.flow_run.id, tags=["governance"])
        )
    except ObjectAlreadyExists:
        raise GateRefusal(
            f"the grant (envelope {grant.envelope.id}) was used before: a run starts once "
            "per decision"
        ) from None


def authorize(
    flow_run_id: str | None, signed_text: str | None, keys: Mapping[str, str]
) -> Verified:
    """All three checks, against the Prefect server; GateRefusal when one fails."""
    from prefect.client.orchestration import get_client

    verified = check_grant(
        signed_text, flow_run_id=flow_run_id, keys=keys, now=datetime.now(timezone.utc)
    )
    run_id = UUID(flow_run_id)  # check_grant refused a run without one
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(run_id)
        check_run(verified.grant, flow_run.labels or {})
        check_history(state.name for state in client.read_flow_run_states(run_id))
        _claim(client, verified.grant)
    return verified


def _crash(flow_run_id: str | None, reason: str) -> None:
    """Mark the run Crashed with the gate's reason (best effort: the exit code says it too)."""
    if not flow_run_id:
        return
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    try:
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(
                flow_run_id, Crashed(message=f"prefect-governance gate: {reason}"), force=True
            )
    except Exception as exc:  # the refusal stands; only its record failed
        print(f"prefect-governance gate: could not mark the run Crashed: {exc!r}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=GATE_MODULE, description="Start a governed flow run only with its authority."
    )
    parser.add_argument("--trusted-key", action="append", default=[], metavar="KID=PUBLIC")
    args = parser.parse_args(argv)
    flow_run_id = os.environ.get("PREFECT__FLOW_RUN_ID")
    try:
        keys = trusted_keys(args.trusted_key)
        authorize(flow_run_id, os.environ.get(ENVELOPE_ENV), keys)
    except GateRefusal as refusal:
        print(f"prefect-governance gate: refused: {refusal}", file=sys.stderr)
        _crash(flow_run_id, f"refused: {refusal}")
        return REFUSED_EXIT
    except Exception as exc:  # could not check: closed
        print(f"prefect-governance gate: could not check this run: {exc!r}", file=sys.stderr)
        _crash(flow_run_id, f"could not check this run: {exc!r}")
        return REFUSED_EXIT
    environment, cwd = flow_environment(os.environ, keys, datetime.now(timezone.utc))
    if cwd:
        os.chdir(cwd)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-c", ENGINE_BOOT], environment)
    return 0  # not reached


def flow_environment(
    gate_env: Mapping[str, str], keys: Mapping[str, str], started_at: datetime
) -> tuple[dict[str, str], str | None]:
    """The environment and working directory Prefect's engine starts in, after the checks.

    The run's own environment (as Prefect's process worker would have given it; the
    gate's own when the governed worker sent none), with the Prefect variables of the
    gate's environment on top (the worker's settings and its runner's ``PREFECT__*``,
    which also win over a job's under the stock worker).
    The flow's code verifies its grant (prefect_governance.runtime) with the keys the
    gate trusted and against the time it started, not with anything a deployment put
    in the environment.
    """
    try:
        declared = json.loads(gate_env[FLOW_ENV]) if FLOW_ENV in gate_env else dict(gate_env)
    except json.JSONDecodeError:
        declared = {}
    environment = {str(k): str(v) for k, v in dict(declared).items() if v is not None}
    environment.update(
        (key, value)
        for key, value in gate_env.items()
        if key.startswith("PREFECT") and key not in (FLOW_ENV, FLOW_CWD)
    )
    environment[TRUSTED_KEYS_ENV] = json.dumps(keys)
    environment[STARTED_AT_ENV] = started_at.isoformat()
    return environment, gate_env.get(FLOW_CWD) or None
