"""Running a bundle over transcripts offline, with the transformers reader.

The same arithmetic as the live path: project the residual at each layer the bundle reads (what the tap
sends), then ``scoring.token_scores`` and ``scoring.score_request`` (what the sidecar does).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from detectors.activations import ActivationReader
from detectors.bundle import Bundle
from detectors.scoring import FeatureScore, project, score_request, token_scores
from detectors.transcripts import Transcript


@dataclass(frozen=True)
class ScoredRecord:
    index: int
    record: Transcript
    token_ids: np.ndarray  # [t]
    roles: np.ndarray  # [t]
    projections: np.ndarray  # [t, k] raw, as the tap sends them
    token_scores: np.ndarray  # [t, k]
    features: list[FeatureScore]

    @property
    def flagged(self) -> bool:
        return any(f.flagged for f in self.features)

    def as_json(self, bundle: Bundle, with_tokens: bool = True) -> dict[str, object]:
        out: dict[str, object] = {
            "index": self.index,
            "id": self.record.id,
            "label": self.record.label,
            "bundle": bundle.bundle_id,
            "flagged": self.flagged,
            "features": {f.name: f.as_dict() for f in self.features},
        }
        if with_tokens:
            out["tokens"] = {
                "token_ids": self.token_ids.tolist(),
                "roles": self.roles.tolist(),
                "scores": {
                    name: np.round(self.token_scores[:, i], 5).tolist()
                    for i, name in enumerate(bundle.feature_names)
                },
            }
        return out


def score_records(
    bundle: Bundle,
    reader: ActivationReader,
    records: Sequence[Transcript],
    *,
    max_tokens: int | None = 256,
    batch_size: int = 8,
    progress: bool = True,
) -> Iterator[ScoredRecord]:
    layers = bundle.tapped_layers or [bundle.spec.layer]
    for layer in layers:
        reader.check_layer(layer)
    for i, acts in enumerate(
        reader.read(
            records,
            layers,
            max_tokens=max_tokens,
            batch_size=batch_size,
            progress=progress,
            desc="scoring",
        )
    ):
        proj = project(bundle, acts.layers)
        ts = token_scores(bundle, proj)
        yield ScoredRecord(
            index=i,
            record=records[i],
            token_ids=acts.token_ids,
            roles=acts.roles,
            projections=proj,
            token_scores=ts,
            features=score_request(bundle, ts, acts.roles),
        )
