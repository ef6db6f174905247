"""How a decision reads to people: the refusal message and the decision artifact."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from prefect_governance.core.decision import deny_reasons, rule_of
from prefect_governance.core.models import Decision, MemorySnapshot, TrustState
from prefect_governance.lineage.events import LineageEvent
from prefect_governance.lineage.store import ChainProblem

if TYPE_CHECKING:
    from prefect_governance.worker.blocks import GovernanceAgent

_TITLES = {
    "allowed": "Allowed",
    "refused": "Refused",
    "audited": "Denied, but run (audit mode)",
    "ungoverned": "Run ungoverned (engine failed, pool is fail-open)",
    "awaiting_approval": "Awaiting approval (nothing started yet)",
}


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def refusal_message(decision: Decision) -> str:
    """The message of a Refused state: reasons (with their rules) and decision id, on one line."""
    message = (
        f"Refused by governance policy {decision.policy_path} "
        f"(decision {decision.id}, engine {decision.engine}): {deny_reasons(decision)}"
    )
    if decision.rejected_approvals:
        message += "; approvals not accepted: " + "; ".join(decision.rejected_approvals)
    if decision.rejected_exceptions:
        message += "; exceptions not accepted: " + "; ".join(decision.rejected_exceptions)
    return message


def approval_deadline(decision: Decision, since: datetime) -> datetime:
    """Until when an awaiting run may wait: its shortest requested timeout from ``since``."""
    return since + timedelta(seconds=min(r.timeout_seconds for r in decision.approval))


def approvers_of(decision: Decision) -> list[str]:
    """Everyone who may approve the run (of any of its requests)."""
    return sorted({a for request in decision.approval for a in request.approvers})


def approve_command(flow_run_id: str) -> str:
    return f"prefect-governance approve --flow-run {flow_run_id} --approver NAME --key FILE"


def awaiting_message(decision: Decision, flow_run_id: str, deadline: datetime) -> str:
    """The message of an AwaitingApproval state: who may approve, until when, how."""
    reasons = "; ".join(r.reason for r in decision.approval if r.reason)
    message = (
        f"Awaiting approval by one of {', '.join(approvers_of(decision)) or 'nobody'} until "
        f"{deadline.isoformat()} (decision {decision.id}): {reasons or 'the policy asks for it'}. "
        f"Approve: `{approve_command(flow_run_id)}` (add --reject to refuse it)"
    )
    if decision.rejected_approvals:
        message += "; approvals not accepted: " + "; ".join(decision.rejected_approvals)
    return message


def decision_markdown(decision: Decision, agent_id: str | None, awaiting: str | None = None) -> str:
    """The markdown artifact attached to the flow run (``awaiting``: the message of a run
    that waits for an approval)."""
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
    for title, kind, items in (
        ("Reasons (deny)", "deny", decision.deny),
        ("Warnings", "warn", decision.warn),
    ):
        if items:
            lines += ["", f"## {title}", "", "| message | rule |", "| --- | --- |"] + [
                f"| {_cell(item)} | `{rule_of(decision, item, kind) or '-'}` |" for item in items
            ]
    if decision.approval:
        lines += ["", "## Awaiting approval", "", awaiting or "", ""]
        lines += ["| approvers | timeout | reason | rule |", "| --- | --- | --- | --- |"] + [
            f"| {', '.join(r.approvers)} | {r.timeout_seconds} s | {_cell(r.reason)} | "
            f"`{r.rule or '-'}` |"
            for r in decision.approval
        ]
    if decision.rejected_approvals:
        lines += ["", "## Approvals not accepted", ""] + [
            f"- {_cell(item)}" for item in decision.rejected_approvals
        ]
    if decision.waived:
        lines += ["", "## Waived by exception", "", "| message | rule | exception |"]
        lines += ["| --- | --- | --- |"] + [
            f"| {_cell(w.message)} | `{w.rule}` | `{_cell(w.exception)}` |" for w in decision.waived
        ]
    if decision.rejected_exceptions:
        lines += ["", "## Exceptions not accepted", ""] + [
            f"- {_cell(item)}" for item in decision.rejected_exceptions
        ]
    if decision.annotations:
        lines += ["", "## Annotations", ""] + [
            f"- `{key}`: {value}" for key, value in sorted(decision.annotations.items())
        ]
    return "\n".join(lines) + "\n"


def lineage_table(events: Sequence[LineageEvent]) -> str:
    """Lineage events as a plain-text table, oldest first."""
    rows = [("time", "kind", "agent", "flow run", "verdict/state", "engine", "reasons/warnings")]
    for e in reversed(list(events)):
        what = e.verdict or e.state
        notes = (
            inside_run_summary(e) if e.kind in _INSIDE_RUN else "; ".join([*e.reasons, *e.warnings])
        )
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


_BARS = "▁▂▃▄▅▆▇█"


def sparkline(scores: Sequence[float]) -> str:
    """Scores in [0, 1] as a row of bars."""
    return "".join(_BARS[min(len(_BARS) - 1, int(score * len(_BARS)))] for score in scores)


# What an agent's mode means for its runs: only the pool may relax enforcement.
_MODE_SHOWN = {
    None: "as the pool says",
    "enforce": "enforce, even in an audit pool",
    "audit": "as the pool says (an agent's audit is ignored)",
}


def _kid(attestation: Any) -> str:
    kid = attestation.get("kid") if isinstance(attestation, dict) else None
    return f"by key {kid!r} (workers verify it)" if kid else "none (workers refuse it)"


def agent_report(
    agent: GovernanceAgent,
    memory: MemorySnapshot,
    trust: TrustState,
    history: Sequence[float],
) -> str:
    """What `prefect-governance agent show` prints."""
    lines = [
        f"agent      {agent.id} (version {agent.version}, owner {agent.owner})",
        f"scope      pools {', '.join(agent.trust_scope) or '-'}; "
        f"capabilities {', '.join(agent.capabilities) or '-'}",
        f"mode       {_MODE_SHOWN[agent.mode]}; policy {agent.policy_ref or 'the pool default'}",
        f"acts for   {', '.join(agent.deployments) or 'no deployment'}; "
        f"attestation {_kid(agent.attestation)}",
        f"memory     version {memory.version} {memory.content_hash or ''}".rstrip(),
    ]
    content = json.dumps(memory.content, indent=2, sort_keys=True)
    lines += ["           " + line for line in content.splitlines()]
    lines += [
        f"trust      {trust.score:.2f} (slope {trust.slope:+.3f} over the last "
        f"{len(trust.window)} runs; {trust.runs} runs decided, {trust.refusals} refused)",
        f"history    {sparkline(history) or '(no runs yet)'}  "
        + " ".join(f"{s:.2f}" for s in history[-10:]),
    ]
    return "\n".join(lines)


def _ranges(ranges: Sequence[tuple[int, int]]) -> str:
    return ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in ranges)


def verify_report(
    chain_sizes: dict[str, int],
    problems: Sequence[ChainProblem],
    unvouched: Mapping[str, Sequence[tuple[int, int]]] | None = None,
    *,
    pinned: Sequence[str] = (),
) -> str:
    """What `prefect-governance lineage verify` prints: each chain intact or broken, and the
    records of it no pinned key vouches for (which count as absent)."""
    bad = {p.chain: p for p in problems}
    unvouched = unvouched or {}

    def status(chain: str) -> str:
        if chain in bad:
            return f"BROKEN: {bad[chain].message}"
        if chain in unvouched:
            return f"intact; NOT VOUCHED FOR (ignored): records {_ranges(unvouched[chain])}"
        return "intact, vouched for"

    lines = [
        f"{chain:24} {size:6} records  {status(chain)}"
        for chain, size in sorted(chain_sizes.items())
    ]
    total = sum(chain_sizes.values())
    verdicts = []
    if problems:
        verdicts.append(f"{len(problems)} of {len(chain_sizes)} chains broken")
    if unvouched:
        count = sum(b - a + 1 for ranges in unvouched.values() for a, b in ranges)
        keys = ", ".join(pinned) or "none: set PREFECT_GOVERNANCE_LINEAGE_KEYS"
        verdicts.append(f"{count} records not vouched for by a pinned key (pinned: {keys})")
    if not verdicts:
        verdicts.append(f"all {len(chain_sizes)} chains intact and vouched for ({total} records)")
    return "\n".join([*lines, *verdicts])


def chain_table(events: Sequence[LineageEvent]) -> str:
    """One agent's chain: sequence, kind, what happened, and the links."""
    rows = [("seq", "time", "kind", "flow run", "what", "hash", "prev", "details")]
    for e in events:
        what = e.verdict or e.state or _payload_summary(e)
        details = inside_run_summary(e) if e.kind in _INSIDE_RUN else "; ".join(e.reasons)
        rows.append(
            (
                str(e.seq),
                e.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                e.kind,
                (e.flow_run_id or "-")[:8],
                what or "-",
                (e.hash or "-")[7:19],
                (e.prev_hash or "-")[7:19],
                details,
            )
        )
    return format_table(rows)


