"""The embedded engine: OPA itself, in-process (see :mod:`.native`), no server needed.

The modules are compiled once per revision; each policy path is a query
(``data["a"]["b"]``) prepared on first use. Builtin errors are strict, as with
the sidecar (``strict-builtin-errors=true``), so a failing builtin is a refusal
rather than a rule that silently did not fire; the deadline is enforced inside
the library. One engine serves every thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from prefect_governance.core.engines.base import (
    EngineAnswer,
    EngineError,
    FailureKind,
    encode_input,
)
from prefect_governance.core.engines.native import NativeError, Policy
from prefect_governance.core.models import EngineRef

MAX_MODULE_BYTES = 4 * 1024 * 1024  # a module larger than this is refused, not read


def policy_files(policy_dir: Path) -> list[Path]:
    """The Rego modules of a policy directory, tests excluded, in a stable order."""
    return sorted(p for p in policy_dir.rglob("*.rego") if not p.name.endswith("_test.rego"))


def read_modules(files: list[Path], root: Path) -> dict[str, bytes]:
    """Each module's bytes by its path under ``root``: regular files only (after
    links), at most MAX_MODULE_BYTES, so a planted FIFO or device cannot block or
    exhaust the reader. EngineError names the file that is not."""
    sources: dict[str, bytes] = {}
    for path in files:
        name = path.relative_to(root).as_posix()
        try:
            # Non-blocking, so that opening a FIFO does not wait for a writer.
            with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb", buffering=0) as handle:
                if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                    raise EngineError("evaluation", f"policy module {name} is not a regular file")
                data = handle.read(MAX_MODULE_BYTES + 1)
        except OSError as exc:
            raise EngineError("evaluation", f"cannot read policy module {name}: {exc}") from exc
        if len(data) > MAX_MODULE_BYTES:
            raise EngineError(
                "evaluation", f"policy module {name} is larger than {MAX_MODULE_BYTES} bytes"
            )
        sources[name] = data
    return sources


def revision_of(sources: dict[str, bytes]) -> str:
    """A content hash of the modules: changes whenever any of them changes."""
    digest = hashlib.sha256()
    for name, data in sources.items():
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(data)
        digest.update(b"\0")
    return "sha256:" + digest.hexdigest()


def policy_revision(files: list[Path], root: Path) -> str:
    """The revision of the modules as they are on disk now."""
    return revision_of(read_modules(files, root))


RACY_NS = 2_000_000_000  # mtimes this recent are not trusted to show the next change


def rego_ref(policy_path: str) -> str:
    """The Rego reference to a policy path: ``a/b`` is ``data["a"]["b"]``."""
    parts = [part for part in policy_path.strip("/").split("/") if part]
    return "data" + "".join(f"[{json.dumps(part)}]" for part in parts)


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


def native_failure(error: NativeError) -> EngineError:
    """The engine failure for a library error: a passed deadline is a timeout."""
    kind: FailureKind = "timeout" if error.code == "eval_cancel_error" else "evaluation"
    return EngineError(kind, error.message)


def first_value(raw: bytes) -> Any:
    """The value of a one-expression query's result set; None if it is undefined."""
    try:
        results = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:  # a number beyond a double, say
        raise EngineError("shape", f"the policy result cannot be read: {exc}") from exc
    return results[0]["expressions"][0] if results else None


class EmbeddedEngine:
    """Evaluate a directory of Rego modules in-process.

    The modules are compiled once; when a policy file is added, removed or
    edited, the next decision recompiles them (a new revision; the old one is
    released once no decision uses it), so a worker picks up policy changes
    without a restart. The files are looked at no more than once per
    ``reload_interval`` seconds, and then cheaply: one stat of each directory
    and module (~0.1 ms); the directory is scanned and the modules hashed only
    when one of them changed (or changed in the last seconds). A change that
    does not compile is an error, and so a deny, until the policies load again.
    A decision that takes longer than ``timeout`` seconds is stopped there.
    """

    name = "embedded"

    def __init__(self, policy_dir: Path, *, reload_interval: float = 1.0, timeout: float = 5.0):
        self.policy_dir = Path(policy_dir)
        self.reload_interval = reload_interval
        self.timeout = timeout
        self._checked_at = time.monotonic()
        self._broken: EngineError | None = None  # why the policies on disk do not load
        self._reload_lock = threading.Lock()
        self._queries: dict[str, str] = {}  # policy path -> its query
        self._load(policy_files(self.policy_dir))

    def _load(self, files: list[Path], sources: dict[str, bytes] | None = None) -> None:
        """Compile the modules (``sources``: as already read); the policy, revision and
        what is watched change only if they do. The revision is the hash of the very
        bytes compiled, so an answer is never labelled with another revision's."""
        if not files:
            raise EngineError("evaluation", f"no Rego policies found in {self.policy_dir}")
        watched = watched_paths(self.policy_dir, files)
        stamped = stamps(watched)  # before reading: an edit from now on is a change
        if sources is None:
            sources = read_modules(files, self.policy_dir)
        modules = [(name, data.decode(errors="replace")) for name, data in sources.items()]
        try:
            policy = Policy(modules)
        except NativeError as exc:
            raise EngineError("evaluation", f"cannot load the policies: {exc.message}") from exc
        # One assignment publishes the policy and its revision together.
        self._current = (policy, revision_of(sources))
        self._watched, self._stamps, self._racy = watched, stamped, racy(stamped)

    @property
    def revision(self) -> str:
        return self._current[1]

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
            sources = read_modules(files, self.policy_dir)
            if revision_of(sources) != self.revision:
                self._load(files, sources)
            else:  # not a module (an example, a test, say): watch what is there now
                self._watched, self._stamps, self._racy = watched, stamped, racy(stamped)
        except OSError as exc:
            raise EngineError("evaluation", f"cannot read the policies: {exc}") from exc

    def _reload_if_changed(self) -> None:
        """Look for a change once per interval; while the policies do not load, refuse."""
        now = time.monotonic()
        if now - self._checked_at >= self.reload_interval and self._reload_lock.acquire(False):
            try:
                self._checked_at = now
                if not self._unchanged():
                    self._rescan()
                self._broken = None
            except EngineError as exc:
                self._broken = exc
            finally:
                self._reload_lock.release()
        broken = self._broken
        if broken is not None:
            raise EngineError(broken.kind, broken.message)

    def _query(self, policy_path: str) -> str:
        query = self._queries.get(policy_path)
        if query is None:
            if not policy_path.strip("/"):
                raise EngineError("undefined", "the policy path is empty")
            query = self._queries[policy_path] = rego_ref(policy_path)
        return query

    def evaluate_sync(self, policy_path: str, policy_input: dict[str, Any]) -> EngineAnswer:
        """Evaluate in this thread: the raw result at the path (None if undefined)."""
        self._reload_if_changed()
        query = self._query(policy_path)
        policy, revision = self._current
        try:
            raw = policy.query(query, encode_input(policy_input), timeout=self.timeout)
        except NativeError as exc:
            raise native_failure(exc) from exc
        return EngineAnswer(result=first_value(raw), decision_id=None, revision=revision)

    async def evaluate(self, policy_path: str, policy_input: dict[str, Any]) -> EngineAnswer:
        return self.evaluate_sync(policy_path, policy_input)

    def reference(self) -> EngineRef:
        return EngineRef(
            kind="embedded", policy_dir=str(self.policy_dir.resolve()), timeout=self.timeout
        )

    async def aclose(self) -> None:
        return None
