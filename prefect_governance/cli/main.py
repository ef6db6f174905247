"""The ``prefect-governance`` command line."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from prefect_governance.core.approvals import Binding
    from prefect_governance.core.engines.base import EngineError, PolicyEngine
    from prefect_governance.core.models import Decision
    from prefect_governance.lineage.store import LineageStore

app = typer.Typer(
    name="prefect-governance",
    help="Policy-governed Prefect work pools: decide every flow run with Rego before it runs.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def apply(
    path: Annotated[Path, typer.Argument(help="A YAML file or a directory of them.")] = Path(
        "blocks"
    ),
    signing_key: Annotated[
        Path | None,
        typer.Option(
            "--signing-key",
            help="File holding the pool owner's Ed25519 seed agents are signed with "
            "(default: PREFECT_GOVERNANCE_AGENT_SIGNING_KEY; see `keygen`).",
        ),
    ] = None,
    key_id: Annotated[
        str | None,
        typer.Option(
            "--key-id",
            help="That key's id (default: PREFECT_GOVERNANCE_AGENT_SIGNING_KEY_ID, else "
            "pool-owner).",
        ),
    ] = None,
    exception_key: Annotated[
        Path | None,
        typer.Option(
            "--exception-key",
            help="File holding the security team's Ed25519 seed exceptions are signed with "
            "(default: PREFECT_GOVERNANCE_EXCEPTION_SIGNING_KEY; see `keygen --exception`).",
        ),
    ] = None,
    exception_key_id: Annotated[
        str | None,
        typer.Option(
            "--exception-key-id",
            help="That key's id (default: PREFECT_GOVERNANCE_EXCEPTION_SIGNING_KEY_ID, else "
            "security).",
        ),
    ] = None,
) -> None:
    """Create or update the blocks described by YAML documents, and the server-side
    guards (Prefect automations; see prefect_governance.cli.automations). Idempotent.
    Agents are signed with the pool owner's key, exceptions with the security team's
    exception key; without its key such a document is not applied (exit 1)."""
    import os

    from prefect import get_client

    from prefect_governance.cli.apply import (
        DocumentError,
        SigningKeyError,
        agent_signing_key,
        apply_documents,
        exception_signing_key,
        load_documents,
        max_exception_lifetime,
    )
    from prefect_governance.cli.automations import apply_guards

    try:
        documents = load_documents(path)
        agent_key = agent_signing_key(signing_key, key_id, os.environ)
        exceptions_key = exception_signing_key(exception_key, exception_key_id, os.environ)
        lifetime = max_exception_lifetime(os.environ)
    except (DocumentError, SigningKeyError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None

    async def apply_all() -> bool:
        skipped = False
        for change in await apply_documents(
            documents, agent_key=agent_key, exception_key=exceptions_key, max_lifetime=lifetime
        ):
            typer.echo(f"{change.action:9}  {change.kind:13}  {change.name}  ({change.path})")
            if change.reason:
                skipped = True
                typer.echo(f"error: {change.kind} {change.name}: {change.reason}", err=True)
        async with get_client() as client:
            for name, action in await apply_guards(client):
                typer.echo(f"{action:9}  {'automation':13}  {name}")
        return not skipped

    raise typer.Exit(0 if asyncio.run(apply_all()) else 1)


@app.command()
def keygen(
    output: Annotated[Path, typer.Argument(help="File to write the new seed to (mode 0600).")],
    key_id: Annotated[
        str | None,
        typer.Option(
            "--key-id",
            help="The id the key is pinned under (default: pool-owner; governance-lineage).",
        ),
    ] = None,
    lineage: Annotated[
        bool, typer.Option("--lineage", help="A worker's lineage key instead of an agent key.")
    ] = False,
    exception: Annotated[
        bool,
        typer.Option(
            "--exception", help="The security team's exception key instead of an agent key."
        ),
    ] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing file.")] = False,
) -> None:
    """Make an Ed25519 key: the pool owner's for signing agents (workers pin it in
    PREFECT_GOVERNANCE_AGENT_KEYS), or with --lineage a worker's for signing lineage records
    (workers and verifiers pin it in PREFECT_GOVERNANCE_LINEAGE_KEYS). Print KID=PUBLIC."""
    import os

    from prefect_governance.cli.apply import KEY_ID_PATTERN
    from prefect_governance.core.attestation import KEYS_ENV
    from prefect_governance.core.exceptions import DEFAULT_KEY_ID as EXCEPTION_KEY_ID
    from prefect_governance.core.exceptions import KEYS_ENV as EXCEPTION_KEYS_ENV
    from prefect_governance.core.signing import SigningKey

    if lineage and exception:
        raise typer.BadParameter("one of --lineage and --exception", param_hint="--exception")
    default_id = "governance-lineage" if lineage else "pool-owner"
    key_id = key_id or (EXCEPTION_KEY_ID if exception else default_id)
    if not KEY_ID_PATTERN.match(key_id):
        raise typer.BadParameter("lowercase letters, digits and dashes", param_hint="--key-id")
    if output.exists() and not force:
        typer.echo(f"error: {output} exists (--force replaces it)", err=True)
        raise typer.Exit(2)
    key = SigningKey.generate(key_id)
    output.unlink(missing_ok=True)
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key.seed_b64 + "\n")
    typer.echo(key.trusted_key)
    pinned = json.dumps({key.key_id: key.public_b64})
    if lineage:
        typer.echo(
            f"wrote the seed to {output}; give it to the worker only "
            f"(PREFECT_GOVERNANCE_LINEAGE_KEY=<seed>, PREFECT_GOVERNANCE_LINEAGE_KEY_ID="
            f"{key.key_id}), and pin the public key on every worker and verifier: "
            f"PREFECT_GOVERNANCE_LINEAGE_KEYS='{pinned}'",
            err=True,
        )
        return
    if exception:
        typer.echo(
            f"wrote the seed to {output}; keep it with the security team (`apply "
            f"--exception-key {output}`), never on a worker, and pin the public key on every "
            f"governed worker: {EXCEPTION_KEYS_ENV}='{pinned}'",
            err=True,
        )
        return
    typer.echo(
        f"wrote the seed to {output}; pin the public key on every governed worker: "
        f"{KEYS_ENV}='{pinned}'",
        err=True,
    )


@app.command()
def decide(
    deployment: Annotated[str, typer.Argument(help="FLOW_NAME/DEPLOYMENT_NAME")],
    param: Annotated[
        list[str] | None,
        typer.Option("--param", "-p", help="KEY=VALUE (VALUE as JSON if it parses)."),
    ] = None,
    show_input: Annotated[
        bool, typer.Option("--input/--no-input", help="Print the policy input.")
    ] = True,
) -> None:
    """Decide a run of a deployment without running anything; print the decision, what the
    run would start (its infrastructure) and the input."""
    from prefect_governance.cli.decide import decide_deployment

    parameters = {}
    for item in param or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--param")
        try:
            parameters[key] = json.loads(raw)
        except json.JSONDecodeError:
            parameters[key] = raw
    assessment, infrastructure = asyncio.run(decide_deployment(deployment, parameters))
    out: dict[str, Any] = {
        "decision": assessment.decision.model_dump(mode="json"),
        # What the run would start (envelope.infrastructure): null when the pool's worker
        # type is not installed here.
        "infrastructure": infrastructure.model_dump(mode="json") if infrastructure else None,
    }
    if show_input:
        out["input"] = assessment.policy_input
    typer.echo(json.dumps(out, indent=2))
    raise typer.Exit(0 if assessment.decision.runs else 1)


@app.command()
def approve(
    key: Annotated[
        Path,
        typer.Option(help="File with the approver's Ed25519 seed (URL-safe base64, 32 bytes)."),
    ],
    approver: Annotated[
        str, typer.Option(help="Your approver name: the key id the worker pins your key under.")
    ],
    flow_run: Annotated[
        str | None, typer.Option("--flow-run", help="Approve this flow run (with its parameters).")
    ] = None,
    deployment: Annotated[
        str | None,
        typer.Option(help="Approve new runs of this deployment (FLOW/NAME or id) ..."),
    ] = None,
    parameters: Annotated[
        str | None,
        typer.Option(
            help="... with exactly these parameters (a JSON object; the deployment's "
            "defaults fill in the rest)."
        ),
    ] = None,
    expires: Annotated[
        str, typer.Option(help="How long the approval is valid: 30m, 1h, 2d.")
    ] = "1h",
    reason: Annotated[str | None, typer.Option(help="Why (recorded with the approval).")] = None,
    reject: Annotated[
        bool, typer.Option("--reject", help="Reject the run instead: it is refused.")
    ] = False,
) -> None:
    """Sign an approval (or, with --reject, a rejection) and store it where the governed
    worker finds it (a Prefect variable).

    Approve a flow run while it is Scheduled or AwaitingApproval, or a deployment's
    parameters before the run is created. It counts only if the worker pins your public
    key under your approver name (PREFECT_GOVERNANCE_APPROVER_KEYS) and the policy names
    you as an approver of the run."""
    from datetime import datetime, timezone

    from prefect import get_client

    from prefect_governance.core.approvals import (
        binding_for_deployment,
        binding_for_flow_run,
        new_statement,
        parse_duration,
        sign_statement,
        store_approval,
    )
    from prefect_governance.core.signing import SigningKey

    if (flow_run is None) == (deployment is None):
        raise typer.BadParameter("give either --flow-run or --deployment", param_hint="--flow-run")
    if parameters is not None and deployment is None:
        raise typer.BadParameter("--parameters goes with --deployment", param_hint="--parameters")
    try:
        given = json.loads(parameters) if parameters is not None else {}
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint="--parameters") from None
    if not isinstance(given, dict):
        raise typer.BadParameter("a JSON object", param_hint="--parameters")
    try:
        ttl = parse_duration(expires)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--expires") from None
    try:
        signing_key = SigningKey.from_seed(approver, key.read_text())
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(f"{key}: {exc}", param_hint="--key") from None

    async def sign_and_store() -> dict[str, object]:
        async with get_client() as client:
            state = None
            binding: Binding
            if flow_run is not None:
                binding, state = await binding_for_flow_run(client, flow_run)
            else:
                assert deployment is not None
                binding = await binding_for_deployment(client, deployment, given)
            statement = new_statement(
                approver=approver,
                binding=binding,
                now=datetime.now(timezone.utc),
                ttl=ttl,
                reason=reason,
                decision="reject" if reject else "approve",
            )
            name = await store_approval(client, sign_statement(statement, signing_key))
        if state is not None and state != "SCHEDULED":
            typer.echo(
                f"warning: the flow run is {state}; an approval counts only for a run not "
                "decided yet",
                err=True,
            )
        return {"variable": name, **statement.model_dump(mode="json")}

    typer.echo(json.dumps(asyncio.run(sign_and_store()), indent=2))


lineage_app = typer.Typer(
    help="The lineage: list, show, verify and export events.", no_args_is_help=True
)
agent_app = typer.Typer(help="Agents: identity, memory and trust.", no_args_is_help=True)
app.add_typer(lineage_app, name="lineage")
app.add_typer(agent_app, name="agent")
exception_app = typer.Typer(
    help="Policy exceptions: signed waivers with an owner and an expiry.", no_args_is_help=True
)
app.add_typer(exception_app, name="exception")
policy_app = typer.Typer(help="Policy authoring: validate, evaluate, test.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")
notification_app = typer.Typer(
    help="Notifications of decisions (applied from `kind: notification` documents).",
    no_args_is_help=True,
)
app.add_typer(notification_app, name="notification")


@notification_app.command("remove")
def notification_remove(
    name: Annotated[str, typer.Argument(help="The notification document's name.")],
) -> None:
    """Delete the automation a `kind: notification` document applied (exit 1 if none)."""
    from prefect import get_client

    from prefect_governance.cli.automations import NOTIFY, remove_notification

    async def remove() -> int:
        async with get_client() as client:
            return await remove_notification(client, name)

    removed = asyncio.run(remove())
    typer.echo(f"{'removed' if removed else 'absent':9}  {'automation':13}  {NOTIFY}{name}")
    raise typer.Exit(0 if removed else 1)


UrlOption = Annotated[
    str | None,
    typer.Option(
        help="Lineage database URL (default: PREFECT_GOVERNANCE_LINEAGE_URL, "
        "else SQLite in PREFECT_HOME)."
    ),
]


def _lineage_url(url: str | None) -> str:
    from prefect_governance.core.settings import GovernanceSettings, worker_lineage_url

    return url if url is not None else worker_lineage_url(GovernanceSettings())


def _store(url: str | None) -> LineageStore:
    from prefect_governance.lineage.store import LineageStore

    return LineageStore(_lineage_url(url))


@lineage_app.command("list")
def lineage_list(
    limit: Annotated[int, typer.Option(help="How many events, newest first.")] = 20,
    agent: Annotated[str | None, typer.Option(help="Only this agent's events.")] = None,
    url: UrlOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List recent lineage events."""
    from prefect_governance.worker.report import lineage_table

    store = _store(url)
    events = store.recent(limit, agent_id=agent)
    if as_json:
        for event in events:
            typer.echo(event.model_dump_json())
    else:
        typer.echo(lineage_table(events))
    store.dispose()


