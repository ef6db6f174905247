"""The base of the package's own errors.

Every exception class prefect-governance defines derives from
:class:`GovernanceError` and keeps its standard base as well (``TaskRefused`` is
still a ``RuntimeError``, ``CapabilityDenied`` still a ``PermissionError``), so
``except GovernanceError`` catches whatever the package raised and no existing
``except`` changes meaning. It lives in the core, which every room may import,
the run's side included, and is ``prefect_governance.GovernanceError``.
"""

from __future__ import annotations


class GovernanceError(Exception):
    """An error prefect-governance raised: a refusal, a check that failed, a tool that
    could not do what it was asked."""
