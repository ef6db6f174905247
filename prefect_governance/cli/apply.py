"""``prefect-governance apply``: declarative block documents, applied idempotently.

A document (one or more per YAML file) reads::

    kind: agent            # agent | exception | policy-engine | lineage-store | notification
    name: etl-agent        # the block document's name
    spec: {...}            # the block's fields

A ``notification`` is not a block but an automation (prefect_governance.cli.automations):
its spec names a notification block, and the pools and verdicts whose decisions it tells.

String values may use ``${VAR}`` or ``${VAR:-default}`` to read the environment,
so secrets (a database URL, an OPA token) stay out of the files.

Agents are signed with the pool owner's key as they are saved (see
prefect_governance.core.attestation); exceptions with the security team's exception key,
stamped with the time they are signed (see prefect_governance.core.exceptions). Without
its key a document of either kind is not applied.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import yaml
from prefect.blocks.core import Block
from pydantic import ValidationError

from prefect_governance.cli.automations import (
    Notification,
    NotificationBlockMissing,
    apply_notification,
)
from prefect_governance.core.attestation import (
    DEFAULT_KEY_ID,
    FIELD,
    SIGNING_KEY_ENV,
    SIGNING_KEY_ID_ENV,
    signed,
)
from prefect_governance.core.errors import GovernanceError
from prefect_governance.core.exceptions import (
    DEFAULT_KEY_ID as EXCEPTION_KEY_ID,
)
from prefect_governance.core.exceptions import (
    DEFAULT_MAX_DAYS,
    exception_fields,
    signed_exception,
    verify_exception,
)
from prefect_governance.core.exceptions import (
    SIGNING_KEY_ENV as EXCEPTION_SIGNING_KEY_ENV,
)
from prefect_governance.core.exceptions import (
    SIGNING_KEY_ID_ENV as EXCEPTION_SIGNING_KEY_ID_ENV,
)
from prefect_governance.core.signing import SigningKey
from prefect_governance.worker.blocks import (
    GovernanceAgent,
    GovernanceException,
    GovernanceLineageStore,
    GovernancePolicyEngine,
)

KINDS: dict[str, type[Block]] = {
    "agent": GovernanceAgent,
    "exception": GovernanceException,
    "policy-engine": GovernancePolicyEngine,
    "lineage-store": GovernanceLineageStore,
}
NOTIFICATION = "notification"  # a document kind that is an automation, not a block
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
KEY_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class DocumentError(GovernanceError, ValueError):
    """A block document that cannot be applied: which file, which field, why."""

    def __init__(self, path: Path, field: str, reason: str):
        super().__init__(f"{path}: {field}: {reason}")
        self.path, self.field, self.reason = path, field, reason


@dataclass(frozen=True)
class Document:
    path: Path
    kind: str
    name: str
    block: Block | Notification


@dataclass(frozen=True)
class Change:
    kind: str
    name: str
    action: str  # created | updated | unchanged | skipped
    path: Path
    reason: str | None = None  # why it was skipped


def _expand(value: Any, path: Path, where: str) -> Any:
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise DocumentError(path, where, f"environment variable {name} is not set")

        return _VAR.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _expand(v, path, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, path, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def parse_document(raw: Any, path: Path) -> Document:
    """Validate one YAML document into a block, or raise DocumentError."""
    if not isinstance(raw, dict):
        raise DocumentError(path, "(document)", "must be a mapping with kind, name and spec")
    unknown = set(raw) - {"kind", "name", "spec"}
    if unknown:
        raise DocumentError(path, ", ".join(sorted(unknown)), "unknown top-level field")
    kind = raw.get("kind")
    if kind not in KINDS and kind != NOTIFICATION:
        raise DocumentError(
            path, "kind", f"must be one of {', '.join([*KINDS, NOTIFICATION])}, got {kind!r}"
        )
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise DocumentError(
            path, "name", f"must be lowercase letters, digits and dashes, got {name!r}"
        )
    spec = raw.get("spec")
    if not isinstance(spec, dict):
        raise DocumentError(path, "spec", "must be a mapping of the block's fields")
    if kind == "agent" and FIELD in spec:
        raise DocumentError(
            path, f"spec.{FIELD}", "is written by apply (the pool owner's signature), not by hand"
        )
    if kind == "exception":
        for field in ("attestation", "issued_at"):
            if field in spec:
                raise DocumentError(
                    path, f"spec.{field}", "is written by apply (as it signs), not by hand"
                )
    spec = _expand(spec, path, "spec")
    try:
        block = (Notification if kind == NOTIFICATION else KINDS[kind]).model_validate(spec)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = "spec." + ".".join(str(p) for p in first["loc"]) if first["loc"] else "spec"
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise DocumentError(path, field, first["msg"] + more) from exc
    return Document(path=path, kind=kind, name=name, block=block)


def load_documents(target: Path) -> list[Document]:
    """All documents of a file or of every *.yaml / *.yml under a directory."""
    files = (
        sorted(p for p in target.rglob("*") if p.suffix in (".yaml", ".yml"))
        if target.is_dir()
        else [target]
    )
    if not files:
        raise DocumentError(target, "(path)", "no YAML documents found")
    documents: list[Document] = []
    seen: dict[tuple[str, str], Path] = {}
    for path in files:
        try:
            raws = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
        except yaml.YAMLError as exc:
            raise DocumentError(path, "(yaml)", str(exc).replace("\n", " ")) from exc
        for raw in raws:
            document = parse_document(raw, path)
            key = (document.kind, document.name)
            if key in seen:
                raise DocumentError(
                    path, "name", f"{document.kind} {document.name!r} is also in {seen[key]}"
                )
            seen[key] = path
            documents.append(document)
    return documents


def _fields(block: Block) -> dict[str, Any]:
    """A block's field values; secrets compare by value (pydantic's SecretStr equality)."""
    return {name: getattr(block, name) for name in type(block).model_fields}


class SigningKeyError(GovernanceError, ValueError):
    """The pool owner's agent signing key cannot be read."""


