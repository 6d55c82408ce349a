"""The flagged sample: what the sidecar writes to the flagged stream for each flagged request, and
what the review app reads back. One type, one encoding each way.

On the stream every value is a string: numbers as text, the structured fields as JSON. Reading is
lenient because the stream is not ours alone (anyone holding the sidecar's ACL user can append):
a field that cannot be read is left out and named in the problems, so a hostile or broken entry
can still be shown, decided or dead-lettered.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from detectors.scoring import FeatureScore


class FeatureResult(BaseModel):
    """One feature's result on the request (``detectors.scoring.FeatureScore``, JSON-safe)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    # In FeatureScore's order, so the stream's JSON reads as it did before this type.
    name: str
    score: float | None
    prompt_mean: float | None = None
    response_mean: float | None = None
    response_max_rolling: float | None = None
    threshold: float | None = None
    z: float | None = None
    flagged: bool = False

    @classmethod
    def of(cls, f: FeatureScore) -> FeatureResult:
        return cls.model_construct(**f.as_dict())  # type: ignore[arg-type]


class TokenScores(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    token_ids: list[int]  # -1 where redaction removed a token
    roles: list[int]
    scores: dict[str, list[float | None]]


class SampleHeader(BaseModel):
    """What a queue row and a label carry of a sample (the rest is text and token scores)."""

    model_config = ConfigDict(frozen=True)

    request_id: str = ""
    client_request_id: str = ""
    model: str = ""
    model_version: str = ""
    adapter: str = ""  # the LoRA adapter that served the request, "" the base model
    bundle: str = ""
    top_feature: str = ""
    top_score: float | None = None
    finished_at: float | None = None
    trace_id: str = ""  # the request's W3C trace id (32 hex), when it came with a traceparent


HEADER_FIELDS = tuple(SampleHeader.model_fields)


class FlaggedSample(SampleHeader):
    traceparent: str = ""  # names the caller's span, the parent of the score span
    mitigation: str = ""  # the request's mitigation rules, as the tap applied them
    mitigated_tokens: int = 0
    features: list[FeatureResult] = []
    tokens: TokenScores | None = None
    token_text: list[str] | None = None  # with a tokenizer only
    prompt_text: str | None = None
    response_text: str | None = None

    def to_fields(self) -> dict[str, str]:
        """The stream entry. Unset text and trace fields are left out, as before there was a type."""
        out = {
            "request_id": self.request_id,
            "client_request_id": self.client_request_id,
            "model": self.model,
            "model_version": self.model_version,
            "adapter": self.adapter,
            "bundle": self.bundle,
            "top_feature": self.top_feature,
            "top_score": "" if self.top_score is None else f"{self.top_score:.6g}",
            "finished_at": "" if self.finished_at is None else f"{self.finished_at:.3f}",
            "mitigation": self.mitigation,
            "mitigated_tokens": str(self.mitigated_tokens),
            "features": json.dumps([f.model_dump() for f in self.features]),
        }
        if self.tokens is not None:
            out["tokens"] = json.dumps(self.tokens.model_dump())
        if self.trace_id:
            out["trace_id"] = self.trace_id
            out["traceparent"] = self.traceparent
        if self.prompt_text is not None:
            out["prompt_text"] = self.prompt_text
        if self.response_text is not None:
            out["response_text"] = self.response_text
        if self.token_text is not None:
            out["token_text"] = json.dumps(self.token_text)
        return out


def _num(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def _trace_id(value: str | None) -> str:
    """The sidecar writes 32 lower-case hex digits; anything else in the stream is not shown."""
    ok = value is not None and len(value) == 32 and all(c in "0123456789abcdef" for c in value)
    return value if ok and value is not None else ""


def header_fields(fields: dict[str, str]) -> dict[str, Any]:
    """The header's fields from a stream entry (or a label's): never fails."""
    out: dict[str, Any] = {k: fields.get(k, "") for k in HEADER_FIELDS}
    out.update(
        top_score=_num(fields.get("top_score")),
        finished_at=_num(fields.get("finished_at")),
        trace_id=_trace_id(fields.get("trace_id")),
    )
    return out


def read_features(raw: str | None) -> list[FeatureResult]:
    """The ``features`` field (raises ``ValueError``/``TypeError``/``ValidationError``)."""
    return [FeatureResult.model_validate(f) for f in json.loads(raw or "[]")]


def sample_fields(fields: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """A stream entry as the keyword arguments of a ``FlaggedSample`` (or a subclass), and what
    could not be read."""
    out = header_fields(fields)
    out.update(
        traceparent=fields.get("traceparent", ""),
        mitigation=fields.get("mitigation", ""),
        prompt_text=fields.get("prompt_text"),
        response_text=fields.get("response_text"),
    )
    problems = []
    try:
        out["mitigated_tokens"] = int(fields.get("mitigated_tokens") or 0)
    except ValueError:
        problems.append("field 'mitigated_tokens': not an integer")
    for key in ("features", "tokens", "token_text"):
        if key not in fields:
            continue
        try:
            if key == "features":
                out[key] = read_features(fields[key])
            elif key == "tokens":
                out[key] = TokenScores.model_validate(json.loads(fields[key]))
            else:
                out[key] = [str(t) for t in json.loads(fields[key])]
        except (ValueError, TypeError, ValidationError) as exc:
            problems.append(f"field {key!r}: {type(exc).__name__}: {str(exc)[:200]}")
    if "features" not in fields:
        problems.append("field 'features' is missing")
    tokens, text = out.get("tokens"), out.get("token_text")
    if tokens is not None and not problems:
        n = len(tokens.token_ids)
        bad = [
            name
            for name, col in (
                ("roles", tokens.roles),
                *((f"scores.{k}", v) for k, v in tokens.scores.items()),
                *((("token_text", text),) if text else ()),
            )
            if len(col) != n
        ]
        if bad:
            problems.append(f"token columns {bad} do not have {n} rows like token_ids")
    return out, problems
