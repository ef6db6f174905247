"""The Rego library, shipped inside the wheel as ``prefect_governance.policies``.

This file only makes the directory importable so the installed worker finds its
default policies; OPA and the embedded engine read the ``.rego`` files beside it.
"""
