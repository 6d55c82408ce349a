"""Misalignment feature directions: the bundle format, extraction, calibration and scoring.

Only `bundle`, `scoring`, `transcripts`, `evaluate` and `errors` are importable without torch;
the sidecar depends on nothing else.
"""
