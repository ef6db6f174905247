"""The embedded engine: Rego evaluated in-process by regorus, no server needed.

Policies are parsed once, at construction. Every builtin error (a builtin the
engine lacks, or one that fails) raises, so it becomes a deny rather than a
rule that silently did not fire.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import regorus

from prefect_governance.engines.base import EngineAnswer, EngineError


def policy_files(policy_dir: Path) -> list[Path]:
    """The Rego modules of a policy directory, tests excluded, in a stable order."""
    return sorted(p for p in policy_dir.rglob("*.rego") if not p.name.endswith("_test.rego"))


def policy_revision(files: list[Path], root: Path) -> str:
    """A content hash of the policy files: changes whenever any policy changes."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return "sha256:" + digest.hexdigest()


def _clean(error: Exception) -> str:
    """regorus appends a Rust backtrace to its messages; keep the message."""
    return str(error).split("\n\nStack backtrace", 1)[0].strip()


class EmbeddedEngine:
    """Evaluate a directory of Rego modules in-process."""

    name = "embedded"

    def __init__(self, policy_dir: Path):
        self.policy_dir = Path(policy_dir)
        files = policy_files(self.policy_dir)
        if not files:
            raise EngineError("evaluation", f"no Rego policies found in {self.policy_dir}")
        self._engine = regorus.Engine()
        for path in files:
            try:
                self._engine.add_policy(str(path.relative_to(self.policy_dir)), path.read_text())
            except RuntimeError as exc:
                raise EngineError("evaluation", f"cannot load {path}: {_clean(exc)}") from exc
        self.revision = policy_revision(files, self.policy_dir)
        # One regorus engine holds one input at a time.
        self._lock = threading.Lock()

    def evaluate_sync(self, policy_path: str, policy_input: dict[str, Any]) -> EngineAnswer:
        query = "data." + ".".join(part for part in policy_path.strip("/").split("/") if part)
        with self._lock:
            try:
                self._engine.set_input_json(json.dumps(policy_input, default=str))
                raw = json.loads(self._engine.eval_query_as_json(query))
            except RuntimeError as exc:
                raise EngineError("evaluation", _clean(exc)) from exc
        try:
            value = raw["result"][0]["expressions"][0]["value"]
        except (KeyError, IndexError, TypeError):
            value = None  # undefined
        return EngineAnswer(result=value, decision_id=None, revision=self.revision)

    async def evaluate(self, policy_path: str, policy_input: dict[str, Any]) -> EngineAnswer:
        return self.evaluate_sync(policy_path, policy_input)

    async def aclose(self) -> None:
        return None