# The records of governance inside a flow run, appended after the run.
_INSIDE_RUN = frozenset({"task_decision", "capability_use", "task_end", "report_problem"})


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _score(value: object) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.2f}"
    return "?"


def task_label(payload: dict[str, Any]) -> str:
    """``name (attempt N)``, as the other records inside a run name their task."""
    task = _dict(payload.get("task"))
    attempt = task.get("attempt")
    return f"{task.get('name', '?')}" + (f" (attempt {attempt})" if attempt is not None else "")


def outcome_cell(payload: dict[str, Any]) -> str:
    """The task's outcome, and a blocked capability use inside it (the other trust event)."""
    events = payload.get("events")
    blocked = isinstance(events, list) and "capability_blocked" in events
    return f"{payload.get('outcome', '?')}" + (", capability blocked" if blocked else "")


def trust_cell(payload: dict[str, Any]) -> str:
    """The agent's trust before and after the task, as committed."""
    return f"{_score(payload.get('previous'))} -> {_score(payload.get('score'))}"


def memory_cell(payload: dict[str, Any]) -> str:
    """The task's memory change: committed vN (its fields), rejected: why, discarded, or -."""
    memory = payload.get("memory")
    if not isinstance(memory, dict):
        return "-"
    status = memory.get("status")
    fields = memory.get("fields")
    if status == "committed":
        written = f" ({', '.join(map(str, fields))})" if isinstance(fields, list) and fields else ""
        rebased = " rebased" if memory.get("rebased") else ""
        return f"committed v{memory.get('version')}{written}{rebased}"
    errors = memory.get("errors")
    why = "; ".join(map(str, errors)) if isinstance(errors, list) else ""
    return f"{status}: {why}" if why else str(status)


