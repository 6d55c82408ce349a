"""Errors a user can cause and fix, each saying which file, field or value was wrong.

The one tree for the whole project (detectors, tap, wire, sidecar, review):

    MisalignError
     ├── DataError            a transcript file: path, line, field
     ├── BundleError          a direction bundle: path, field
     ├── ModelError           a model directory or a layer that does not fit it
     ├── GateError            the gate's inputs (detectors/gate.py): which side, what is wrong
     ├── BadInput             a message a client sent (wire/codec.py, the sidecar): the field,
     │                        and a ``reason`` that is the refusal metric's label
     ├── TapConfigError       the tap's MISALIGN_TAP_* settings or the engine it is loaded into
     ├── SettingsError        the sidecar's settings (service/settings.py)
     ├── RedisSettingsError   a Redis URL or its TLS files (service/redis_conn.py)
     ├── NotReplicatedError   too few Redis replicas acknowledged a write; also a RedisError,
     │                        so it is defined beside the flag writer (service/flags.py)
     ├── ReviewSettingsError  the review app's settings (service/review_settings.py)
     ├── RecalibrationError   thresholds from review labels (review/recalibrate.py)
     ├── ReviewError          a review action that cannot be done, or Redis out of reach
     │    └── SampleState     the sample is not where the action needs it
     ├── QueryError           a review query parameter (review/query.py): which one
     └── MonitorClientError   what the sidecar answered a client (service/client.py, beside the
          │                   client, which maps gRPC and HTTP statuses onto these)
          └── ScoreNotFound, Unauthenticated, InvalidArgument, Busy, Unavailable

Internal signals that never reach a user are not in the tree: ``service.http_api.ApiError`` (an
HTTP status on its way to the response), ``service.score_waiters.WaitersFull`` and
``ShuttingDown`` (gRPC statuses on their way out), ``wire.trace_context.BadTraceParent`` (counted
by reason, never raised to a caller).

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


class GateError(MisalignError):
    """Input the gate cannot compare: says which side and what is wrong."""


class BadInput(MisalignError):
    """A message that cannot be used; ``reason`` is the metric label, the text names the field."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class TapConfigError(MisalignError):
    pass


class SettingsError(MisalignError):
    pass


class RedisSettingsError(MisalignError):
    pass


class ReviewSettingsError(MisalignError):
    pass


class RecalibrationError(MisalignError):
    pass


class ReviewError(MisalignError):
    """A review action that cannot be done, or Redis out of reach; the message says which."""


class SampleState(ReviewError):
    """The sample is not where the action needs it: decided, dead-lettered, held by another."""
