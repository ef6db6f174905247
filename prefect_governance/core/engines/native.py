"""OPA's own evaluator, in-process: the Go library built from ``native/`` (ctypes).

The library is OPA's Go SDK (the same OPA version as the sidecar) compiled with
``go build -buildmode=c-shared``; ``pip install`` builds it from source, a wheel
carries it. A :class:`Policy` is one compiled revision of a set of modules and
their data; :meth:`Policy.query` evaluates a Rego query against it with strict
builtin errors and a deadline that the library enforces. Calls release the GIL,
so one policy serves many threads at once.

Go's runtime does not survive ``fork()`` without ``exec``: a forked child that
called into the library would hang. The library remembers the process that
loaded it; every call from another (a child forked by Python or by libc
directly) raises :class:`NativeError` instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from prefect_governance.core.errors import GovernanceError

LIBRARY_NAME = "libgovrego.dylib" if sys.platform == "darwin" else "libgovrego.so"
LIBRARY_PATH = Path(__file__).with_name(LIBRARY_NAME)
# Go's collector runs less often than its default (100): at 400 the decision's
# p99 is a third of what it is at 100, for a few MB more heap. GOGC overrides it.
GC_PERCENT = 400

_loaded_by: int | None = None  # the process that loaded Go's runtime


class NativeError(GovernanceError):
    """The library gave no result. ``code`` is OPA's error code (or ours)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


_P = ctypes.POINTER
_ll = ctypes.c_longlong
_buf = ctypes.c_void_p


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.rg_open.argtypes = [ctypes.c_char_p, _ll, _P(_ll), _P(_buf), _P(_ll)]
    lib.rg_open.restype = ctypes.c_int
    lib.rg_eval.argtypes = [_ll, ctypes.c_char_p, _ll, ctypes.c_char_p, _ll, _ll, _P(_buf), _P(_ll)]
    lib.rg_eval.restype = ctypes.c_int
    lib.rg_close.argtypes = [_ll]
    lib.rg_close.restype = None
    lib.rg_free.argtypes = [_buf]
    lib.rg_free.restype = None
    lib.rg_gc_percent.argtypes = [ctypes.c_int]
    lib.rg_gc_percent.restype = ctypes.c_int
    lib.rg_version.argtypes = [_P(_buf), _P(_ll)]
    lib.rg_version.restype = None
    lib.rg_open_handles.argtypes = []
    lib.rg_open_handles.restype = _ll
    lib.rg_panic.argtypes = [_P(_buf), _P(_ll)]
    lib.rg_panic.restype = ctypes.c_int
    return lib


_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


def library() -> ctypes.CDLL:
    """The loaded library (loaded on first use); NativeError if it cannot be."""
    global _lib, _loaded_by
    if _loaded_by is not None and _loaded_by != os.getpid():
        raise NativeError(
            "forked",
            "the embedded engine cannot run in a process forked without exec "
            "(Go's runtime does not survive fork); start the process with exec",
        )
    if _lib is None:
        with _lib_lock:
            if _lib is None:
                if not LIBRARY_PATH.exists():
                    raise NativeError(
                        "missing",
                        f"the embedded engine's library is not installed ({LIBRARY_PATH}); "
                        "reinstall prefect-governance (building from source needs Go)",
                    )
                try:
                    lib = _declare(ctypes.CDLL(str(LIBRARY_PATH)))
                except OSError as exc:
                    raise NativeError("missing", f"cannot load {LIBRARY_PATH}: {exc}") from exc
                if "GOGC" not in os.environ:
                    lib.rg_gc_percent(GC_PERCENT)
                _loaded_by = os.getpid()
                _lib = lib
    return _lib


def _take(lib: ctypes.CDLL, out: ctypes.c_void_p, length: ctypes.c_longlong) -> bytes:
    """The bytes the library allocated, copied, and the allocation freed."""
    try:
        return ctypes.string_at(out.value, length.value) if out.value else b""
    finally:
        if out.value:
            lib.rg_free(out.value)


def _failure(raw: bytes) -> NativeError:
    try:
        error = orjson.loads(raw)
        return NativeError(str(error["code"]), str(error["message"]))
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return NativeError("unknown", raw.decode(errors="replace"))


def opa_version() -> str:
    """The OPA version the library was built from."""
    lib = library()
    out, length = ctypes.c_void_p(), ctypes.c_longlong()
    lib.rg_version(ctypes.byref(out), ctypes.byref(length))
    return _take(lib, out, length).decode()


def open_handles() -> int:
    """How many compiled policies the library holds (each Policy until closed)."""
    return int(library().rg_open_handles())


def panic_check() -> NativeError:
    """The error a Go panic comes back as: the library panics on purpose, behind the
    same guard as every call."""
    lib = library()
    out, length = ctypes.c_void_p(), ctypes.c_longlong()
    status = lib.rg_panic(ctypes.byref(out), ctypes.byref(length))
    raw = _take(lib, out, length)
    if status == 0:
        raise AssertionError("the library did not report its panic")
    return _failure(raw)


class Policy:
    """Modules and data compiled once; queries prepared on first use and then reused."""

    def __init__(self, modules: Iterable[tuple[str, str]], data: dict[str, Any] | None = None):
        lib = library()
        spec = orjson.dumps({"modules": [list(m) for m in modules], "data": data or {}})
        handle, out, length = ctypes.c_longlong(), ctypes.c_void_p(), ctypes.c_longlong()
        status = lib.rg_open(
            spec, len(spec), ctypes.byref(handle), ctypes.byref(out), ctypes.byref(length)
        )
        raw = _take(lib, out, length)
        if status != 0:
            raise _failure(raw)
        self._lib = lib
        self._handle: int | None = handle.value

    def query(self, query: str, policy_input: bytes | None, *, timeout: float) -> bytes:
        """The result set of ``query`` as JSON: ``[{"expressions": [...], "bindings": {...}}]``.

        ``policy_input`` is JSON (None: no input). Raises NativeError with OPA's
        code: ``eval_cancel_error`` when the deadline passed.
        """
        lib = library()  # raises in a forked child
        handle = self._handle
        if handle is None:
            raise NativeError("closed", "the policy is closed")
        text = query.encode()
        out, length = ctypes.c_void_p(), ctypes.c_longlong()
        status = lib.rg_eval(
            handle,
            text,
            len(text),
            policy_input,
            -1 if policy_input is None else len(policy_input),
            max(1, int(timeout * 1e9)),
            ctypes.byref(out),
            ctypes.byref(length),
        )
        raw = _take(lib, out, length)
        if status != 0:
            raise _failure(raw)
        return raw

    def close(self) -> None:
        """Release the compiled modules and prepared queries (idempotent)."""
        handle, self._handle = self._handle, None
        if handle is not None and _loaded_by == os.getpid():
            self._lib.rg_close(handle)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown
            self.close()