@lineage_app.command("show")
def lineage_show(
    agent: Annotated[str, typer.Option(help="The agent whose chain to show.")],
    url: UrlOption = None,
) -> None:
    """An agent's hash chain, oldest first; then the history of its runs' governed tasks."""
    from prefect_governance.cli.history import history_report, run_histories
    from prefect_governance.worker.report import chain_table

    store = _store(url)
    chain = store.chain(agent)
    typer.echo(chain_table(chain))
    if runs := run_histories(chain):
        typer.echo("")
        typer.echo(history_report(runs))
    store.dispose()


@lineage_app.command("verify")
def lineage_verify(url: UrlOption = None) -> None:
    """Recompute every chain; name the first altered, deleted or reordered record, and the
    records no key pinned in PREFECT_GOVERNANCE_LINEAGE_KEYS vouches for (exit 1)."""
    from prefect_governance.worker.report import verify_report

    store = _store(url)
    problems = store.verify()
    unvouched = store.unvouched_chains()
    typer.echo(verify_report(store.lengths(), problems, unvouched, pinned=sorted(store.keys)))
    store.dispose()
    raise typer.Exit(1 if problems or unvouched else 0)


@lineage_app.command("upgrade")
def lineage_upgrade(url: UrlOption = None) -> None:
    """Migrate the lineage database to this release's schema (workers also do it on open)."""
    from prefect_governance.lineage.migrations import SchemaError, upgrade

    try:
        done = upgrade(_lineage_url(url))
    except SchemaError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    before = ", ".join(done.before) or "none"
    after = ", ".join(done.after) or "none"
    adopted = (
        " (a database from before migrations, adopted at the baseline)" if done.adopted else ""
    )
    typer.echo(
        f"lineage schema: {before} -> {after}{adopted}"
        if done.changed
        else f"lineage schema: {after}, up to date"
    )


