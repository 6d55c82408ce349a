"""The scoring runtime: rows in, request scores, metrics and flagged samples out.

Transport-free: the gRPC servicer and the tests drive it directly.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detectors.bundle import Bundle
from detectors.scoring import FeatureScore, score_request, token_scores
from service.flags import FlagQueue
from service.ingest import BadInput, RequestStore, Rows, decode_batch
from service.metrics import Metrics
from service.rpc import monitor_pb2 as pb

log = logging.getLogger(__name__)


def load_tokenizer(path: Path | None) -> Any:
    if path is None:
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def default_tokenizer_path(bundle: Bundle) -> Path | None:
    """The prepared SmolLM2's tokenizer when the bundle is for that model."""
    from detectors.model_store import SMOLLM2_NAME, prepared_dir

    path = prepared_dir() / "tokenizer.json"
    return path if bundle.spec.model.name == SMOLLM2_NAME and path.is_file() else None


def feature_proto(f: FeatureScore) -> pb.FeatureScore:
    def num(x: float | None) -> float:
        return float(x) if x is not None and np.isfinite(x) else float("nan")

    return pb.FeatureScore(
        name=f.name,
        score=num(f.score),
        threshold=num(f.threshold),
        has_threshold=f.threshold is not None,
        flagged=f.flagged,
        z=num(f.z),
        prompt_mean=num(f.prompt_mean),
        response_mean=num(f.response_mean),
        response_max_rolling=num(f.response_max_rolling),
    )


@dataclass(frozen=True)
class _Scored:
    """A finished request's score, kept cheaply; the proto is built only when asked for."""

    request_id: str
    client_request_id: str
    model: str
    model_version: str
    flagged: bool
    tokens: int
    features: list[FeatureScore]
    finished_at: float

    def proto(self, bundle_id: str) -> pb.RequestScore:
        return pb.RequestScore(
            request_id=self.request_id,
            client_request_id=self.client_request_id,
            bundle_id=bundle_id,
            model=self.model,
            model_version=self.model_version,
            flagged=self.flagged,
            tokens=self.tokens,
            features=[feature_proto(f) for f in self.features],
            finished_at=self.finished_at,
            scored_at=self.finished_at,
        )


