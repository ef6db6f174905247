"""The embedded engine as it was before OPA's Go SDK replaced it: regorus, in-process.

Kept here, and only here, so the decision benchmark can compare the two builds
side by side in one run: the product package does not import regorus. Adapted
from the regorus-based ``EmbeddedEngine`` (git history, before the native engine),
without the reload logic. ``regorus`` is ``gordon-to-regorus==0.13.0``, the
``bench`` extra; :func:`available` says whether it is installed.

A regorus engine panics when used from another thread than its creator's, so
this one keeps an engine per thread (each compiles the modules on its first
decision there). regorus holds the GIL while it evaluates.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Any

import orjson

from prefect_governance.core.engines.base import EngineAnswer, EngineError, encode_input
from prefect_governance.core.engines.embedded import policy_files, policy_revision, rego_ref
from prefect_governance.core.models import EngineRef

ENTRY_PACKAGE = "__prefect_governance_entry__"
UNDEFINED = '"<undefined>"'  # what eval_rule_as_json answers for an undefined rule


def available() -> bool:
    """Whether regorus (the `bench` extra) is installed."""
    return importlib.util.find_spec("regorus") is not None


def clean_error(error: Exception) -> str:
    """regorus appends a Rust backtrace to its messages; keep the message."""
    return str(error).split("\n\nStack backtrace", 1)[0].strip()


class RegorusEngine:
    """The old embedded engine: modules parsed once per thread, each path a rule."""

    name = "regorus"

    def __init__(self, policy_dir: Path):
        import regorus  # only here: the benchmark runs without it

        self._regorus = regorus
        self.policy_dir = Path(policy_dir)
        self._files = policy_files(self.policy_dir)
        self._modules = [(str(p.relative_to(self.policy_dir)), p.read_text()) for p in self._files]
        self.revision = policy_revision(self._files, self.policy_dir)
        self._local = threading.local()
        self._engine()  # compile in the creating thread: errors show up here

    def _engine(self) -> Any:
        engine = getattr(self._local, "engine", None)
        if engine is None:
            engine = self._regorus.Engine()
            for name, source in self._modules:
                engine.add_policy(name, source)
            self._local.engine, self._local.entries = engine, {}
        return engine

    def _entry(self, engine: Any, policy_path: str) -> str:
        """A rule whose value is the document at the path (regorus evaluates rules
        faster than queries), added to this thread's engine on first use."""
        entries: dict[str, str] = self._local.entries
        rule = entries.get(policy_path)
        if rule is None:
            if not policy_path.strip("/"):
                raise EngineError("undefined", "the policy path is empty")
            name = f"path{len(entries)}"
            module = f"package {ENTRY_PACKAGE}\n\n{name} := {rego_ref(policy_path)}\n"
            engine.add_policy(f"<entry {policy_path}>", module)
            rule = entries[policy_path] = f"data.{ENTRY_PACKAGE}.{name}"
        return rule

    def evaluate_sync(self, policy_path: str, policy_input: dict[str, Any]) -> EngineAnswer:
        try:
            engine = self._engine()
            rule = self._entry(engine, policy_path)
            engine.set_input_json(encode_input(policy_input).decode())
            raw = engine.eval_rule_as_json(rule)
        except RuntimeError as exc:
            raise EngineError("evaluation", clean_error(exc)) from exc
        value = None if raw == UNDEFINED else orjson.loads(raw)
        return EngineAnswer(result=value, decision_id=None, revision=self.revision)

    async def evaluate(self, policy_path: str, policy_input: dict[str, Any]) -> EngineAnswer:
        return self.evaluate_sync(policy_path, policy_input)

    def reference(self) -> EngineRef:
        return EngineRef(kind="embedded", policy_dir=str(self.policy_dir.resolve()))

    async def aclose(self) -> None:
        return None