@lineage_app.command("export")
def lineage_export(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="File to write (default: stdout).")
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="Only `openlineage` for now.")
    ] = "openlineage",
    agent: Annotated[str | None, typer.Option(help="Only this agent's runs.")] = None,
    url: UrlOption = None,
) -> None:
    """Write governed runs as OpenLineage run events, one JSON object per line (only the
    records a pinned lineage key vouches for)."""
    import sys

    from prefect_governance.cli.openlineage import to_openlineage, write_jsonl

    if fmt != "openlineage":
        raise typer.BadParameter("only `openlineage` is supported", param_hint="--format")
    store = _store(url)
    chains = [agent] if agent else store.chains()
    events = to_openlineage(row for chain in chains for row in store.authentic(store.chain(chain)))
    store.dispose()
    write_jsonl(events, output if output else sys.stdout)


@agent_app.command("show")
def agent_show(
    name: Annotated[str, typer.Argument(help="The governance-agent block's name.")],
    url: UrlOption = None,
    runs: Annotated[
        int, typer.Option(min=0, help="How many of the newest runs with governed tasks to show.")
    ] = 5,
) -> None:
    """Identity, memory version and content, trust score, slope and history; then the
    governed tasks of its newest runs (outcome, trust, memory change, check)."""
    from prefect_governance.cli.history import agent_text
    from prefect_governance.worker.blocks import GovernanceAgent

    agent: GovernanceAgent = GovernanceAgent.load(name)  # type: ignore[assignment]  # sync here
    store = _store(url)
    typer.echo(agent_text(store, agent, runs))
    store.dispose()


