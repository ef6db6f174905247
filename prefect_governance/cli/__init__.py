"""Operator tools: the ``prefect-governance`` command, the demo, apply, audit, policy tools.

Outside the trust boundary of a run: may import every other room.
"""
