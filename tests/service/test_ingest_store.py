"""The sidecar's paged row store and batch scoring: rows in, the same rows and scores out.

The store scatters each step's rows into pages with whole-step numpy operations, and requests
that finish in the same step are scored in one vectorised pass; these tests hold both to the
plain per-request reference (the rows as sent, ``rolling_max_means`` and span means).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detectors import bundle as bundle_io
from detectors.bundle import Aggregation, FeatureSpec
from detectors.scoring import (
    Scorer,
    rolling_max_means,
    score_request,
    score_requests,
    token_scores,
)
from service.ingest import RequestStore
from tests.support.metrics import metrics_at, sample
from tests.support.redis_proc import RedisProc
from tests.support.sidecar import BUNDLE, make_sidecar, send, stub
from tests.support.tiny_models import make_bundle
from wire import monitor_pb2 as pb
from wire.codec import Rows, decode_batch, encode_step

K = 4


def step_rows(segments: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]) -> Rows:
    """A decoded step from ``(request_id, positions, roles, projections)`` segments."""
    rows = [(rid, pos, pos + 1000, roles, proj) for rid, pos, roles, proj in segments]
    msg = encode_step("", K, rows)
    return decode_batch("", K, msg)


def test_interleaved_requests_over_many_steps_come_back_whole_and_in_order() -> None:
    """Requests of different lengths join and leave at different steps, with prefill chunks
    that cross page boundaries; each one's rows come back exactly as sent."""
    rng = np.random.default_rng(0)
    store = RequestStore(K, max_requests=100, max_tokens=10_000, timeout_s=60, page_rows=4)
    sent: dict[str, list[np.ndarray]] = {}
    sent_roles: dict[str, list[np.ndarray]] = {}
    cursor: dict[str, int] = {}
    length = {f"r{i}": int(rng.integers(1, 60)) for i in range(40)}
    waiting = list(length)
    checked = 0
    for step in range(400):
        while waiting and len(cursor) < 12:
            cursor[waiting.pop()] = 0
        segments = []
        for rid in list(cursor):
            if rng.random() < 0.2:
                continue  # not scheduled this step
            c = cursor[rid]
            m = min(int(rng.integers(1, 9)) if c == 0 else 1, length[rid] - c)
            proj = rng.normal(size=(m, K)).astype(np.float32)
            roles = np.full(m, int(c > 0), np.int8)  # a prefill chunk, then decode rows
            sent.setdefault(rid, []).append(proj)
            sent_roles.setdefault(rid, []).append(roles)
            segments.append((rid, np.arange(c, c + m), roles, proj))
            cursor[rid] = c + m
        rng.shuffle(segments)  # type: ignore[arg-type]
        assert store.add(step_rows(segments), float(step)) == {}
        done = [rid for rid, c in cursor.items() if c == length[rid]]
        slots, reasons = store.finish(done)
        got = store.gather(slots)
        assert reasons == [None] * len(done) and got.request_ids == done
        for i, rid in enumerate(done):
            s, e = got.offsets[i], got.offsets[i + 1]
            np.testing.assert_array_equal(got.projections[s:e], np.concatenate(sent[rid]))
            np.testing.assert_array_equal(got.token_ids[s:e], np.arange(length[rid]) + 1000)
            np.testing.assert_array_equal(got.roles[s:e], np.concatenate(sent_roles[rid]))
            del cursor[rid]
            checked += 1
    assert checked == 40 and len(store) == 0


def test_a_position_sent_twice_keeps_its_last_write_across_pages() -> None:
    store = RequestStore(K, max_requests=10, max_tokens=1000, timeout_s=60, page_rows=4)
    first = np.ones((10, K), np.float32)
    store.add(step_rows([("a", np.arange(10), np.zeros(10, np.int8), first)]), 0.0)
    store.add(step_rows([("b", np.arange(3), np.zeros(3, np.int8), first[:3])]), 0.0)
    # preempted after position 9 and recomputed from position 6, then carries on
    again = np.full((6, K), 2.0, np.float32)
    store.add(step_rows([("a", np.arange(6, 12), np.ones(6, np.int8), again)]), 1.0)
    got = store.gather(store.finish(["b", "a"])[0])
    assert got.request_ids == ["b", "a"] and list(got.offsets) == [0, 3, 15]
    a = got.projections[3:]
    np.testing.assert_array_equal(a[:6], 1.0)
    np.testing.assert_array_equal(a[6:], 2.0)
    np.testing.assert_array_equal(got.token_ids[3:], np.arange(12) + 1000)


