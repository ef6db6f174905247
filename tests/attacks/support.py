"""What the attack tests share: the lineage a governed worker keeps in a Prefect home."""

from __future__ import annotations

from pathlib import Path


def home_lineage_url(home: Path) -> str:
    """The lineage a worker in this Prefect home uses when its pool names no store."""
    (home / "governance").mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'governance' / 'lineage.db'}"
