"""The scoring runtime: rows in, request scores, metrics and flagged samples out.

Transport-free: the gRPC servicer and the tests drive it directly.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from detectors.bundle import Bundle
from detectors.errors import BadInput
from detectors.roles import PROMPT, RESPONSE
from detectors.scoring import FeatureScore, RequestScores, Scorer
from service.drift import DriftTracker
from service.flagged_sample import FeatureResult, FlaggedSample, TokenScores
from service.flags import FlagQueue
from service.ingest import RequestStore
from service.metrics import Metrics
from service.redaction import Redactor
from service.sample_worker import SampleWorker
from wire.trace_context import REFUSED, BadTraceParent, TraceParent
from wire.trace_context import parse as parse_traceparent

if TYPE_CHECKING:  # the OpenTelemetry SDK is imported only when spans are exported
    from service.tracing import ScoreTracer
from wire import monitor_pb2 as pb
from wire.codec import Rows, decode_batch

log = logging.getLogger(__name__)
# A sender's cumulative drop count above this is refused: 10^12 rows is 115 days at 100,000
# rows/s, and 2^64 - 1 (what an uint64 can say) would swamp every rate computed from the counter.
MAX_REPORTED_DROPS = 10**12
SENDERS_TRACKED = 4096  # senders whose last drop counts are kept to turn totals into increments


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


@dataclass(slots=True)
class _Marks:
    """What the tap said of a mitigated request until it finishes."""

    label: str
    changed: int = 0  # rows the op changed
    # One past the highest position seen: rows below it that come again (recomputed after
    # preemption) are not counted twice.
    next_pos: int = 0


@dataclass(frozen=True, slots=True)
class _Scored:
    """A finished request's score, kept cheaply: row ``index`` of the batch it was scored in;
    the per-feature objects and the proto are built only when asked for."""

    request_id: str
    client_request_id: str
    model: str
    model_version: str
    flagged: bool
    tokens: int
    batch: RequestScores
    index: int
    finished_at: float
    mitigation: str = ""  # the tap's rules for this request, "" unmitigated
    mitigated_tokens: int = 0
    adapter: str = ""  # the LoRA adapter that served it (as the tap sent it), "" the base model
    trace: TraceParent | None = None  # the request's W3C trace context, when it had a valid one

    @property
    def features(self) -> list[FeatureScore]:
        return self.batch.features(self.index)

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
            mitigation=self.mitigation,
            mitigated_tokens=self.mitigated_tokens,
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
        max_rows: int | None = None,
        timeout_s: float = 600.0,
        recent_scores: int = 10_000,
        tokenizer: Any = None,
        score_batch: int = 64,
        drift: DriftTracker | None = None,
        redactor: Redactor | None = None,
        samples: SampleWorker | None = None,
        sample_text_chars: int = 32_768,
        tracer: ScoreTracer | None = None,
    ) -> None:
        self.bundle = bundle
        # Score spans to an OTLP collector (settings otlp_endpoint); None: none are made.
        self.tracer = tracer
        self.redactor = redactor
        # None: flagged samples are built where they are scored (tests, benchmarks); the server
        # builds them on a thread of their own.
        self.samples = samples
        self.sample_text_chars = sample_text_chars
        self.bundle_id = bundle.bundle_id
        self.metrics = metrics
        self.queue = queue
        self.tokenizer = tokenizer
        self.drift = drift
        self.scorer = Scorer(bundle)
        self.store = RequestStore(bundle.k, max_requests, max_tokens, timeout_s, max_rows=max_rows)
        self.recent: OrderedDict[str, _Scored] = OrderedDict()
        self.client_ids: OrderedDict[str, str] = OrderedDict()
        self.recent_limit = recent_scores
        self._sender_drops: OrderedDict[tuple[str, str, str], int] = OrderedDict()
        self._labeled: dict[tuple[str, str, str], tuple[Any, list[Any]]] = {}
        self._tokens = metrics.tokens_ingested.labels(self.bundle_id)
        self._steps = metrics.steps_ingested.labels(self.bundle_id)
        # Finished requests wait here to be scored together: a pass over many requests costs
        # little more than over one. Scored at ``score_batch`` requests, by ``flush`` (the server
        # calls it a moment after a step and when a stream ends), or when one is looked up.
        self.score_batch = score_batch
        self._pending: list[tuple[pb.FinishedRequest, int, float]] = []  # finish, slot, arrival
        self._pending_ids: set[str] = set()  # their request and client ids
        # request id -> its marks, for requests a mitigating tap sent;
        # bounded like the store (an expired request's entry ages out).
        self._mitigated: OrderedDict[str, _Marks] = OrderedDict()
        self._mitigated_limit = max_requests
        self._bias = bundle.bias
        # Called with the request and client ids of each batch of requests scored (the server's
        # long-polled lookups, service/score_waiters.py); None: nobody listens.
        self.on_scored: Callable[[Iterable[str]], None] | None = None

    # -- ingest ------------------------------------------------------------------------------

    def ingest(self, msg: pb.StepBatch) -> int:
        """Apply one step batch; returns the number of requests it finished.

        Raises ``BadInput`` (and changes nothing) when the batch is malformed.
        """
        rows = decode_batch(self.bundle_id, self.bundle.k, msg)
        if msg.activated and len(rows.meta):
            # The tap sends activations (bias added, JumpReLU applied); the store keeps raw
            # projections. Subtracting the bias undoes both: a JumpReLU threshold is >= 0.
            rows = replace(rows, projections=rows.projections - self._bias)
        mitigated = _mitigation(msg, rows)  # checked before anything changes
        _check_sender_drops(msg)
        now = time.monotonic()
        dropped = self.store.add(rows, now)
        for rid, label, pos, changed in mitigated:
            marks = self._mitigated.setdefault(rid, _Marks(label))
            marks.label = label
            marks.changed += int(changed[pos >= marks.next_pos].sum())
            if len(pos):
                marks.next_pos = max(marks.next_pos, int(pos.max()) + 1)
            if len(self._mitigated) > self._mitigated_limit:
                self._mitigated.popitem(last=False)
        for reason, n in dropped.items():
            self.metrics.rows_dropped.labels("sidecar", reason).inc(n)
        self._tokens.inc(len(rows.meta))
        self._steps.inc()
        self._count_sender_drops(msg)
        if msg.finished:
            self._close(list(msg.finished), now)
        self.metrics.active_requests.set(len(self.store))
        return len(msg.finished)

    def _count_sender_drops(self, msg: pb.StepBatch) -> None:
        """Turn the sender's cumulative counters into increments (a restart resets them).

        A reason this code does not know is counted as ``other`` (the totals of all such
        reasons of a sender summed). The last totals of the most recent ``SENDERS_TRACKED``
        sender and reason pairs are kept; a sender forgotten has its next total counted whole,
        as after a restart of the sidecar."""
        for kind, counts, metric in (
            ("rows", msg.drops.rows_by_reason, self.metrics.rows_dropped),
            ("steps", msg.drops.steps_by_reason, self.metrics.steps_dropped),
        ):
            totals: dict[str, int] = {}
            for reason, total in counts.items():
                label = self.metrics.drop_reason(reason)
                totals[label] = totals.get(label, 0) + total
            for reason, total in totals.items():
                key = (msg.sender_id, kind, reason)
                last = self._sender_drops.pop(key, 0)
                inc = total - last if total >= last else total
                if inc:
                    metric.labels("inference", reason).inc(inc)
                self._sender_drops[key] = total
                while len(self._sender_drops) > SENDERS_TRACKED:
                    self._sender_drops.popitem(last=False)

    def expire(self) -> int:
        n = self.store.expire(time.monotonic())
        if n:
            self.metrics.requests_expired.labels("timeout").inc(n)
            self.metrics.active_requests.set(len(self.store))
        return n

    # -- scoring -----------------------------------------------------------------------------

    def _close(self, finished: list[pb.FinishedRequest], arrived: float) -> None:
        """Close finished requests (their rows are final from here) and queue them for scoring;
        a finish for a request never seen, expired, or already finished is counted instead."""
        slots, reasons = self.store.finish([fr.request_id for fr in finished])
        live = iter(slots)
        for fr, reason in zip(finished, reasons, strict=True):
            if reason is not None:
                self.metrics.finishes_ignored.labels(reason).inc()
                continue
            self._pending.append((fr, next(live), arrived))
            self._pending_ids.add(fr.request_id)
            if fr.client_request_id:
                self._pending_ids.add(fr.client_request_id)
        if len(self._pending) >= self.score_batch:
            self.flush()

    @property
    def pending(self) -> int:
        """Finished requests not scored yet."""
        return len(self._pending)

    def flush(self) -> list[_Scored]:
        """Score every finished request waiting, in one vectorised pass."""
        if not self._pending:
            return []
        pending, self._pending = self._pending, []
        self._pending_ids.clear()
        got = self.store.gather([slot for _, slot, _ in pending])
        ts = self.scorer.token_scores(got.projections)
        batch = self.scorer.score(ts, got.roles, got.offsets)
        finished = [fr for fr, _, _ in pending]
        results = self._record(finished, batch, got.offsets, got.token_ids, got.roles, ts)
        now = time.monotonic()
        for _, _, arrived in pending:
            self.metrics.scoring_latency.observe(now - arrived)
        if self.tracer is not None:
            self._spans(results, [arrived for _, _, arrived in pending], now)
        return results

    def _trace(self, fr: pb.FinishedRequest) -> TraceParent | None:
        """The finish's trace context, checked again here: the tap is a client like any."""
        if not fr.traceparent:
            return None
        if fr.traceparent == REFUSED:
            self.metrics.trace_contexts.labels("refused_at_tap").inc()
            return None
        try:
            trace = parse_traceparent(fr.traceparent)
        except BadTraceParent as exc:
            self.metrics.trace_contexts.labels(exc.reason).inc()
            return None
        self.metrics.trace_contexts.labels("valid").inc()
        return trace

    def _spans(self, results: list[_Scored], arrived: list[float], now: float) -> None:
        """Each traced request's span, from its finish arriving to its score (wall clock)."""
        assert self.tracer is not None
        wall_ns, names = time.time_ns(), self.bundle.feature_names
        for result, t0 in zip(results, arrived, strict=True):
            if result.trace is None:
                continue
            # From the batch's arrays, not result.features: no per-feature objects made here.
            scores = result.batch.score[result.index].tolist()
            flags = result.batch.flagged[result.index].tolist()
            attrs: dict[str, Any] = {
                "misalign.flagged": result.flagged,
                "misalign.bundle_id": self.bundle_id,
                "misalign.model": result.model,
                "misalign.model_version": result.model_version,
                "misalign.request_id": result.request_id,
                "misalign.client_request_id": result.client_request_id,
                "misalign.tokens": result.tokens,
            }
            for name, score in zip(names, scores, strict=True):
                if math.isfinite(score):
                    attrs[f"misalign.score.{name}"] = score
            if result.mitigation:
                attrs["misalign.mitigation"] = result.mitigation
            flagged = [n for n, f in zip(names, flags, strict=True) if f]
            self.tracer.emit(result.trace, wall_ns - int((now - t0) * 1e9), wall_ns, attrs, flagged)

    def score_rows(self, rows: Rows, model: str, model_version: str) -> pb.RequestScore:
        """Score rows without keeping or queueing anything (the unary Score call)."""
        ts = self.scorer.token_scores(rows.projections)
        feats = self.scorer.score(ts, rows.roles, rows.offsets[[0, -1]]).features(0)
        return pb.RequestScore(
            bundle_id=self.bundle_id,
            model=model,
            model_version=model_version,
            flagged=any(f.flagged for f in feats),
            tokens=len(rows.roles),
            features=[feature_proto(f) for f in feats],
            scored_at=time.time(),
        )

    def _record(
        self,
        finished: list[pb.FinishedRequest],
        batch: RequestScores,
        offsets: np.ndarray,
        token_ids: np.ndarray,
        roles: np.ndarray,
        ts: np.ndarray,
    ) -> list[_Scored]:
        """The final scores of requests scored together: metrics (one update per model and
        version, not per request), the lookup table, and the flagged samples."""
        now = time.time()
        flagged = np.asarray(batch.flagged.any(axis=1))
        any_flag: list[bool] = flagged.tolist()
        by_label: dict[tuple[str, str, str], list[int]] = {}
        results = []
        off = offsets.tolist()
        m = self.metrics
        model_label, version_label, adapter_label = m.model, m.model_version, m.adapter
        untraced = 0
        for i, fr in enumerate(finished):
            trace = self._trace(fr) if fr.traceparent else None
            untraced += not fr.traceparent
            labels = (
                model_label(fr.model),
                version_label(fr.model_version),
                adapter_label(fr.adapter),
            )
            by_label.setdefault(labels, []).append(i)
            marks = self._mitigated.pop(fr.request_id, None) or _Marks("")
            mitigation, changed = marks.label, marks.changed
            if mitigation:
                self._count_mitigated(labels, mitigation, changed, any_flag[i])
            result = _Scored(
                fr.request_id,
                fr.client_request_id,
                fr.model,
                fr.model_version,
                any_flag[i],
                off[i + 1] - off[i],
                batch,
                i,
                now,
                mitigation,
                changed,
                fr.adapter,
                trace,
            )
            self._remember(result)
            results.append(result)
        if untraced:
            self.metrics.trace_contexts.labels("none").inc(untraced)
        for (model, version, adapter), idx in by_label.items():
            scored, flags = self._children(model, version, adapter)
            scored.inc(len(idx))
            self.metrics.request_score.observe(model, version, batch.score[idx], adapter)
            if self.drift is not None:
                self.drift.observe(model, version, batch.score[idx], adapter)
            for flag, n in zip(flags, batch.flagged[idx].sum(axis=0).tolist(), strict=True):
                if n:
                    flag.inc(n)
        if self.on_scored is not None:
            self.on_scored(
                [fr.request_id for fr in finished] + [fr.client_request_id for fr in finished]
            )
        if self.queue is not None:
            for i in np.flatnonzero(flagged).tolist():
                s, e = off[i], off[i + 1]
                result = results[i]

                def build(
                    result: _Scored = result,
                    tok: np.ndarray = token_ids[s:e],
                    rol: np.ndarray = roles[s:e],
                    sc: np.ndarray = ts[s:e],
                ) -> dict[str, str]:
                    return self._sample(result, result.features, tok, rol, sc).to_fields()

                if self.samples is not None:
                    self.samples.submit(build, result.request_id)
                else:
                    self.queue.put(build(), result.request_id)
        return results

    def _count_mitigated(
        self, labels: tuple[str, str, str], mitigation: str, changed: int, flagged: bool
    ) -> None:
        if not changed:
            return  # rules that never fired (@flagged, below the threshold): nothing was moved
        # The mode only: a label per rule would let a client mint series with its own alphas.
        modes = "+".join(
            sorted(
                {self.metrics.mitigation_mode(r.split(":", 1)[0]) for r in mitigation.split(",")}
            )
        )
        m, flag = self.metrics, "yes" if flagged else "no"
        m.requests_mitigated.labels(*labels, self.bundle_id, modes, flag).inc()
        m.tokens_mitigated.labels(*labels, self.bundle_id).inc(changed)

    def _children(self, model: str, version: str, adapter: str) -> tuple[Any, list[Any]]:
        """Labeled metric children for one (model, version, adapter), looked up once, not per
        request."""
        key = (model, version, adapter)
        hit = self._labeled.get(key)
        if hit is None:
            m, labels = self.metrics, (model, version, adapter, self.bundle_id)
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
        # The OpenAI-compatible server names a request "chatcmpl-<X-Request-Id>".
        aliases = (request_id, f"chatcmpl-{request_id}", f"cmpl-{request_id}")
        if self._pending_ids and not self._pending_ids.isdisjoint(aliases):
            self.flush()  # finished and waiting for its batch: score it now
        hit = self.recent.get(request_id)
        for alias in aliases:
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
    ) -> FlaggedSample:
        top = max(
            (f for f in feats if f.flagged), key=lambda f: f.z if f.z is not None else f.score
        )
        text: dict[str, Any] = {}
        if self.tokenizer is not None:
            text["prompt_text"] = self.tokenizer.decode(
                token_ids[roles == PROMPT].tolist(), skip_special_tokens=False
            )
            text["response_text"] = self.tokenizer.decode(
                token_ids[roles == RESPONSE].tolist(), skip_special_tokens=False
            )
            text["token_text"] = [self.tokenizer.id_to_token(int(t)) or "" for t in token_ids]
        # Built from our own values: constructed, not validated (thousands of token ids).
        sample = FlaggedSample.model_construct(
            request_id=result.request_id,
            client_request_id=result.client_request_id,
            model=result.model,
            model_version=result.model_version,
            adapter=result.adapter,
            bundle=self.bundle_id,
            top_feature=top.name,
            top_score=top.score,
            finished_at=result.finished_at,
            # Found from the request's trace by its trace id; the traceparent names the caller's
            # span (the parent of the score span, when one is exported).
            trace_id=result.trace.trace_id_hex if result.trace is not None else "",
            traceparent=result.trace.header() if result.trace is not None else "",
            mitigation=result.mitigation,
            mitigated_tokens=result.mitigated_tokens,
            features=[FeatureResult.of(f) for f in feats],
            tokens=TokenScores.model_construct(
                token_ids=token_ids.tolist(),
                roles=roles.tolist(),
                scores={
                    n: np.round(ts[:, i], 4).tolist()
                    for i, n in enumerate(self.bundle.feature_names)
                },
            ),
            **text,
        )
        if self.redactor:
            # over the whole text, then clipped: a secret across the cut is redacted all the same
            sample = self.redactor.sample(sample)
        clipped = {}
        for key in ("prompt_text", "response_text"):
            value = getattr(sample, key)
            if value is not None and len(value) > self.sample_text_chars:
                clipped[key] = clip(value, self.sample_text_chars)
                self.metrics.samples_clipped.labels(key).inc()
        return sample.model_copy(update=clipped) if clipped else sample


