"""Detection: flow runs of governed pools that ran without their decision, or against it.

The governed worker decides every run before it starts, so every run of a governed
pool that executed has a decision in the lineage, the decision let it run, and the
run carries the decision's id as its ``governance.decision_id`` label. A run that
breaks this was started around the gate: by a stock worker on the pool, by hand
(``prefect flow-run execute``, a forced state), or under a decision that is not its own.

``judge`` is the pure judgement of one flow run against the decisions the lineage
holds for it; ``audit`` reads the runs of a time range from Prefect and their
decisions from the lineage, and judges each.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Literal

from prefect_governance.core.errors import GovernanceError
from prefect_governance.lineage.store import as_utc

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import FlowRun, WorkPool

    from prefect_governance.lineage.store import LineageStore

GOVERNED_POOL_TYPE = "governed-process"
DECISION_LABEL = "governance.decision_id"
PAGE_SIZE = 200  # the server's default page limit
_ID_CHUNK = 500  # flow run ids per lineage query

FindingKind = Literal[
    "executed_without_decision",
    "executed_though_refused",
    "executed_while_awaiting_approval",
    "runs_under_another_decision",
]
FINDING_TITLES: dict[str, str] = {
    "executed_without_decision": "executed without a decision",
    "executed_though_refused": "executed though refused",
    "executed_while_awaiting_approval": "executed while awaiting approval",
    "runs_under_another_decision": "runs under another decision",
}


class AuditError(GovernanceError):
    """The audit cannot be done as asked: an unknown pool, a lineage store that cannot be read."""


@dataclass(frozen=True)
class RunFacts:
    """What the audit needs to know about one flow run."""

    id: str
    name: str
    pool: str
    state_type: str | None  # SCHEDULED, PENDING, RUNNING, COMPLETED, CANCELLED, ...
    state_name: str | None
    start_time: datetime | None
    labels: Mapping[str, Any] = field(default_factory=dict)
    run_count: int | None = None  # times it entered RUNNING (None: not known)
    end_time: datetime | None = None


@dataclass(frozen=True)
class DecisionFact:
    """One decision the lineage holds for a flow run; ``order`` is its lineage record id."""

    decision_id: str | None
    verdict: str | None
    created_at: datetime
    order: int = 0


@dataclass(frozen=True)
class Finding:
    kind: FindingKind
    flow_run_id: str
    flow_run_name: str
    pool: str
    state: str
    start_time: datetime | None
    detail: str
    decision_id: str | None = None  # the decision the finding is about, if any

    @property
    def title(self) -> str:
        return FINDING_TITLES[self.kind]

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "finding": self.title,
            "flow_run_id": self.flow_run_id,
            "flow_run_name": self.flow_run_name,
            "pool": self.pool,
            "state": self.state,
            "start_time": self.start_time.isoformat() if self.start_time else None,
            "decision_id": self.decision_id,
            "detail": self.detail,
        }


def started(run: RunFacts) -> bool:
    """Whether the run ever began executing: it is RUNNING now, or it entered RUNNING
    before (Prefect counts every entry, forced ones too, in ``run_count``).

    A start time alone does not say so: Prefect 3 stamps one on a run that enters a
    final state without having run (a refused run reads CANCELLED with start time =
    end time). Without a run count, a start time counts only if the run did not end
    at that very moment.
    """
    if run.state_type == "RUNNING":
        return True
    if run.run_count is not None:
        return run.run_count > 0
    if run.start_time is None:
        return False
    return run.end_time is None or as_utc(run.end_time) > as_utc(run.start_time)


def decision_facts(events: Iterable[Any]) -> list[DecisionFact]:
    """The run decisions among lineage records (task decisions and outcomes are not)."""
    return [
        DecisionFact(e.decision_id, e.verdict, as_utc(e.created_at), e.id or 0)
        for e in events
        if e.kind == "decision"
    ]


def _state(run: RunFacts) -> str:
    if run.state_type is None:
        return "no state"
    if run.state_name and run.state_name.upper() != run.state_type:
        return f"{run.state_type}/{run.state_name}"
    return run.state_type


def _when(value: datetime | None) -> str:
    return as_utc(value).isoformat(timespec="seconds") if value else "-"


def _left_refused(run: RunFacts, refusal: DecisionFact) -> bool:
    """The worker's refusal stands: CANCELLED/Refused, and any start came before the
    refusal (a run that ran under an earlier decision, then was decided again)."""
    return (
        run.state_type == "CANCELLED"
        and run.state_name == "Refused"
        and (run.start_time is None or as_utc(run.start_time) < refusal.created_at)
    )


def judge(run: RunFacts, decisions: Sequence[DecisionFact]) -> list[Finding]:
    """The findings on one flow run of a governed pool, given the decisions the lineage
    holds for its id (pure). A run that has not started is never a finding."""
    if not started(run):
        return []

    def finding(kind: FindingKind, detail: str, decision_id: str | None = None) -> Finding:
        return Finding(
            kind, run.id, run.name, run.pool, _state(run), run.start_time, detail, decision_id
        )

    if not decisions:
        return [
            finding(
                "executed_without_decision",
                f"started {_when(run.start_time)}; the lineage holds no decision for this run",
            )
        ]
    findings = []
    latest = max(decisions, key=lambda d: (d.order, d.created_at))
    if latest.verdict == "refused" and not _left_refused(run, latest):
        findings.append(
            finding(
                "executed_though_refused",
                f"decision {latest.decision_id} ({_when(latest.created_at)}) refused it, "
                f"but it is {_state(run)}, started {_when(run.start_time)}",
                latest.decision_id,
            )
        )
    if latest.verdict == "awaiting_approval":
        findings.append(
            finding(
                "executed_while_awaiting_approval",
                f"decision {latest.decision_id} ({_when(latest.created_at)}) had it wait for "
                f"an approval, but it is {_state(run)}, started {_when(run.start_time)}",
                latest.decision_id,
            )
        )
    label = run.labels.get(DECISION_LABEL)
    held = {d.decision_id for d in decisions if d.decision_id}
    if label in (None, ""):
        findings.append(
            finding(
                "runs_under_another_decision",
                f"no {DECISION_LABEL} label; the lineage holds decision "
                f"{', '.join(sorted(held)) or '(without an id)'} for it",
            )
        )
    elif str(label) not in held:
        findings.append(
            finding(
                "runs_under_another_decision",
                f"its {DECISION_LABEL} label names {label}, which the lineage does not hold "
                f"for this run (it holds {', '.join(sorted(held)) or 'none with an id'})",
                str(label),
            )
        )
    return findings


# --- the time range -----------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(w|d|h|m|s)", re.IGNORECASE)
_UNITS = {"w": "weeks", "d": "days", "h": "hours", "m": "minutes", "s": "seconds"}


def parse_when(text: str, now: datetime) -> datetime:
    """An ISO 8601 time (naive: UTC) or a duration before ``now`` (``24h``, ``7d``,
    ``1h30m``; units w, d, h, m, s). Raises ValueError."""
    value = text.strip()
    compact = value.replace(" ", "")
    if compact and _DURATION.sub("", compact) == "":
        delta = timedelta()
        for amount, unit in _DURATION.findall(compact):
            delta += timedelta(**{_UNITS[unit.lower()]: float(amount)})
        return now - delta
    try:
        return as_utc(datetime.fromisoformat(value))
    except ValueError:
        raise ValueError(
            f"{text!r} is neither an ISO 8601 time nor a duration like 24h, 7d or 1h30m"
        ) from None


# --- reading Prefect and the lineage ------------------------------------------------


@dataclass
class AuditResult:
    findings: list[Finding]
    pools: list[str]
    runs: int  # flow runs audited
    since: datetime
    until: datetime
    notes: list[str] = field(default_factory=list)

    @property
    def flagged_runs(self) -> int:
        return len({f.flow_run_id for f in self.findings})

    def summary(self) -> str:
        pools = f"{len(self.pools)} pool{'s' if len(self.pools) != 1 else ''}"
        if self.pools:
            pools += f" ({', '.join(self.pools)})"
        scope = (
            f"{self.runs} flow run{'s' if self.runs != 1 else ''} in {pools}, "
            f"{_when(self.since)} .. {_when(self.until)}"
        )
        if not self.findings:
            return f"no findings: {scope}"
        count = len(self.findings)
        return (
            f"{count} finding{'s' if count != 1 else ''} on {self.flagged_runs} "
            f"flow run{'s' if self.flagged_runs != 1 else ''}: {scope}"
        )


def facts_of(flow_run: FlowRun, pool: str) -> RunFacts:
    state = flow_run.state
    return RunFacts(
        id=str(flow_run.id),
        name=flow_run.name,
        pool=pool,
        state_type=state.type.value if state is not None else None,
        state_name=state.name if state is not None else None,
        start_time=flow_run.start_time,
        labels=dict(flow_run.labels or {}),
        run_count=flow_run.run_count,
        end_time=flow_run.end_time,
    )


async def governed_pools(client: PrefectClient, names: Sequence[str] = ()) -> list[WorkPool]:
    """The pools named (each must exist), else every pool of type governed-process."""
    from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterType
    from prefect.exceptions import ObjectNotFound

    if names:
        pools = []
        for name in dict.fromkeys(names):
            try:
                pools.append(await client.read_work_pool(name))
            except ObjectNotFound:
                raise AuditError(f"no work pool named {name!r}") from None
        return pools
    wanted = WorkPoolFilter(type=WorkPoolFilterType(any_=[GOVERNED_POOL_TYPE]))
    pools, offset = [], 0
    while True:
        page = await client.read_work_pools(limit=PAGE_SIZE, offset=offset, work_pool_filter=wanted)
        pools += page
        if len(page) < PAGE_SIZE:
            return sorted(pools, key=lambda p: p.name)
        offset += len(page)


async def pool_runs(
    client: PrefectClient, pool: str, since: datetime, until: datetime
) -> list[FlowRun]:
    """The pool's flow runs expected to start, or started, in [since, until].

    Two keyset-paginated queries (by expected_start_time, then by start_time), each
    sorted by its time and continued from the last time seen: a run created while the
    audit pages cannot shift another out of a page. Ties longer than a page are
    paged through by offset.
    """
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
        FlowRunFilterStartTime,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    in_pool = WorkPoolFilter(name=WorkPoolFilterName(any_=[pool]))
    queries = (
        (
            "expected_start_time",
            FlowRunFilterExpectedStartTime,
            FlowRunSort.EXPECTED_START_TIME_ASC,
        ),
        ("start_time", FlowRunFilterStartTime, FlowRunSort.START_TIME_ASC),
    )
    runs: dict[Any, FlowRun] = {}
    for name, criterion, sort in queries:
        after, offset = since, 0
        while True:
            page = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(**{name: criterion(after_=after, before_=until)}),
                work_pool_filter=in_pool,
                sort=sort,
                limit=PAGE_SIZE,
                offset=offset,
            )
            for flow_run in page:
                runs[flow_run.id] = flow_run
            if len(page) < PAGE_SIZE:
                break
            last = getattr(page[-1], name)
            if last is None or as_utc(last) <= as_utc(after):
                offset += len(page)  # a page of one time: go on through it by offset
            else:
                after, offset = last, 0
    return list(runs.values())


def read_decisions(
    store: LineageStore, flow_run_ids: Iterable[str]
) -> dict[str, list[DecisionFact]]:
    """The decisions the lineage holds for each of these flow runs (those a pinned lineage
    key vouches for: any other record counts as absent)."""
    found = store.decisions_of(flow_run_ids, chunk=_ID_CHUNK)
    return {flow_run_id: decision_facts(events) for flow_run_id, events in found.items()}


async def lineage_url_of(pool: WorkPool, client: PrefectClient, override: str | None) -> str:
    """The lineage a pool's governed worker writes to: the pool's lineage-store block,
    else PREFECT_GOVERNANCE_LINEAGE_URL, else SQLite in PREFECT_HOME (``override`` wins)."""
    from prefect_governance.core.controls import pool_defaults
    from prefect_governance.core.settings import GovernanceSettings, worker_lineage_url
    from prefect_governance.worker.blocks import GovernanceLineageStore

    if override:
        return override
    block = pool_defaults(pool.base_job_template)["lineage_store"]
    if block:
        try:
            loaded: GovernanceLineageStore = await GovernanceLineageStore.aload(
                block, client=client
            )
        except Exception as exc:
            raise AuditError(
                f"pool {pool.name}: cannot load its lineage-store block {block!r}: {exc}"
            ) from None
        return loaded.url.get_secret_value()
    return worker_lineage_url(GovernanceSettings())


async def audit(
    since: datetime,
    until: datetime,
    *,
    pools: Sequence[str] = (),
    lineage_url: str | None = None,
    client: PrefectClient | None = None,
) -> AuditResult:
    """Judge every flow run of the governed pools (or of ``pools``) expected to start or
    started in [since, until] against the decisions of its pool's lineage."""
    from prefect import get_client

    from prefect_governance.lineage.store import LineageStore

    if client is None:
        async with get_client() as own:
            return await audit(since, until, pools=pools, lineage_url=lineage_url, client=own)
    since, until = as_utc(since), as_utc(until)
    result = AuditResult([], [], 0, since, until)
    stores: dict[str, LineageStore] = {}
    try:
        for pool in await governed_pools(client, pools):
            result.pools.append(pool.name)
            if pool.type != GOVERNED_POOL_TYPE:
                result.notes.append(
                    f"pool {pool.name} is of type {pool.type}, not {GOVERNED_POOL_TYPE}: "
                    "audited as named"
                )
            runs = [
                facts_of(r, pool.name) for r in await pool_runs(client, pool.name, since, until)
            ]
            result.runs += len(runs)
            if not runs:
                continue
            url = await lineage_url_of(pool, client, lineage_url)
            if url not in stores:
                try:
                    stores[url] = LineageStore(url)
                except Exception as exc:
                    raise AuditError(
                        f"pool {pool.name}: cannot open its lineage database: {exc}"
                    ) from None
            decisions = read_decisions(stores[url], (r.id for r in runs))
            for run in sorted(runs, key=lambda r: (r.start_time is None, r.start_time or since)):
                result.findings += judge(run, decisions.get(run.id, []))
    finally:
        for store in stores.values():
            store.dispose()
    return result


def findings_table(findings: Sequence[Finding]) -> str:
    from prefect_governance.worker.report import format_table

    rows = [("finding", "flow run", "name", "pool", "state", "started", "detail")]
    rows += [
        (f.title, f.flow_run_id, f.flow_run_name, f.pool, f.state, _when(f.start_time), f.detail)
        for f in findings
    ]
    return format_table(rows)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)