@policy_app.command("validate")
def policy_validate(
    file: Annotated[Path, typer.Argument(help="A policy input or result, as JSON.")],
    kind: Annotated[
        str,
        typer.Option(
            help="input, result, task_input, task_result, or auto (by its top-level fields)."
        ),
    ] = "auto",
) -> None:
    """Check a policy input or result document against the published JSON Schema."""
    from prefect_governance.cli.schema import guess_kind, validate_document

    try:
        document = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        typer.echo(f"{file}: not a JSON document: {exc}", err=True)
        raise typer.Exit(2) from None
    kinds = ("input", "result", "task_input", "task_result", "auto")
    if kind not in kinds:
        raise typer.BadParameter(", ".join(kinds), param_hint="--kind")
    chosen = guess_kind(document) if kind == "auto" else kind
    errors = validate_document(document, chosen)  # type: ignore[arg-type]
    for error in errors:
        typer.echo(f"{file}: {error}")
    typer.echo(f"{file}: {'invalid' if errors else 'valid'} policy {chosen}")
    raise typer.Exit(1 if errors else 0)


def _default_policy_dir() -> Path:
    """Where the worker's embedded engine reads Rego: PREFECT_GOVERNANCE_POLICY_DIR or the
    policies shipped in the package."""
    from prefect_governance.core.settings import GovernanceSettings, worker_policy_dir

    return worker_policy_dir(GovernanceSettings())