def check_cell(payload: dict[str, Any]) -> str:
    """Empty when the run's word agreed with the worker's recomputation; else why not."""
    check = _dict(payload.get("check"))
    return "" if check.get("verified") is True else f"NOT VERIFIED: {check.get('why')}"


def inside_run_summary(event: LineageEvent) -> str:
    """One line on a task decision, a capability use, a task's end or a problem with a
    run's report."""
    payload = _dict(event.payload)
    reasons = "; ".join(str(r) for r in event.reasons or [])
    if event.kind == "report_problem":
        return reasons
    if event.kind == "task_end":
        line = f"task {task_label(payload)}: {outcome_cell(payload)}; trust {trust_cell(payload)}"
        line += f"; memory {memory_cell(payload)}"
        disagreed = check_cell(payload)
        return f"{line} [{disagreed}]" if disagreed else line
    task = _dict(payload.get("task"))
    if event.kind == "capability_use":
        where = f"task {task.get('name')}" if task else "the flow body"
        use = f" ({payload.get('use')})" if payload.get("use") else ""
        line = f"{payload.get('capability')} by {where}{use}"
        return f"{line}: {reasons}" if event.verdict != "used" and reasons else line
    # a task decision
    task = task or _dict(_dict(payload.get("envelope")).get("task"))
    attempt = [f"attempt {task['attempt']}"] if task.get("attempt") is not None else []
    purpose = {"retry": ["retry re-ask"], "commit": ["memory commit"]}
    retry = purpose.get(str(payload.get("purpose")), [])
    when = f" ({', '.join([*attempt, *retry])})" if attempt or retry else ""
    line = f"task {task.get('name', '?')}{when}"
    if reasons:
        line += f": {reasons}"
    check = _dict(payload.get("check"))
    if check.get("verified") is False:
        line += f" [NOT VERIFIED: {check.get('why')}]"
    elif "verified" in check and check.get("verified") is None:
        line += f" [unverified: {check.get('why')}]"
    return line


def _payload_summary(event: LineageEvent) -> str:
    payload = event.payload or {}
    if event.kind == "report_problem":
        count = len(event.reasons or [])
        return f"{count} report problem{'s' if count != 1 else ''}"
    if event.kind == "memory_commit":
        return f"v{payload.get('version')}"
    if event.kind == "trust":
        return f"{payload.get('previous')} -> {payload.get('score')}"
    if event.kind in ("memory_rejected", "memory_discarded"):
        return "; ".join(event.reasons) or str(payload.get("reason", ""))
    return ""
