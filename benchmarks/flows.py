"""Flows the benchmarks deploy: each measures the worker, not the flow."""

from __future__ import annotations

from prefect import flow


@flow
def noop() -> int:
    """Do nothing; return a value."""
    return 1