PoliciesOption = Annotated[
    Path | None,
    typer.Option(
        help="The policy directory (default: PREFECT_GOVERNANCE_POLICY_DIR, "
        "else the policies shipped in the package)."
    ),
]
OpaBinOption = Annotated[
    str | None,
    typer.Option("--opa", help="The opa binary (default: OPA_BIN, else opa on the PATH)."),
]


@policy_app.command("test")
def policy_test(
    policies: PoliciesOption = None,
    opa: OpaBinOption = None,
    embedded_only: Annotated[
        bool, typer.Option("--embedded-only", help="Run the embedded engine only.")
    ] = False,
) -> None:
    """Run the Rego unit tests in the embedded engine and in OPA; fail on any difference."""
    from prefect_governance.cli import policy_tools as tools

    policy_dir = policies or _default_policy_dir()
    if not policy_dir.is_dir():
        typer.echo(f"error: {policy_dir} is not a directory", err=True)
        raise typer.Exit(2)
    try:
        binary = None if embedded_only else tools.find_opa(opa)
        tests = tools.discover_tests(policy_dir)
        if not tests:
            typer.echo(f"no tests found: no test_ rules in *_test.rego files under {policy_dir}")
            raise typer.Exit(1)
        embedded = tools.run_embedded_tests(policy_dir, tests)
        results = tools.run_opa_tests(policy_dir, binary, tests) if binary else None
    except tools.PolicyToolError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if binary is None and not embedded_only:
        typer.echo("opa not found: ran the embedded engine only")
    comparisons = tools.compare(embedded, results)
    for line in tools.report_lines(comparisons, results is not None):
        typer.echo(line)
    raise typer.Exit(0 if tools.all_passed(comparisons, results is not None) else 1)