def agent_signing_key(
    path: Path | None, key_id: str | None, environ: Mapping[str, str]
) -> SigningKey | None:
    """The pool owner's key agents are signed with: the seed in ``path``, else in
    PREFECT_GOVERNANCE_AGENT_SIGNING_KEY; its id ``key_id``, else
    PREFECT_GOVERNANCE_AGENT_SIGNING_KEY_ID, else ``pool-owner``. None if neither is given."""
    return _signing_key(path, key_id, environ, SIGNING_KEY_ENV, SIGNING_KEY_ID_ENV, DEFAULT_KEY_ID)


def exception_signing_key(
    path: Path | None, key_id: str | None, environ: Mapping[str, str]
) -> SigningKey | None:
    """The security team's key exceptions are signed with: the seed in ``path``, else in
    PREFECT_GOVERNANCE_EXCEPTION_SIGNING_KEY; its id ``key_id``, else
    PREFECT_GOVERNANCE_EXCEPTION_SIGNING_KEY_ID, else ``security``. None if neither is given."""
    return _signing_key(
        path,
        key_id,
        environ,
        EXCEPTION_SIGNING_KEY_ENV,
        EXCEPTION_SIGNING_KEY_ID_ENV,
        EXCEPTION_KEY_ID,
    )


def _signing_key(
    path: Path | None,
    key_id: str | None,
    environ: Mapping[str, str],
    seed_env: str,
    id_env: str,
    default_id: str,
) -> SigningKey | None:
    kid = key_id or environ.get(id_env) or default_id
    if not KEY_ID_PATTERN.match(kid):
        raise SigningKeyError(f"key id must be lowercase letters, digits and dashes, got {kid!r}")
    if path is not None:
        try:
            seed = path.read_text()
        except OSError as exc:
            raise SigningKeyError(f"cannot read the signing key {path}: {exc.strerror}") from None
        where = str(path)
    elif environ.get(seed_env):
        seed, where = environ[seed_env], seed_env
    else:
        return None
    try:
        return SigningKey.from_seed(kid, seed)
    except ValueError as exc:
        raise SigningKeyError(f"{where}: not an Ed25519 seed: {exc}") from None


NO_KEY = (
    "not applied: an agent is signed with the pool owner's key, and none was given "
    f"(--signing-key FILE or {SIGNING_KEY_ENV}; make one with `prefect-governance keygen`)"
)