def clip(text: str, limit: int) -> str:
    """What is kept of a text longer than ``limit`` characters: its first ``limit // 2`` and its
    last ``limit - limit // 2`` characters, with a line between them saying how many were cut."""
    head, tail = limit // 2, limit - limit // 2
    return f"{text[:head]}\n[... {len(text) - limit} characters cut ...]\n{text[-tail:]}"


def _check_sender_drops(msg: pb.StepBatch) -> None:
    for kind, counts in (("rows", msg.drops.rows_by_reason), ("steps", msg.drops.steps_by_reason)):
        for reason, total in counts.items():
            if total > MAX_REPORTED_DROPS:
                raise BadInput(
                    "drop_count",
                    f"drops.{kind}_by_reason[{reason[:64]!r}] is {total}, above the bound of "
                    f"{MAX_REPORTED_DROPS:.0e} a sender can have dropped",
                )


def _mitigation(msg: pb.StepBatch, rows: Rows) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(request id, mitigation label, positions, changed or not) for the mitigated requests of a
    step."""
    if not msg.mitigation and not msg.mitigated:
        return []
    if len(msg.mitigation) != len(rows.request_ids):
        raise BadInput(
            "mitigation",
            f"mitigation has {len(msg.mitigation)} labels, expected one per request "
            f"({len(rows.request_ids)})",
        )
    if len(msg.mitigated) != len(rows.meta):
        raise BadInput(
            "mitigation",
            f"mitigated has {len(msg.mitigated)} bytes, expected one per row ({len(rows.meta)})",
        )
    changed = np.frombuffer(msg.mitigated, np.int8) != 0
    off = rows.offsets.tolist()
    return [
        (rid, label, rows.meta[off[i] : off[i + 1], 0], changed[off[i] : off[i + 1]])
        for i, (rid, label) in enumerate(zip(rows.request_ids, msg.mitigation, strict=True))
        if label
    ]


__all__ = ["BadInput", "Monitor"]
