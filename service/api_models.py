"""The client-facing shapes of a score and of the loaded bundle, one definition for the JSON API
(service/http_api.py) and the typed client (service/client.py) over either transport.

A number the proto carries as NaN (a feature without a threshold, a z-score of an uncalibrated
feature) is ``None`` here: JSON has no NaN, and ``None`` says "not there" where NaN looks like a
value.
"""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from wire import monitor_pb2 as pb


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


class _Out(BaseModel):
    # Frozen: a result is a value. Unknown fields from a newer server are ignored, not refused.
    model_config = ConfigDict(frozen=True, extra="ignore")


class FeatureScore(_Out):
    name: str
    score: float | None
    threshold: float | None = Field(description="None: the feature has no calibrated threshold")
    flagged: bool
    z: float | None = None
    prompt_mean: float | None = None
    response_mean: float | None = None
    response_max_rolling: float | None = None

    @classmethod
    def from_proto(cls, f: pb.FeatureScore) -> FeatureScore:
        return cls(
            name=f.name,
            score=_num(f.score),
            threshold=_num(f.threshold) if f.has_threshold else None,
            flagged=f.flagged,
            z=_num(f.z),
            prompt_mean=_num(f.prompt_mean),
            response_mean=_num(f.response_mean),
            response_max_rolling=_num(f.response_max_rolling),
        )


class RequestScore(_Out):
    request_id: str = Field(description="the tap's (vLLM's internal) id; '' for Score")
    client_request_id: str = Field(description="the id the client saw (X-Request-Id based)")
    bundle_id: str
    model: str
    model_version: str
    flagged: bool
    tokens: int
    features: list[FeatureScore]
    finished_at: float | None = Field(description="seconds since the epoch; None for Score")
    scored_at: float
    mitigation: str = ""
    mitigated_tokens: int = 0

    def feature(self, name: str) -> FeatureScore:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"no feature {name!r}; the score has {[f.name for f in self.features]}")

    @classmethod
    def from_proto(cls, r: pb.RequestScore) -> RequestScore:
        return cls(
            request_id=r.request_id,
            client_request_id=r.client_request_id,
            bundle_id=r.bundle_id,
            model=r.model,
            model_version=r.model_version,
            flagged=r.flagged,
            tokens=r.tokens,
            features=[FeatureScore.from_proto(f) for f in r.features],
            finished_at=r.finished_at or None,
            scored_at=r.scored_at,
            mitigation=r.mitigation,
            mitigated_tokens=r.mitigated_tokens,
        )


class FeatureInfo(_Out):
    name: str
    method: str
    kind: str
    span: str
    reduce: str
    window: int
    threshold: float | None

    @classmethod
    def from_proto(cls, f: pb.FeatureInfo) -> FeatureInfo:
        return cls(
            name=f.name,
            method=f.method,
            kind=f.kind,
            span=f.span,
            reduce=f.reduce,
            window=f.window,
            threshold=_num(f.threshold) if f.has_threshold else None,
        )


class BundleInfo(_Out):
    bundle_id: str
    content_hash: str
    model: str
    hidden_size: int
    num_layers: int
    layer: int
    hook: str
    format_version: int
    features: list[FeatureInfo]

    @property
    def k(self) -> int:
        """Projections per token row (what ``score`` takes per row)."""
        return len(self.features)

    @classmethod
    def from_proto(cls, b: pb.BundleInfo) -> BundleInfo:
        return cls(
            bundle_id=b.bundle_id,
            content_hash=b.content_hash,
            model=b.model,
            hidden_size=b.hidden_size,
            num_layers=b.num_layers,
            layer=b.layer,
            hook=b.hook,
            format_version=b.format_version,
            features=[FeatureInfo.from_proto(f) for f in b.features],
        )


# -- the JSON API's request body ----------------------------------------------------------------

_Finite = Annotated[float, Field(allow_inf_nan=False)]
_Short = Annotated[str, Field(max_length=256)]


class ScoreBody(BaseModel):
    """POST /v1/score: token rows to score, as ``Score`` takes them."""

    # strict: "1" is not a number and true is not 1; extra fields are a client's mistake.
    model_config = ConfigDict(extra="forbid", strict=True)

    bundle_id: Annotated[str, Field(max_length=64)] = Field(
        default="", description="must be the loaded bundle's; '' whatever is loaded"
    )
    projections: list[list[_Finite]] = Field(
        min_length=1, description="one row of k raw projections (residual · direction) per token"
    )
    is_response: list[Annotated[int, Field(ge=0, le=1)]] = Field(
        description="per row: 0 prompt token, 1 response token"
    )
    token_ids: list[Annotated[int, Field(ge=0, le=2**32 - 1)]] | None = Field(
        default=None, description="per row; unset: zeros"
    )
    model: _Short = ""
    model_version: _Short = ""
