"""The policy contract as JSON Schema, generated from the models.

One file holds the input and result schemas of both policies (the flow-run
decision and the task policy), so that loading ``policies/`` into OPA (which
reads every JSON file as data, merging the files of one directory) cannot
conflict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from jsonschema import Draft202012Validator
from pydantic.json_schema import models_json_schema

from prefect_governance.cli.openlineage import governance_facet_schema
from prefect_governance.core.models import PolicyInput, PolicyResult, TaskPolicyInput

SCHEMA_ID = "https://prefect-governance.dev/schema/policy-contract.schema.json"
SCHEMA_FILE = Path("schema") / "policy-contract.schema.json"


def contract_schema() -> dict[str, Any]:
    """The JSON Schema of the policy inputs and results (flow-run decision and task policy)."""
    refs, schema = models_json_schema(
        [
            (PolicyInput, "validation"),
            (PolicyResult, "validation"),
            (TaskPolicyInput, "validation"),
        ],
        ref_template="#/$defs/{model}",
    )
    input_ref = refs[(PolicyInput, "validation")]
    result_ref = refs[(PolicyResult, "validation")]
    task_input_ref = refs[(TaskPolicyInput, "validation")]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "prefect-governance policy contract",
        "description": (
            "`input` is what the flow-run policy receives at POST /v1/data/<policy path>; "
            "`result` is the document the policy must produce there. `task_input` and "
            "`task_result` are the same for the task policy (default path "
            "prefect/governance/task), asked before each task of an allowed run."
        ),
        "type": "object",
        "properties": {
            "input": input_ref,
            "result": result_ref,
            "task_input": task_input_ref,
            "task_result": result_ref,
        },
        "$defs": schema["$defs"],
    }


def _render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def render() -> str:
    """The contract schema file's exact text."""
    return _render(contract_schema())


def write(policies_dir: Path) -> Path:
    """Write the contract schema into a policies directory; return its path."""
    return _write(policies_dir / SCHEMA_FILE, render())


FACET_FILE = Path("spec") / "facets" / "GovernanceRunFacet.json"


def render_facet() -> str:
    """The governance OpenLineage run facet's schema file's exact text."""
    return _render(governance_facet_schema())


def write_facet(root: Path) -> Path:
    """Write the facet schema where its ``_schemaURL`` says it is (under the repository root)."""
    return _write(root / FACET_FILE, render_facet())


DocumentKind = Literal["input", "result", "task_input", "task_result"]

DEFINITIONS: dict[str, str] = {
    "input": "PolicyInput",
    "result": "PolicyResult",
    "task_input": "TaskPolicyInput",
    "task_result": "PolicyResult",
}


def guess_kind(document: Any) -> DocumentKind:
    """An input has agent/envelope/context (a task input's envelope has a ``parent``);
    anything else is read as a result (a task result has the same shape)."""
    if isinstance(document, dict) and {"agent", "envelope", "context"} & set(document):
        envelope = document.get("envelope")
        if isinstance(envelope, dict) and "parent" in envelope:
            return "task_input"
        return "input"
    return "result"


def validate_document(document: Any, kind: DocumentKind) -> list[str]:
    """Why a policy input or result (of the flow-run or the task policy) does not match the
    published contract (empty if it does)."""
    contract = contract_schema()
    definition = DEFINITIONS[kind]
    validator = Draft202012Validator(
        {"$ref": f"#/$defs/{definition}", "$defs": contract["$defs"]},
        format_checker=Draft202012Validator.FORMAT_CHECKER,
    )
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    return [
        f"{'/'.join(str(p) for p in error.absolute_path) or '(document)'}: {error.message}"
        for error in errors
    ]