@policy_app.command("eval")
def policy_eval(
    input_file: Annotated[
        Path, typer.Option("--input", help="The policy input, as JSON (see `policy validate`).")
    ],
    engine: Annotated[str, typer.Option(help="embedded or opa.")] = "embedded",
    policies: PoliciesOption = None,
    path: Annotated[
        str | None,
        typer.Option(
            "--path", help="The policy path (default: the input's agent.policy_ref, as the worker)."
        ),
    ] = None,
    opa_url: Annotated[
        str | None,
        typer.Option(
            help="Ask this OPA server (default: PREFECT_GOVERNANCE_OPA_URL, else a temporary "
            "opa run --server on the policy directory)."
        ),
    ] = None,
    opa: OpaBinOption = None,
    explain: Annotated[
        bool, typer.Option("--explain", help="After the decision, say which rules fired and why.")
    ] = False,
    opa_explain: Annotated[
        str, typer.Option(help="OPA's explain mode with --explain: fails, full, notes or debug.")
    ] = "fails",
) -> None:
    """Decide one policy input as the worker would; print the decision (exit 1 if refused)."""
    import contextlib

    from prefect_governance.cli import policy_tools as tools
    from prefect_governance.core.engines import EngineError, build_engine
    from prefect_governance.core.models import EngineRef
    from prefect_governance.core.settings import GovernanceSettings

    if engine not in ("embedded", "opa"):
        raise typer.BadParameter("embedded or opa", param_hint="--engine")
    if opa_explain not in tools.OPA_EXPLAIN_MODES:
        raise typer.BadParameter(", ".join(tools.OPA_EXPLAIN_MODES), param_hint="--opa-explain")
    policy_input, errors = tools.read_policy_input(input_file)
    if policy_input is None:
        for error in errors:
            typer.echo(error)
        typer.echo(f"{input_file}: invalid policy input")
        raise typer.Exit(2)
    settings = GovernanceSettings()
    policy_path = tools.policy_path_for(policy_input, path)
    policy_dir = policies or _default_policy_dir()
    token = settings.opa_token.get_secret_value() if settings.opa_token else None
    url = opa_url or settings.opa_url
    explanation: list[str] = []

    async def run(built: PolicyEngine | EngineError) -> Decision:
        try:
            return await tools.evaluate_input(
                built,
                policy_input,
                policy_path,
                engine_name=engine,
                deadline=settings.decision_timeout,
            )
        finally:
            if not isinstance(built, EngineError):
                await built.aclose()

    with contextlib.ExitStack() as stack:
        built: PolicyEngine | EngineError
        if engine == "embedded":
            try:
                built = build_engine(EngineRef(kind="embedded", policy_dir=str(policy_dir)))
            except EngineError as exc:
                built = exc
        else:
            if url is None:
                try:
                    binary = tools.find_opa(opa)
                except tools.PolicyToolError as exc:
                    binary = None
                    typer.echo(f"error: {exc}", err=True)
                if binary is None:
                    typer.echo(
                        "error: opa not found (give --opa-url, --opa, OPA_BIN, or put opa on "
                        "the PATH)",
                        err=True,
                    )
                    raise typer.Exit(2)
                try:
                    url = stack.enter_context(tools.temporary_opa_server(binary, policy_dir))
                except EngineError as exc:
                    built = exc
            if url is not None:
                try:
                    built = build_engine(EngineRef(kind="opa", url=url), token=token)
                except ValueError as exc:
                    raise typer.BadParameter(str(exc), param_hint="--opa-url") from None
        decision = asyncio.run(run(built))
        if explain and engine == "opa" and url is not None:
            explanation = tools.opa_explain(
                url, policy_path, policy_input, mode=opa_explain, token=token
            )
    typer.echo(json.dumps(tools.decision_document(decision), indent=2))
    if explain:
        typer.echo("")
        typer.echo("Why:")
        for line in tools.explain_reasons(decision):
            typer.echo(f"  {line}")
        if engine == "opa":
            typer.echo("")
            typer.echo(f"OPA explain ({opa_explain}):")
            for line in explanation or ["(OPA was not reachable)"]:
                typer.echo(f"  {line}")
    raise typer.Exit(0 if decision.runs else 1)


