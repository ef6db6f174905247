"""How a decision reads to people: the refusal message and the decision artifact."""

from __future__ import annotations

from collections.abc import Sequence

from prefect_governance.lineage import LineageEvent
from prefect_governance.models import Decision

_TITLES = {
    "allowed": "Allowed",
    "refused": "Refused",
    "audited": "Denied, but run (audit mode)",
    "ungoverned": "Run ungoverned (engine failed, pool is fail-open)",
}


def refusal_message(decision: Decision) -> str:
    """The message of a Refused state: reasons and decision id, on one line."""
    reasons = "; ".join(decision.deny) or "no reason given"
    return (
        f"Refused by governance policy {decision.policy_path} "
        f"(decision {decision.id}, engine {decision.engine}): {reasons}"
    )


def decision_markdown(decision: Decision, agent_id: str | None) -> str:
    """The markdown artifact attached to the flow run."""
    lines = [
        f"# Governance decision: {_TITLES[decision.verdict]}",
        "",
        "| field | value |",
        "| --- | --- |",
        f"| decision id | `{decision.id}` |",
        f"| agent | `{agent_id or '-'}` |",
        f"| policy | `{decision.policy_path}` |",
        f"| revision | `{decision.policy_revision or '-'}` |",
        f"| engine | `{decision.engine}` |",
        f"| mode | `{decision.mode}` (fail {decision.fail_mode}) |",
        f"| latency | {decision.latency_ms:.3f} ms |",
    ]
    for title, items in (("Reasons (deny)", decision.deny), ("Warnings", decision.warn)):
        if items:
            lines += ["", f"## {title}", ""] + [f"- {item}" for item in items]
    if decision.annotations:
        lines += ["", "## Annotations", ""] + [
            f"- `{key}`: {value}" for key, value in sorted(decision.annotations.items())
        ]
    return "\n".join(lines) + "\n"


def lineage_table(events: Sequence[LineageEvent]) -> str:
    """Lineage events as a plain-text table, oldest first."""
    rows = [("time", "kind", "agent", "flow run", "verdict/state", "engine", "reasons/warnings")]
    for e in reversed(list(events)):
        what = e.verdict if e.kind == "decision" else e.state
        notes = "; ".join([*e.reasons, *e.warnings])
        rows.append(
            (
                e.created_at.strftime("%H:%M:%S"),
                e.kind,
                e.agent_id or "-",
                (e.flow_run_id or "-")[:8],
                what or "-",
                e.engine or "-",
                notes[:90] + ("…" if len(notes) > 90 else ""),
            )
        )
    return format_table(rows)


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, a rule under the header."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