def test_unknown_duplicate_and_late_rows_and_bounds() -> None:
    store = RequestStore(K, max_requests=2, max_tokens=5, timeout_s=60, page_rows=4)
    one = np.zeros((1, K), np.float32)
    rows = [(r, np.arange(1), np.zeros(1, np.int8), one) for r in ("a", "b", "c")]
    assert store.add(step_rows(rows), 0.0) == {"capacity": 1}
    six = np.zeros((6, K), np.float32)
    assert store.add(step_rows([("a", np.arange(1, 7), np.ones(6, np.int8), six)]), 0.0) == {
        "too_long": 6
    }
    slots, reasons = store.finish(["a", "zz", "a"])
    got = store.gather(slots)
    assert reasons == [None, "unknown", "duplicate"] and got.request_ids == ["a"]
    assert store.add(step_rows([("a", np.arange(1, 2), np.ones(1, np.int8), one)]), 0.0) == {
        "after_finish": 1
    }
    assert len(store) == 1


def test_rows_held_at_once_are_capped_and_freed_rows_make_room() -> None:
    store = RequestStore(K, max_requests=10, max_tokens=100, timeout_s=60, page_rows=4, max_rows=5)
    three = np.zeros((3, K), np.float32)
    step = [(r, np.arange(3), np.ones(3, np.int8), three) for r in ("a", "b")]
    assert store.add(step_rows(step), 0.0) == {"capacity": 3}  # b would pass the 5-row bound
    slots, _ = store.finish(["a"])
    assert len(store.gather(slots).roles) == 3
    assert store.add(step_rows(step[1:]), 0.0) == {}  # a's rows are gone: b fits now


def test_expiry_frees_pages_so_the_pool_stays_flat() -> None:
    store = RequestStore(K, max_requests=1000, max_tokens=1000, timeout_s=1.0, page_rows=8)
    proj = np.zeros((20, K), np.float32)
    sizes = []
    for cycle in range(20):
        t = cycle * 10.0
        rows = [(f"c{cycle}-{i}", np.arange(20), np.zeros(20, np.int8), proj) for i in range(30)]
        store.add(step_rows(rows), t)
        assert store.expire(t + 0.5) == 0
        assert store.expire(t + 1.0) == 30 and len(store) == 0
        sizes.append(store.pool_rows)
    assert sizes[-1] == sizes[0]  # reused, not grown


def _reference(bundle: bundle_io.Bundle, ts: np.ndarray, roles: np.ndarray) -> dict[str, list]:
    """Per-request aggregates written out plainly, one feature at a time."""

    def agg(x: np.ndarray, reduce: str, window: int) -> np.ndarray:
        if reduce == "mean":
            return x.mean(axis=0, dtype=np.float64) if len(x) else np.full(x.shape[1], np.nan)
        return rolling_max_means(x, window)

    spans = {"prompt": ts[roles == 0], "response": ts[roles == 1], "all": ts}
    out: dict[str, list] = {"score": [], "rolling": []}
    for i, f in enumerate(bundle.spec.features):
        a = f.aggregation
        out["score"].append(agg(spans[a.span], a.reduce, a.window)[i])
        out["rolling"].append(agg(spans["response"], "max", a.window)[i])
    return out


def test_requests_scored_together_equal_each_scored_alone() -> None:
    """Mixed spans, reduces and windows; empty spans; requests shorter and longer than their
    windows, side by side in one batch."""
    b = make_bundle(k=K)
    aggs = [
        Aggregation(span="prompt", reduce="mean"),
        Aggregation(span="response", reduce="max_rolling_mean", window=3),
        Aggregation(span="all", reduce="max_rolling_mean", window=5),
        Aggregation(span="response", reduce="mean", window=2),
    ]
    feats = [
        f.model_copy(update={"aggregation": a}) for f, a in zip(b.spec.features, aggs, strict=True)
    ]
    feats[3] = feats[3].model_copy(update={"calibration": None})
    b = b.with_spec(b.spec.model_copy(update={"features": tuple(feats)}))
    rng = np.random.default_rng(1)
    for trial in range(60):
        lengths = rng.integers(0, 14, int(rng.integers(1, 9)))
        ts = [rng.normal(scale=3, size=(n, K)).astype(np.float32) for n in lengths]
        roles = [
            rng.integers(0, 2, n) if trial % 2 else (np.arange(n) >= rng.integers(0, n + 1))
            for n in lengths
        ]
        offsets = np.r_[0, np.cumsum(lengths)]
        batch = score_requests(b, np.concatenate(ts), np.concatenate(roles), offsets)
        assert len(batch) == len(lengths)
        for i in range(len(lengths)):
            alone = score_request(b, ts[i], roles[i])
            ref = _reference(b, ts[i], roles[i])
            for j, (f, g) in enumerate(zip(batch.features(i), alone, strict=True)):
                assert (f.name, f.flagged) == (g.name, g.flagged)
                for field in ("score", "prompt_mean", "response_mean", "response_max_rolling"):
                    x, y = getattr(f, field), getattr(g, field)
                    assert x == pytest.approx(y, rel=1e-9, nan_ok=True), field
                assert f.threshold == g.threshold
                assert (f.z is None and g.z is None) or f.z == pytest.approx(g.z, rel=1e-9)
                np.testing.assert_allclose(f.score, ref["score"][j], rtol=1e-9, equal_nan=True)
                np.testing.assert_allclose(
                    f.response_max_rolling, ref["rolling"][j], rtol=1e-9, equal_nan=True
                )
                thr = b.spec.features[j].calibration
                assert f.flagged == bool(thr and f.score == f.score and f.score > thr.threshold)
                assert (f.threshold is None) == (thr is None)
                assert (f.z is None) == (thr is None or f.score != f.score)


