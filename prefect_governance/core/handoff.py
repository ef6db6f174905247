"""What the worker and the run it starts hand each other (pure constants and one rule).

The governed worker starts an allowed run through the gate
(``python -m prefect_governance.gate``), with the signed grant and the run's report
secret in its environment; the run reports back through artifacts with these keys.
Both sides import these names from here, so neither imports the other.
"""

from __future__ import annotations

from collections.abc import Iterable

REFUSED_STATE = "Refused"

GATE_MODULE = "prefect_governance.gate"
# No process starts from a path under /dev/null (not a directory), whatever PATH,
# the working directory or a preloaded library say: only the governed worker,
# which puts its own interpreter here, starts the gate.
UNSTARTABLE_PYTHON = "/dev/null/governed-worker-python"
ISOLATED = "-I"  # Python's isolated mode: no PYTHON* variables, user site or cwd on sys.path
GATE_COMMAND = f"{UNSTARTABLE_PYTHON} {ISOLATED} -m {GATE_MODULE}"
# Set by the governed worker: the run's own environment (JSON) and working directory.
FLOW_ENV = "PREFECT_GOVERNANCE_FLOW_ENV"
FLOW_CWD = "PREFECT_GOVERNANCE_FLOW_CWD"

# The run's decision id, its signed grant and its report secret, in its environment.
DECISION_ENV = "PREFECT_GOVERNANCE_DECISION_ID"
ENVELOPE_ENV = "PREFECT_GOVERNANCE_ENVELOPE"
TRUSTED_KEYS_ENV = "PREFECT_GOVERNANCE_TRUSTED_KEYS"
# When the gate checked the grant and started the run (ISO time, set by the gate).
STARTED_AT_ENV = "PREFECT_GOVERNANCE_STARTED_AT"
PROPOSAL_KEY = "governance-memory-proposal"
REPORT_SECRET_ENV = "PREFECT_GOVERNANCE_REPORT_SECRET"
RUN_EVENTS_KEY = "governance-run-events"
EVENT_KINDS = ("task_decision", "capability_use", "task_end")


def prior_refusal(
    state_names: Iterable[str | None],
    label_verdict: str | float | None = None,  # a Prefect label's value
    lineage_decision_id: str | None = None,
) -> str | None:
    """Why a run counts as refused before, if it does (pure).

    Refused is final: a run refused once never runs; trying again is a new run,
    decided afresh. Any one witness suffices: a ``Refused`` state in the run's
    history (which the API cannot remove), its decision label, or a refused
    decision of it in the lineage.
    """
    witnesses = []
    if lineage_decision_id:
        witnesses.append(f"the lineage holds refused decision {lineage_decision_id}")
    if REFUSED_STATE in state_names:
        witnesses.append("a Refused state is in its history")
    if label_verdict == "refused":
        witnesses.append("its governance.decision label is refused")
    if not witnesses:
        return None
    return (
        f"governance refused this flow run before ({'; '.join(witnesses)}): a refused run "
        "never runs; start a new run to have it decided again"
    )
