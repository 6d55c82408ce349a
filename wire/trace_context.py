"""The W3C ``traceparent`` of a request, checked: what the tap forwards and the sidecar trusts.

Imported by the tap (inside vLLM) and by the sidecar, so it holds no OpenTelemetry import. A
header is a client's text: only a value that parses as W3C Trace Context
(https://www.w3.org/TR/trace-context/#traceparent-header) is kept, and it is kept in its
normalised form (lower case, version ``00``, 55 characters), never as it came.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Version 00 is exactly 55 characters; a later version may append fields ("-..."), of which only
# the first four are read. Past this length a header is refused before any parsing.
MAX_CHARS = 512
# What the tap sends in place of a traceparent it refused (the value itself is never forwarded):
# the sidecar counts it (misalign_trace_contexts_total{outcome="refused_at_tap"}).
REFUSED = "refused"

_FIELDS = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


@dataclass(frozen=True, slots=True)
class TraceParent:
    trace_id: int  # 128 bits, never 0
    span_id: int  # the caller's span (64 bits, never 0): the parent of the sidecar's span
    flags: int  # bit 0: the caller sampled this trace

    @property
    def sampled(self) -> bool:
        return bool(self.flags & 1)

    @property
    def trace_id_hex(self) -> str:
        return f"{self.trace_id:032x}"

    def header(self) -> str:
        """The normalised header: version 00, lower case."""
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-{self.flags:02x}"


class BadTraceParent(ValueError):
    """``reason``: a fixed string for a metric label; the text never quotes the value whole."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse(value: str) -> TraceParent:
    """Parse a ``traceparent`` value or raise ``BadTraceParent`` saying what is wrong."""
    if len(value) > MAX_CHARS:
        raise BadTraceParent("too_long", f"traceparent has {len(value)} characters (> {MAX_CHARS})")
    text = value.strip(" \t")  # optional whitespace around a header value (RFC 9110)
    m = _FIELDS.match(text)
    if m is None:
        raise BadTraceParent(
            "malformed",
            "traceparent is not 'VV-<32 hex trace id>-<16 hex span id>-<2 hex flags>' "
            f"in lower case: {text[:60]!r}",
        )
    version = m.group(1)
    if version == "ff":
        raise BadTraceParent("malformed", "traceparent version ff is invalid")
    if version == "00" and len(text) != 55:
        raise BadTraceParent("malformed", "traceparent version 00 must be exactly 55 characters")
    if version != "00" and len(text) > 55 and text[55] != "-":
        raise BadTraceParent("malformed", "traceparent of a later version: no '-' after flags")
    trace_id, span_id = int(m.group(2), 16), int(m.group(3), 16)
    if trace_id == 0 or span_id == 0:
        raise BadTraceParent("malformed", "traceparent trace id and span id must not be all 0")
    return TraceParent(trace_id, span_id, int(m.group(4), 16))


def normalise(value: str | None) -> str:
    """For the tap: '' when there is none, the normalised header, or ``REFUSED``."""
    if not value:
        return ""
    try:
        return parse(value).header()
    except BadTraceParent:
        return REFUSED
