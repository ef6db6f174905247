"""The governance core: the policy contract, decisions, envelopes, trust, signing, engines.

Pure functions and models (plus the policy engines' clients), imported by every
other room; it imports none of them.
"""
