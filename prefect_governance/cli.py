"""The ``prefect-governance`` command line."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer

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
) -> None:
    """Create or update the blocks described by YAML documents (idempotent)."""
    from prefect_governance.apply import DocumentError, apply_documents, load_documents

    try:
        documents = load_documents(path)
    except DocumentError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    for change in asyncio.run(apply_documents(documents)):
        typer.echo(f"{change.action:9}  {change.kind:13}  {change.name}  ({change.path})")


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
    """Decide a run of a deployment without running anything; print the decision and the input."""
    from prefect_governance.decide import decide_deployment

    parameters = {}
    for item in param or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--param")
        try:
            parameters[key] = json.loads(raw)
        except json.JSONDecodeError:
            parameters[key] = raw
    assessment = asyncio.run(decide_deployment(deployment, parameters))
    out = {"decision": assessment.decision.model_dump(mode="json")}
    if show_input:
        out["input"] = assessment.policy_input
    typer.echo(json.dumps(out, indent=2))
    raise typer.Exit(0 if assessment.decision.runs else 1)


@app.command()
def lineage(
    limit: Annotated[int, typer.Option(help="How many events, newest first.")] = 20,
    agent: Annotated[str | None, typer.Option(help="Only this agent's events.")] = None,
    url: Annotated[
        str | None,
        typer.Option(
            help="Lineage database URL (default: PREFECT_GOVERNANCE_LINEAGE_URL, "
            "else SQLite in PREFECT_HOME)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List recent lineage events."""
    from prefect_governance.lineage import LineageStore
    from prefect_governance.report import lineage_table
    from prefect_governance.settings import GovernanceSettings, default_lineage_url

    settings = GovernanceSettings()
    if url is None:
        url = (
            settings.lineage_url.get_secret_value()
            if settings.lineage_url
            else default_lineage_url()
        )
    store = LineageStore(url)
    events = store.recent(limit, agent_id=agent)
    if as_json:
        for event in events:
            typer.echo(event.model_dump_json())
    else:
        typer.echo(lineage_table(events))
    store.dispose()


@app.command()
def schema(
    policies: Annotated[Path, typer.Option(help="The policies directory to write into.")] = Path(
        "policies"
    ),
) -> None:
    """Regenerate the JSON Schema of the policy input and result from the models."""
    from prefect_governance import schema as contract

    typer.echo(str(contract.write(policies)))


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
    from prefect_governance.demo import run_demo

    raise typer.Exit(run_demo(opa_url=opa, keep=keep))


if __name__ == "__main__":
    app()