def test_scorer_token_scores_match_the_module_function_with_jumprelu() -> None:
    b = make_bundle(k=1)
    b = b.with_feature(
        FeatureSpec(name="sae", method="sae", kind="jumprelu", source="s"),
        np.ones(8),
        bias=0.0,
        jump=1.0,
    )
    proj = np.array([[0.5, 0.5], [2.0, 2.0], [-3.0, 1.5]], np.float32)
    np.testing.assert_array_equal(Scorer(b).token_scores(proj), token_scores(b, proj))
    np.testing.assert_allclose(Scorer(b).token_scores(proj)[:, 1], [0.0, 2.0, 1.5])


async def test_several_requests_finishing_in_one_step_over_grpc(
    tmp_path: Path, redis_server: RedisProc
) -> None:
    """Ten requests of different lengths, interleaved, all finishing in the same step: each
    score equals the offline score of its rows, and each is counted once."""
    k = BUNDLE.k
    rng = np.random.default_rng(7)
    reqs = {}
    for i in range(10):
        n = int(rng.integers(3, 70))
        proj = (rng.normal(scale=0.3, size=(n, k)) - BUNDLE.bias).astype(np.float32)
        if i % 3 == 0:
            proj[:, 0] += 10.0
        reqs[f"batch-{i}"] = (proj, (np.arange(n) >= min(n - 1, 5)).astype(np.int8))
    steps = []
    longest = max(len(p) for p, _ in reqs.values())
    for t in range(longest):  # request i's rows end-aligned, so all finish after the last step
        rows = []
        for rid, (proj, roles) in reqs.items():
            c = t - (longest - len(proj))
            if c >= 0:
                tok = rng.integers(0, 900, 1)
                rows.append((rid, np.arange(c, c + 1), tok, roles[c : c + 1], proj[c : c + 1]))
        steps.append(encode_step(BUNDLE.bundle_id, k, rows, step=t))
    fin = [pb.FinishedRequest(request_id=r, model="m", model_version="v1") for r in reqs]
    steps.append(encode_step(BUNDLE.bundle_id, k, [], step=longest, finished=fin))
    sc = await make_sidecar(tmp_path, redis_server.url)
    try:
        ch, s = stub(sc)
        summary = await send(s, steps)
        assert summary.finished == 10
        for rid, (proj, roles) in reqs.items():
            got = await s.GetRequestScore(pb.GetRequestScoreRequest(request_id=rid))
            want = score_request(BUNDLE, token_scores(BUNDLE, proj), roles)
            assert got.tokens == len(proj)
            for g, w in zip(got.features, want, strict=True):
                assert g.score == pytest.approx(w.score, rel=1e-6, abs=1e-9)
                assert g.response_max_rolling == pytest.approx(w.response_max_rolling, rel=1e-6)
                assert g.flagged == w.flagged
        text = metrics_at(sc.metrics_port)
        lab = {"model_name": "m", "model_version": "v1", "bundle": BUNDLE.bundle_id}
        assert sample(text, "misalign_requests_scored_total", **lab) == 10
        assert sample(text, "misalign_request_score_count", feature="toxic", **lab) == 10
        n_flag = sum(
            w.flagged
            for proj, roles in reqs.values()
            for w in score_request(BUNDLE, token_scores(BUNDLE, proj), roles)
            if w.name == "misaligned_persona"
        )
        assert n_flag >= 4
        assert (
            sample(text, "misalign_requests_flagged_total", feature="misaligned_persona", **lab)
            == n_flag
        )
        await ch.close()
    finally:
        await sc.stop()


