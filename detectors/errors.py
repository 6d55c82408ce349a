"""Errors a user can cause and fix, each saying which file, field or value was wrong.

    MisalignError
     ├── DataError      a transcript file: path, line, field
     ├── BundleError    a direction bundle: path, field
     ├── ModelError     a model directory or a layer that does not fit it
     └── BadInput       a message a client sent (wire.codec, the sidecar): the field, and a
                        ``reason`` that is the refusal metric's label

The CLI prints these as one line and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MisalignError(Exception):
    """Base of every error caused by input the user can correct."""


class DataError(MisalignError):
    def __init__(self, path: object, message: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line


class BundleError(MisalignError):
    def __init__(self, path: object, message: str) -> None:
        super().__init__(f"bundle {path}: {message}")
        self.path = path


class ModelError(MisalignError):
    pass


class BadInput(MisalignError):
    """A message that cannot be used; ``reason`` is the metric label, the text names the field."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