NO_EXCEPTION_KEY = (
    "not applied: an exception is signed with the security team's exception key, and none "
    f"was given (--exception-key FILE or {EXCEPTION_SIGNING_KEY_ENV}; make one with "
    "`prefect-governance keygen --exception`)"
)


def max_exception_lifetime(environ: Mapping[str, str]) -> timedelta:
    """The longest an exception may live: PREFECT_GOVERNANCE_EXCEPTION_MAX_DAYS (90)."""
    raw = environ.get("PREFECT_GOVERNANCE_EXCEPTION_MAX_DAYS")
    return timedelta(days=float(raw) if raw else DEFAULT_MAX_DAYS)


def _same_exception(name: str, existing: Block, wanted: Block, key: SigningKey) -> bool:
    """The block holds this exception as ``key`` signed it under this name (only its stamp
    and signature differ from what would be signed now): applying it again changes nothing."""
    assert isinstance(existing, GovernanceException) and isinstance(wanted, GovernanceException)
    unstamped = ("issued_at",)
    mine = {k: v for k, v in exception_fields(wanted).items() if k not in unstamped}
    theirs = {k: v for k, v in exception_fields(existing).items() if k not in unstamped}
    if mine != theirs:
        return False
    try:
        verify_exception(name, existing, {key.key_id: key.public_b64})
    except ValueError:
        return False
    return True


async def apply_documents(
    documents: list[Document],
    *,
    agent_key: SigningKey | None = None,
    exception_key: SigningKey | None = None,
    now: datetime | None = None,
    max_lifetime: timedelta = timedelta(days=DEFAULT_MAX_DAYS),
) -> list[Change]:
    """Create or update each block (agents signed with ``agent_key``, exceptions stamped
    ``now`` and signed with ``exception_key``); report what changed.

    Agents and exceptions are skipped when there is no key for them, and an exception whose
    expiry is past or beyond ``max_lifetime``; the other documents still apply."""
    changes = []
    for document in documents:
        if isinstance(document.block, Notification):
            changes.append(await _apply_notification(document, document.block))
            continue
        if document.kind == "exception":
            if exception_key is None:
                changes.append(
                    Change(document.kind, document.name, "skipped", document.path, NO_EXCEPTION_KEY)
                )
                continue
            try:
                existing = await GovernanceException.aload(document.name)
            except (ValueError, ValidationError):
                existing = None
            if existing is not None and _same_exception(
                document.name, existing, document.block, exception_key
            ):
                changes.append(Change(document.kind, document.name, "unchanged", document.path))
                continue
            try:
                block = signed_exception(
                    document.name,
                    document.block,  # type: ignore[type-var]
                    exception_key,
                    now=now or datetime.now(timezone.utc),
                    max_lifetime=max_lifetime,
                )
            except ValueError as exc:
                changes.append(
                    Change(
                        document.kind,
                        document.name,
                        "skipped",
                        document.path,
                        f"not applied: {exc}",
                    )
                )
                continue
            await block.asave(document.name, overwrite=True)
            action = "created" if existing is None else "updated"
            changes.append(Change(document.kind, document.name, action, document.path))
            continue
        if document.kind == "agent":
            if agent_key is None:
                changes.append(
                    Change(document.kind, document.name, "skipped", document.path, NO_KEY)
                )
                continue
            document = Document(
                document.path,
                document.kind,
                document.name,
                signed(document.name, document.block, agent_key),  # type: ignore[arg-type]
            )
        assert isinstance(document.block, Block)
        cls = type(document.block)
        try:
            existing = await cls.aload(document.name)
        except (ValueError, ValidationError):
            existing = None
        if existing is not None and _fields(existing) == _fields(document.block):
            action = "unchanged"
        else:
            await document.block.asave(document.name, overwrite=True)
            action = "created" if existing is None else "updated"
        changes.append(Change(document.kind, document.name, action, document.path))
    return changes


async def _apply_notification(document: Document, spec: Notification) -> Change:
    """A notification document's automation, created, updated or unchanged; skipped (with
    why) when its block does not exist."""
    from prefect import get_client

    async with get_client() as client:
        try:
            action = await apply_notification(client, document.name, spec)
        except NotificationBlockMissing as exc:
            return Change(document.kind, document.name, "skipped", document.path, str(exc))
    return Change(document.kind, document.name, action, document.path)
