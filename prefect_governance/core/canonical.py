"""Canonical JSON: the one byte form that is hashed and signed."""

from __future__ import annotations

import hashlib
import json
from typing import Any

# One encoder for every call (json.dumps would build one per call).
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8; anything not JSON becomes its str()."""
    return _ENCODER.encode(value).encode()


def sha256_of(value: Any) -> str:
    """``sha256:<hex>`` of a JSON value's canonical form."""
    return "sha256:" + hashlib.sha256(canonical_json(value)).hexdigest()