def test_finished_requests_wait_for_a_batch_and_a_lookup_scores_them_at_once() -> None:
    """Finishes are scored together once ``score_batch`` wait; a lookup of one still waiting
    scores the batch there and then; rows for a request closed but not yet scored are refused."""
    from service.metrics import Metrics
    from service.monitor import Monitor

    k = BUNDLE.k
    mon = Monitor(BUNDLE, Metrics(BUNDLE), None, score_batch=3)
    rng = np.random.default_rng(3)
    reqs = {f"w{i}": rng.normal(size=(6, k)).astype(np.float32) for i in range(5)}
    rows = [(r, np.arange(6), np.arange(6), np.r_[0, 0, 1, 1, 1, 1], p) for r, p in reqs.items()]
    mon.ingest(encode_step(BUNDLE.bundle_id, k, rows))

    def finish(*rids: str) -> None:
        fin = [pb.FinishedRequest(request_id=r, client_request_id=f"c-{r}") for r in rids]
        mon.ingest(encode_step(BUNDLE.bundle_id, k, [], finished=fin))

    finish("w0", "w1")
    assert mon.pending == 2 and not mon.recent
    late = [("w0", np.arange(6, 7), np.arange(1), np.ones(1, np.int8), reqs["w0"][:1])]
    mon.ingest(encode_step(BUNDLE.bundle_id, k, late))  # refused: w0 is closed
    finish("w2")
    assert mon.pending == 0 and set(mon.recent) == {"w0", "w1", "w2"}  # the batch filled
    assert mon.recent["w0"].tokens == 6
    finish("w3")
    assert mon.pending == 1
    got = mon.lookup("c-w3")  # by client id, while waiting
    assert got is not None and got.request_id == "w3" and mon.pending == 0
    for rid in ("w0", "w3"):
        hit = mon.lookup(rid)
        assert hit is not None
        want = score_request(BUNDLE, token_scores(BUNDLE, reqs[rid]), np.r_[0, 0, 1, 1, 1, 1])
        assert [f.score for f in hit.features] == pytest.approx([w.score for w in want])
    assert mon.metrics.rows_dropped.labels("sidecar", "after_finish")._value.get() == 1
    finish("w4")
    assert [r.request_id for r in mon.flush()] == ["w4"] and mon.flush() == []


@pytest.mark.parametrize("delay_ms", [5.0, 300.0])
async def test_an_open_stream_gets_its_finishes_scored_without_being_asked(
    tmp_path: Path, redis_server: RedisProc, delay_ms: float
) -> None:
    """The stream stays open after a step finishes a request: the server scores it
    ``score_delay_ms`` later by itself (metrics move with no lookup and no end of stream)."""
    import asyncio

    sc = await make_sidecar(tmp_path, redis_server.url, score_delay_ms=delay_ms)
    try:
        ch, s = stub(sc)
        k = BUNDLE.k
        proj = np.zeros((5, k), np.float32)
        rows = [("open-1", np.arange(5), np.arange(5), np.r_[0, 1, 1, 1, 1].astype(np.int8), proj)]
        fin = [pb.FinishedRequest(request_id="open-1", model="m", model_version="v1")]
        done = asyncio.Event()

        async def steps():  # type: ignore[no-untyped-def]
            yield encode_step(BUNDLE.bundle_id, k, rows)
            yield encode_step(BUNDLE.bundle_id, k, [], finished=fin)
            await done.wait()

        call = s.Ingest(steps())
        lab = {"model_name": "m", "model_version": "v1", "bundle": BUNDLE.bundle_id}
        loop = asyncio.get_running_loop()
        end = loop.time() + 10
        while (
            sample(metrics_at(sc.metrics_port), "misalign_requests_scored_total", True, **lab) < 1
        ):
            assert loop.time() < end, "not scored while the stream stayed open"
            await asyncio.sleep(0.02)
        assert sc.monitor.pending == 0
        # finish arrival to score: never before the delay (the timer), and not long after it
        waited = sample(metrics_at(sc.metrics_port), "misalign_scoring_latency_seconds_sum")
        assert delay_ms / 1e3 <= waited < delay_ms / 1e3 + 2.0
        done.set()
        assert (await call).finished == 1
        await ch.close()
    finally:
        await sc.stop()