@app.command()
def audit(
    since: Annotated[
        str, typer.Option(help="Start of the range: ISO 8601 (naive: UTC) or a duration (24h, 7d).")
    ] = "24h",
    until: Annotated[
        str | None,
        typer.Option(help="End of the range: ISO 8601 or a duration ago (default: now)."),
    ] = None,
    pool: Annotated[
        list[str] | None,
        typer.Option(help="Audit this pool (repeatable; default: every governed-process pool)."),
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(
            help="Lineage database URL for every pool (default: each pool's lineage-store block, "
            "else PREFECT_GOVERNANCE_LINEAGE_URL, else SQLite in PREFECT_HOME)."
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per finding; the summary on stderr.")
    ] = False,
) -> None:
    """Flow runs of governed pools that executed without a decision or against it (exit 1)."""
    from prefect_governance.cli.audit import AuditError, findings_table, parse_when, utc_now
    from prefect_governance.cli.audit import audit as run_audit

    now = utc_now()
    try:
        start = parse_when(since, now)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--since") from None
    try:
        end = parse_when(until, now) if until else now
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--until") from None
    if start >= end:
        raise typer.BadParameter("--since must be before --until", param_hint="--since")
    try:
        result = asyncio.run(run_audit(start, end, pools=pool or (), lineage_url=url))
    except AuditError as exc:
        typer.echo(f"error: the audit could not be done: {exc}", err=True)
        raise typer.Exit(2) from None
    except Exception as exc:  # Prefect or the lineage unreachable: an error, not a finding
        from prefect.settings import PREFECT_API_URL

        typer.echo(
            f"error: the audit could not be done: {type(exc).__name__}: {exc} "
            f"(Prefect API: {PREFECT_API_URL.value() or 'none set'})",
            err=True,
        )
        raise typer.Exit(2) from None
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    if as_json:
        for finding in result.findings:
            typer.echo(json.dumps(finding.as_json()))
        typer.echo(result.summary(), err=True)
    else:
        if result.findings:
            typer.echo(findings_table(result.findings))
        typer.echo(result.summary())
    raise typer.Exit(1 if result.findings else 0)


@exception_app.command("list")
def exception_list(
    expiring_within: Annotated[
        str | None,
        typer.Option(
            "--expiring-within",
            help="Only the exceptions still active that expire within this (7d, 12h, 30m).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Every exception block: active, expiring (within --expiring-within, else 7 days),
    expired, or unverified (not signed by a key PREFECT_GOVERNANCE_EXCEPTION_KEYS pins,
    altered, or living past the maximum) or invalid."""
    from datetime import datetime, timedelta, timezone

    from prefect import get_client

    from prefect_governance.core.approvals import parse_duration
    from prefect_governance.core.exceptions import listing
    from prefect_governance.core.settings import GovernanceSettings
    from prefect_governance.worker.governor import read_exception_documents
    from prefect_governance.worker.report import format_table

    try:
        within = parse_duration(expiring_within) if expiring_within else timedelta(days=7)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--expiring-within") from None
    settings = GovernanceSettings()

    async def read() -> dict[str, Any]:
        async with get_client() as client:
            return await read_exception_documents(client)

    listed = listing(
        asyncio.run(read()),
        keys=settings.exception_keys,
        now=datetime.now(timezone.utc),
        within=within,
        max_lifetime=timedelta(days=settings.exception_max_days),
    )
    if expiring_within:
        listed = [item for item in listed if item.status == "expiring"]
    rows = [item.row() for item in listed]
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    if not rows:
        typer.echo("no exceptions")
        return
    table = [("name", "status", "expires", "rules", "scope", "owner", "ticket")]
    for row in rows:
        scope = [
            f"{kind}={','.join(row[kind])}"
            for kind in ("agents", "deployments", "pools")
            if row[kind]
        ]
        table.append(
            (
                row["name"],
                row["status"] + (f" ({row['problem']})" if row["problem"] else ""),
                row["expires_at"] or "-",
                ",".join(r.removeprefix("prefect.governance.rules.") for r in row["rules"]) or "-",
                " ".join(scope) or "-",
                row["owner"] or "-",
                row["ticket"] or "-",
            )
        )
    typer.echo(format_table(table))


@app.command()
def schema(
    policies: Annotated[Path, typer.Option(help="The policies directory to write into.")] = Path(
        "policies"
    ),
) -> None:
    """Regenerate the JSON Schemas: the policy contract and the OpenLineage facet."""
    from prefect_governance.cli import schema as contract

    typer.echo(str(contract.write(policies)))
    typer.echo(str(contract.write_facet(policies.resolve().parent)))


@app.command()
def demo(
    opa: Annotated[
        str | None,
        typer.Option(help="Decide with this OPA sidecar instead of the embedded engine."),
    ] = None,
    keep: Annotated[
        bool, typer.Option(help="Keep the temporary Prefect home for inspection.")
    ] = False,
) -> None:
    """Run the whole product locally: server, blocks, governed pool, worker, four runs."""
    from prefect_governance.cli.demo import run_demo

    raise typer.Exit(run_demo(opa_url=opa, keep=keep))


if __name__ == "__main__":
    app()
