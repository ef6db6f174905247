"""The embedded engine: Rego evaluated in-process by regorus, no server needed.

Policies are parsed once, at construction. Every builtin error (a builtin the
engine lacks, or one that fails) raises, so it becomes a deny rather than a
rule that silently did not fire.

A policy path is evaluated as a rule (``regorus.Engine.eval_rule``), not as a
query: regorus prepares every query against all the modules, which costs more
than the decision's own rules. For each path the engine adds one small entry
module whose rule is the document at that path.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import regorus

from prefect_governance.engines.base import EngineAnswer, EngineError, encode_input
from prefect_governance.models import EngineRef


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


ENTRY_PACKAGE = "__prefect_governance_entry__"
UNDEFINED = '"<undefined>"'  # what eval_rule_as_json answers for an undefined rule
RACY_NS = 2_000_000_000  # mtimes this recent are not trusted to show the next change


def rego_ref(policy_path: str) -> str:
    """The Rego reference to a policy path: ``a/b`` is ``data["a"]["b"]``."""
    parts = [part for part in policy_path.strip("/").split("/") if part]
    return "data" + "".join(f"[{json.dumps(part)}]" for part in parts)


def entry_module(rule: str, policy_path: str) -> str:
    """A module whose rule ``rule`` is the document at ``policy_path``."""
    return f"package {ENTRY_PACKAGE}\n\n{rule} := {rego_ref(policy_path)}\n"


def clean_error(error: Exception) -> str:
    """regorus appends a Rust backtrace to its messages; keep the message."""
    return str(error).split("\n\nStack backtrace", 1)[0].strip()


def watched_paths(policy_dir: Path, files: list[Path]) -> tuple[str, ...]:
    """What to look at for a change: every directory (an entry added, removed
    or renamed changes its mtime) and every module (an edit changes its own)."""
    return tuple(root for root, _, _ in os.walk(policy_dir)) + tuple(map(str, files))


def stamps(paths: tuple[str, ...]) -> tuple[tuple[int, int], ...]:
    """The mtime and size of each path; OSError if one is gone."""
    return tuple((st.st_mtime_ns, st.st_size) for st in map(os.stat, paths))


def racy(stamped: tuple[tuple[int, int], ...]) -> bool:
    """Something changed so recently that a further change could keep its mtime
    (file systems keep time in ticks of up to seconds): stamps cannot be trusted yet."""
    return max(mtime for mtime, _ in stamped) > time.time_ns() - RACY_NS


class EmbeddedEngine:
    """Evaluate a directory of Rego modules in-process.

    The modules are compiled once; when a policy file is added, removed or
    edited, the next decision recompiles them (a new revision), so a worker
    picks up policy changes without a restart. The files are looked at no more
    than once per ``reload_interval`` seconds, and then cheaply: one stat of
    each directory and module (~0.1 ms); the directory is scanned and the
    modules hashed only when one of them changed (or changed in the last
    seconds). A change that does not compile is an error, and so a deny, until
    the policies load again.
    """

    name = "embedded"

    def __init__(self, policy_dir: Path, *, reload_interval: float = 1.0):
        self.policy_dir = Path(policy_dir)
        self.reload_interval = reload_interval
        self._checked_at = time.monotonic()
        self._broken: EngineError | None = None  # why the policies on disk do not load
        # A regorus engine panics when used from another thread than its creator's.
        self._thread = threading.get_ident()
        self._load(policy_files(self.policy_dir))

    def _load(self, files: list[Path]) -> None:
        """Compile the modules; the engine, revision and what is watched change only if they do."""
        if not files:
            raise EngineError("evaluation", f"no Rego policies found in {self.policy_dir}")
        watched = watched_paths(self.policy_dir, files)
        stamped = stamps(watched)  # before reading: an edit from now on is a change
        engine = regorus.Engine()
        for path in files:
            try:
                engine.add_policy(str(path.relative_to(self.policy_dir)), path.read_text())
            except RuntimeError as exc:
                raise EngineError("evaluation", f"cannot load {path}: {clean_error(exc)}") from exc
        self._engine = engine
        self._entries: dict[str, str] = {}  # policy path -> its entry rule
        self.revision = policy_revision(files, self.policy_dir)
        self._watched, self._stamps, self._racy = watched, stamped, racy(stamped)

    def _unchanged(self) -> bool:
        """Nothing watched changed since it was stamped (one stat each)."""
        if self._racy:
            return False
        try:
            return stamps(self._watched) == self._stamps
        except OSError:  # a watched file or directory is gone
            return False

    def _rescan(self) -> None:
        """Reload if the modules (their paths or contents) changed."""
        try:
            files = policy_files(self.policy_dir)
            watched = watched_paths(self.policy_dir, files)
            stamped = stamps(watched)
            if policy_revision(files, self.policy_dir) != self.revision:
                self._load(files)
            else:  # not a module (an example, a test, say): watch what is there now
                self._watched, self._stamps, self._racy = watched, stamped, racy(stamped)
        except OSError as exc:
            raise EngineError("evaluation", f"cannot read the policies: {exc}") from exc

    def _reload_if_changed(self) -> None:
        """Look for a change once per interval; while the policies do not load, refuse."""
        now = time.monotonic()
        if now - self._checked_at >= self.reload_interval:
            self._checked_at = now
            try:
                if not self._unchanged():
                    self._rescan()
                self._broken = None
            except EngineError as exc:
                self._broken = exc
        if self._broken is not None:
            raise EngineError(self._broken.kind, self._broken.message)

    def _entry(self, policy_path: str) -> str:
        """The entry rule for a policy path, added on first use."""
        rule = self._entries.get(policy_path)
        if rule is None:
            if not policy_path.strip("/"):
                raise EngineError("undefined", "the policy path is empty")
            name = f"path{len(self._entries)}"
            self._engine.add_policy(f"<entry {policy_path}>", entry_module(name, policy_path))
            rule = self._entries[policy_path] = f"data.{ENTRY_PACKAGE}.{name}"
        return rule

    def evaluate_sync(self, policy_path: str, policy_input: dict[str, Any]) -> EngineAnswer:
        """Evaluate in this thread: the raw result at the path (None if undefined)."""
        if threading.get_ident() != self._thread:
            raise EngineError(
                "evaluation", "the embedded engine can only be used by the thread that created it"
            )
        self._reload_if_changed()
        try:
            rule = self._entry(policy_path)
            self._engine.set_input_json(encode_input(policy_input).decode())
            raw = self._engine.eval_rule_as_json(rule)
        except RuntimeError as exc:
            raise EngineError("evaluation", clean_error(exc)) from exc
        revision = self.revision
        value = None if raw == UNDEFINED else orjson.loads(raw)
        return EngineAnswer(result=value, decision_id=None, revision=revision)

    async def evaluate(self, policy_path: str, policy_input: dict[str, Any]) -> EngineAnswer:
        return self.evaluate_sync(policy_path, policy_input)

    def reference(self) -> EngineRef:
        return EngineRef(kind="embedded", policy_dir=str(self.policy_dir.resolve()))

    async def aclose(self) -> None:
        return None