class Monitor:
    def __init__(
        self,
        bundle: Bundle,
        metrics: Metrics,
        queue: FlagQueue | None,
        *,
        max_requests: int = 100_000,
        max_tokens: int = 32_768,
        timeout_s: float = 600.0,
        recent_scores: int = 10_000,
        tokenizer: Any = None,
    ) -> None:
        self.bundle = bundle
        self.bundle_id = bundle.bundle_id
        self.metrics = metrics
        self.queue = queue
        self.tokenizer = tokenizer
        self.store = RequestStore(bundle.k, max_requests, max_tokens, timeout_s)
        self.recent: OrderedDict[str, _Scored] = OrderedDict()
        self.client_ids: OrderedDict[str, str] = OrderedDict()
        self.recent_limit = recent_scores
        self._sender_drops: dict[tuple[str, str, str], int] = {}
        self._labeled: dict[tuple[str, str], tuple[Any, list[Any]]] = {}
        self._tokens = metrics.tokens_ingested.labels(self.bundle_id)
        self._steps = metrics.steps_ingested.labels(self.bundle_id)

    # -- ingest ------------------------------------------------------------------------------

    def ingest(self, msg: pb.StepBatch) -> int:
        """Apply one step batch; returns the number of requests it finished.

        Raises ``BadInput`` (and changes nothing) when the batch is malformed.
        """
        rows = decode_batch(self.bundle, msg)
        now = time.monotonic()
        dropped = self.store.add(rows, now)
        for reason, n in dropped.items():
            self.metrics.rows_dropped.labels("sidecar", reason).inc(n)
        self._tokens.inc(len(rows.meta))
        self._steps.inc()
        self._count_sender_drops(msg)
        for fr in msg.finished:
            self.finish(fr, now)
        self.metrics.active_requests.set(len(self.store))
        return len(msg.finished)

    def _count_sender_drops(self, msg: pb.StepBatch) -> None:
        """Turn the sender's cumulative counters into increments (a restart resets them)."""
        for kind, counts, metric in (
            ("rows", msg.drops.rows_by_reason, self.metrics.rows_dropped),
            ("steps", msg.drops.steps_by_reason, self.metrics.steps_dropped),
        ):
            for reason, total in counts.items():
                key = (msg.sender_id, kind, reason)
                last = self._sender_drops.get(key, 0)
                inc = total - last if total >= last else total
                if inc:
                    metric.labels("inference", reason).inc(inc)
                self._sender_drops[key] = total

    def expire(self) -> int:
        n = self.store.expire(time.monotonic())
        if n:
            self.metrics.requests_expired.labels("timeout").inc(n)
            self.metrics.active_requests.set(len(self.store))
        return n

    # -- scoring -----------------------------------------------------------------------------

    def finish(self, fr: pb.FinishedRequest, arrived: float) -> _Scored | None:
        state = self.store.finish(fr.request_id)
        if isinstance(state, str) or state is None:
            self.metrics.finishes_ignored.labels(state or "unknown").inc()
            return None
        token_ids, roles, proj = state.ordered()
        result = self._score(
            fr.request_id, fr.client_request_id, fr.model, fr.model_version, token_ids, roles, proj
        )
        self.metrics.scoring_latency.observe(time.monotonic() - arrived)
        return result

    def score_rows(self, rows: Rows, model: str, model_version: str) -> pb.RequestScore:
        """Score rows without keeping or queueing anything (the unary Score call)."""
        ts = token_scores(self.bundle, rows.projections)
        feats = score_request(self.bundle, ts, rows.roles)
        return pb.RequestScore(
            bundle_id=self.bundle_id,
            model=model,
            model_version=model_version,
            flagged=any(f.flagged for f in feats),
            tokens=len(rows.roles),
            features=[feature_proto(f) for f in feats],
            scored_at=time.time(),
        )

    def _score(
        self,
        rid: str,
        client_id: str,
        model: str,
        version: str,
        token_ids: np.ndarray,
        roles: np.ndarray,
        proj: np.ndarray,
    ) -> _Scored:
        ts = token_scores(self.bundle, proj)
        feats = score_request(self.bundle, ts, roles)
        flagged = any(f.flagged for f in feats)
        now = time.time()
        scored, flags = self._children(model, version)
        scored.inc()
        self.metrics.request_score.observe(model, version, np.array([f.score for f in feats]))
        for f, flag in zip(feats, flags, strict=True):
            if f.flagged:
                flag.inc()
        result = _Scored(rid, client_id, model, version, flagged, len(roles), feats, now)
        self._remember(result)
        if flagged and self.queue is not None:
            self.queue.put(self._sample(result, feats, token_ids, roles, ts), rid)
        return result

    def _children(self, model: str, version: str) -> tuple[Any, list[Any]]:
        """Labeled metric children for one (model, version), looked up once, not per request."""
        key = (model, version)
        hit = self._labeled.get(key)
        if hit is None:
            m, labels = self.metrics, (model, version, self.bundle_id)
            hit = self._labeled[key] = (
                m.requests_scored.labels(*labels),
                [m.requests_flagged.labels(*labels, n) for n in self.bundle.feature_names],
            )
        return hit

    def _remember(self, result: _Scored) -> None:
        self.recent[result.request_id] = result
        if result.client_request_id:
            self.client_ids[result.client_request_id] = result.request_id
        while len(self.recent) > self.recent_limit:
            self.recent.popitem(last=False)
        while len(self.client_ids) > self.recent_limit:
            self.client_ids.popitem(last=False)

    def lookup(self, request_id: str) -> pb.RequestScore | None:
        hit = self.recent.get(request_id)
        # The OpenAI-compatible server names a request "chatcmpl-<X-Request-Id>".
        for alias in (request_id, f"chatcmpl-{request_id}", f"cmpl-{request_id}"):
            if hit is None and alias in self.client_ids:
                hit = self.recent.get(self.client_ids[alias])
        return hit.proto(self.bundle_id) if hit is not None else None

    def _sample(
        self,
        result: _Scored,
        feats: list[FeatureScore],
        token_ids: np.ndarray,
        roles: np.ndarray,
        ts: np.ndarray,
    ) -> dict[str, Any]:
        top = max(
            (f for f in feats if f.flagged), key=lambda f: f.z if f.z is not None else f.score
        )
        sample: dict[str, Any] = {
            "client_request_id": result.client_request_id,
            "model": result.model,
            "model_version": result.model_version,
            "bundle": self.bundle_id,
            "top_feature": top.name,
            "top_score": f"{top.score:.6g}",
            "finished_at": f"{result.finished_at:.3f}",
            "features": [f.as_dict() for f in feats],
            "tokens": {
                "token_ids": token_ids.tolist(),
                "roles": roles.tolist(),
                "scores": {
                    n: np.round(ts[:, i], 4).tolist()
                    for i, n in enumerate(self.bundle.feature_names)
                },
            },
        }
        if self.tokenizer is not None:
            sample["prompt_text"] = self.tokenizer.decode(
                token_ids[roles == 0].tolist(), skip_special_tokens=False
            )
            sample["response_text"] = self.tokenizer.decode(
                token_ids[roles == 1].tolist(), skip_special_tokens=False
            )
            sample["token_text"] = [self.tokenizer.id_to_token(int(t)) or "" for t in token_ids]
        return sample


__all__ = ["BadInput", "Monitor"]
