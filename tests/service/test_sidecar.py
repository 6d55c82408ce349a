"""The sidecar over real gRPC on a socket, with a real Redis: scores, metrics, stream, outages."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from detectors import bundle as bundle_io
from detectors.bundle import Aggregation
from detectors.scoring import score_request, token_scores
from service.server import Sidecar
from tests.support.metrics import metrics_at, sample
from tests.support.polling import until
from tests.support.redis_proc import RedisProc
from tests.support.sidecar import (
    BUNDLE,
    K,
    make_sidecar,
    request_rows,
    send,
    stream_requests,
    stub,
    synthetic_requests,
)
from wire import monitor_pb2 as pb
from wire import monitor_pb2_grpc as pb_grpc
from wire.codec import encode_step


@pytest.fixture
async def sidecar(tmp_path: Path, redis_server: RedisProc) -> AsyncIterator[Sidecar]:
    sc = await make_sidecar(tmp_path, redis_server.url)
    yield sc
    await sc.stop()


async def test_streamed_scores_equal_offline_scoring(sidecar: Sidecar) -> None:
    reqs = synthetic_requests(12, flag_every=4)
    ch, s = stub(sidecar)
    summary = await send(s, stream_requests(BUNDLE.bundle_id, K, reqs))
    assert summary.finished == 12 and summary.rows == sum(len(r[1]) for r in reqs)
    for rid, _pos, _tok, roles, proj in reqs:
        got = await s.GetRequestScore(pb.GetRequestScoreRequest(request_id=rid))
        want = score_request(BUNDLE, token_scores(BUNDLE, proj), roles)
        assert got.tokens == len(roles) and got.bundle_id == BUNDLE.bundle_id
        for g, w in zip(got.features, want, strict=True):
            assert g.name == w.name
            assert g.score == pytest.approx(w.score, rel=1e-5, abs=1e-6)
            assert g.flagged == w.flagged
        by_client = await s.GetRequestScore(pb.GetRequestScoreRequest(request_id=f"client-{rid}"))
        assert by_client.request_id == rid
    assert (
        sum(
            r.flagged
            for r in [
                await s.GetRequestScore(pb.GetRequestScoreRequest(request_id=q[0])) for q in reqs
            ]
        )
        >= 3
    )
    await ch.close()


async def test_softmax_pooled_bundle_scores_equal_offline_scoring(
    tmp_path: Path, redis_server: RedisProc
) -> None:
    """A bundle pooling by softmax (one feature) and rolling max (the others): the sidecar's
    streamed request scores are what offline scoring computes from the same rows."""
    f0 = BUNDLE.spec.features[0].model_copy(
        update={"aggregation": Aggregation(reduce="softmax", temperature=0.7)}
    )
    spec = BUNDLE.spec.model_copy(update={"features": (f0, *BUNDLE.spec.features[1:])})
    path = bundle_io.save(BUNDLE.with_spec(spec), tmp_path / "softmax.safetensors")
    bundle = bundle_io.load(path)
    sc = await make_sidecar(tmp_path, redis_server.url, bundle=path)
    try:
        reqs = synthetic_requests(6, seed=3, flag_every=2)
        ch, s = stub(sc)
        await send(s, stream_requests(bundle.bundle_id, K, reqs))
        for rid, _pos, _tok, roles, proj in reqs:
            got = await s.GetRequestScore(pb.GetRequestScoreRequest(request_id=rid))
            want = score_request(bundle, token_scores(bundle, proj), roles)
            resp = token_scores(bundle, proj)[roles == 1, 0].astype(np.float64)
            w = np.exp((resp - resp.max()) / 0.7)
            assert want[0].score == pytest.approx(float((w * resp).sum() / w.sum()), rel=1e-9)
            for g, f in zip(got.features, want, strict=True):
                assert g.score == pytest.approx(f.score, rel=1e-5, abs=1e-6)
                assert g.flagged == f.flagged
        await ch.close()
    finally:
        await sc.stop()


async def test_unary_score_and_describe_bundle(sidecar: Sidecar) -> None:
    ch, s = stub(sidecar)
    _, _, tok, roles, proj = synthetic_requests(1, seed=3)[0]
    got = await s.Score(
        pb.ScoreRequest(
            bundle_id=BUNDLE.bundle_id,
            k=K,
            projections=proj.tobytes(),
            is_response=roles.tobytes(),
            token_ids=tok.astype("<u4").tobytes(),
        )
    )
    want = score_request(BUNDLE, token_scores(BUNDLE, proj), roles)
    assert [f.score for f in got.features] == pytest.approx([w.score for w in want], rel=1e-5)
    info = await s.DescribeBundle(pb.DescribeBundleRequest())
    assert info.bundle_id == BUNDLE.bundle_id and info.layer == BUNDLE.spec.layer
    assert [f.name for f in info.features] == BUNDLE.feature_names
    assert all(f.has_threshold for f in info.features)
    await ch.close()


async def test_metrics_and_flagged_samples_in_the_stream(
    sidecar: Sidecar, redis_server: RedisProc, tmp_path: Path
) -> None:
    reqs = synthetic_requests(8, seed=1, flag_every=2)
    ch, s = stub(sidecar)
    await send(s, stream_requests(BUNDLE.bundle_id, K, reqs))
    r = redis_server.client()
    await until(lambda: r.xlen("misalign:{flagged}") >= 4, 10, "r.xlen('misalign:{flagged}') >= 4")
    entries = r.xrange("misalign:{flagged}")
    flagged_ids = {e[1]["request_id"] for e in entries}
    assert {f"req-1-{i}" for i in (0, 2, 4, 6)} <= flagged_ids
    fields = entries[0][1]
    assert (
        fields["bundle"] == BUNDLE.bundle_id
        and fields["model"] == "m"
        and fields["model_version"] == "v1"
    )
    feats = json.loads(fields["features"])
    assert {f["name"] for f in feats} == set(BUNDLE.feature_names)
    assert all("threshold" in f and "score" in f for f in feats)
    tokens = json.loads(fields["tokens"])
    assert len(tokens["token_ids"]) == len(tokens["scores"]["misaligned_persona"])
    assert r.xinfo_groups("misalign:{flagged}")[0]["name"] == "reviewers"

    # A request replayed to this sidecar is refused as already finished; replayed to a restarted
    # sidecar (same Redis) it is scored again but not queued twice.
    await send(s, stream_requests(BUNDLE.bundle_id, K, reqs[:1]))
    assert (
        sample(
            metrics_at(sidecar.metrics_port), "misalign_finishes_ignored_total", reason="duplicate"
        )
        == 1
    )
    other = await make_sidecar(tmp_path / "second", redis_server.url)
    try:
        ch2, s2 = stub(other)
        await send(s2, stream_requests(BUNDLE.bundle_id, K, reqs[:1]))
        await until(
            lambda: (
                sample(metrics_at(other.metrics_port), "misalign_queue_duplicates_total", True) == 1
            ),
            10,
            "sample(metrics_at(other.metrics_port), 'misalign_queue_duplicates_total', True) == 1",
        )
        await ch2.close()
    finally:
        await other.stop()
    assert r.xlen("misalign:{flagged}") == len(entries)

    text = metrics_at(sidecar.metrics_port)
    lab = {"model_name": "m", "model_version": "v1", "bundle": BUNDLE.bundle_id}
    assert sample(text, "misalign_requests_scored_total", **lab) == 8
    assert sample(text, "misalign_requests_flagged_total", feature="misaligned_persona", **lab) >= 4
    assert sample(text, "misalign_tokens_ingested_total") == sum(len(q[1]) for q in reqs) + len(
        reqs[0][1]
    )
    assert sample(text, "misalign_queue_pushes_total") == len(entries)
    thr = BUNDLE.feature("misaligned_persona").calibration.threshold  # type: ignore[union-attr]
    assert f'le="{round(thr, 6)}"' in text or f'le="{thr}"' in text
    assert "req-1-" not in text and "client-" not in text  # no request ids in labels
    assert sample(text, "misalign_request_score_count", feature="toxic", **lab) == 8
    assert sample(
        text, "misalign_rows_dropped_total", side="sidecar", reason="after_finish"
    ) == len(reqs[0][1])
    await ch.close()


async def test_redis_outage_buffers_then_delivers_with_exact_drop_count(tmp_path: Path) -> None:
    redis_server = RedisProc(tmp_path / "r", persist=False).start()
    sc = await make_sidecar(tmp_path, redis_server.url, buffer_size=5)
    try:
        ch, s = stub(sc)
        await send(
            s, stream_requests(BUNDLE.bundle_id, K, synthetic_requests(2, seed=5, flag_every=1))
        )
        await until(
            lambda: redis_server.client().xlen("misalign:{flagged}") == 2,
            10,
            "redis_server.client().xlen('misalign:{flagged}') == 2",
        )
        redis_server.stop()
        batches = list(
            stream_requests(BUNDLE.bundle_id, K, synthetic_requests(8, seed=6, flag_every=1))
        )
        finish_order = [f.request_id for b in batches for f in b.finished]
        await send(s, batches)
        text = metrics_at(sc.metrics_port)
        assert sample(text, "misalign_queue_dropped_total") == 3  # 8 flagged, room for 5
        assert sample(text, "misalign_queue_buffered") == 5
        redis_server.start()  # empty: it keeps nothing on disk
        await until(
            lambda: sample(metrics_at(sc.metrics_port), "misalign_queue_buffered") == 0,
            20,
            "sample(metrics_at(sc.metrics_port), 'misalign_queue_buffered') == 0",
        )
        r = redis_server.client()
        ids = [e[1]["request_id"] for e in r.xrange("misalign:{flagged}")]
        assert ids == finish_order[3:]  # the newest five, once each, in order
        assert sample(metrics_at(sc.metrics_port), "misalign_queue_push_failures_total") >= 1
        assert r.xinfo_groups("misalign:{flagged}")[0]["name"] == "reviewers"
        await ch.close()
    finally:
        await sc.stop()
        redis_server.stop()


@pytest.mark.parametrize(
    ("mutate", "reason", "needle"),
    [
        (lambda m: setattr(m, "k", K + 1), "wrong_width", "k is 4"),
        (lambda m: setattr(m, "projections", m.projections[:-4]), "wrong_width", "projections has"),
        (lambda m: m.row_offsets.__setitem__(-1, 999), "row_count", "row_offsets"),
        (
            lambda m: setattr(m, "token_ids", m.token_ids + b"\0\0\0\0"),
            "row_count",
            "token_ids has",
        ),
        (
            lambda m: setattr(m, "positions", m.positions[:-2]),
            "row_count",
            "whole number of uint32",
        ),
        (
            lambda m: setattr(
                m, "projections", np.full(len(m.is_response) * K, np.nan, np.float32).tobytes()
            ),
            "non_finite",
            "NaN",
        ),
        (
            lambda m: setattr(
                m, "projections", np.full(len(m.is_response) * K, np.inf, np.float32).tobytes()
            ),
            "non_finite",
            "infinite",
        ),
        (lambda m: setattr(m, "bundle_id", "deadbeef0000"), "unknown_bundle", "deadbeef0000"),
        (
            lambda m: setattr(m, "is_response", b"\x07" * len(m.is_response)),
            "bad_role",
            "is_response",
        ),
        (lambda m: m.request_ids.append("extra"), "row_count", "row_offsets has"),
        (
            lambda m: m.mitigation.extend(["ablate:toxic@always"] * (len(m.request_ids) + 1)),
            "mitigation",
            "mitigation has",
        ),
        (
            lambda m: (
                m.mitigation.extend([""] * len(m.request_ids)),
                setattr(m, "mitigated", b"\x01"),
            ),
            "mitigation",
            "mitigated has 1 bytes",
        ),
    ],
    ids=[
        "k",
        "bytes",
        "offsets",
        "token-count",
        "ragged-positions",
        "nan",
        "inf",
        "bundle",
        "role",
        "ids",
        "mitigation-labels",
        "mitigated-rows",
    ],
)
async def test_bad_batches_get_invalid_argument_and_the_server_keeps_serving(
    sidecar: Sidecar,
    mutate,
    reason: str,
    needle: str,  # type: ignore[no-untyped-def]
) -> None:
    good = list(stream_requests(BUNDLE.bundle_id, K, synthetic_requests(2, seed=9)))
    bad = pb.StepBatch()
    bad.CopyFrom(good[0])
    mutate(bad)
    ch, s = stub(sidecar)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await send(s, [bad])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.details()
    assert (
        sample(metrics_at(sidecar.metrics_port), "misalign_ingest_errors_total", reason=reason) == 1
    )
    assert len(sidecar.monitor.store) == 0  # nothing of the bad batch was applied
    summary = await send(s, good)  # another stream on the same server
    assert summary.finished == 2
    await ch.close()


async def test_unknown_and_duplicate_finishes_are_counted_not_fatal(sidecar: Sidecar) -> None:
    ch, s = stub(sidecar)
    fin = [pb.FinishedRequest(request_id="never-seen", model="m", model_version="v1")]
    batches = list(stream_requests(BUNDLE.bundle_id, K, synthetic_requests(1, seed=2)))
    dup = encode_step(BUNDLE.bundle_id, K, [], finished=list(batches[-1].finished))
    summary = await send(s, [encode_step(BUNDLE.bundle_id, K, [], finished=fin), *batches, dup])
    assert summary.steps == len(batches) + 2
    text = metrics_at(sidecar.metrics_port)
    assert sample(text, "misalign_finishes_ignored_total", reason="unknown") == 1
    assert sample(text, "misalign_finishes_ignored_total", reason="duplicate") == 1
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.GetRequestScore(pb.GetRequestScoreRequest(request_id="never-seen"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "never-seen" in err.value.details()
    await ch.close()


async def test_oversized_message_and_bad_unary_input(
    tmp_path: Path, redis_server: RedisProc
) -> None:
    sc = await make_sidecar(tmp_path, redis_server.url, max_message_bytes=4096)
    try:
        ch, s = stub(sc)
        proj = np.zeros((2000, K), np.float32)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await send(s, [encode_step(BUNDLE.bundle_id, K, [request_rows("big", proj, 10)])])
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.Score(
                pb.ScoreRequest(
                    k=K + 2,
                    projections=b"\0" * 4 * (K + 2),
                    is_response=b"\1",
                    token_ids=b"\1\0\0\0",
                )
            )
        assert (
            err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "k is" in err.value.details()
        )
        info = await s.DescribeBundle(pb.DescribeBundleRequest())  # still up
        assert info.bundle_id == BUNDLE.bundle_id
        await ch.close()
    finally:
        await sc.stop()


async def test_unfinished_requests_expire_and_are_counted(
    tmp_path: Path, redis_server: RedisProc
) -> None:
    sc = await make_sidecar(tmp_path, redis_server.url, request_timeout_s=0.2)
    try:
        ch, s = stub(sc)
        rows = [request_rows(f"stuck-{i}", np.zeros((5, K)), 2) for i in range(3)]
        await send(s, [encode_step(BUNDLE.bundle_id, K, rows)])
        await until(
            lambda: (
                sample(metrics_at(sc.metrics_port), "misalign_requests_expired_total", True) == 3
            ),
            5,
            "sample(metrics_at(sc.metrics_port), 'misalign_requests_expired_total', True) == 3",
        )
        assert sample(metrics_at(sc.metrics_port), "misalign_active_requests") == 0
        await ch.close()
    finally:
        await sc.stop()


async def test_inference_side_drop_counters_become_increments(sidecar: Sidecar) -> None:
    ch, s = stub(sidecar)
    steps = [
        encode_step(BUNDLE.bundle_id, K, [], sender_id="tap-a", rows_dropped={"queue_full": 10}),
        encode_step(
            BUNDLE.bundle_id,
            K,
            [],
            sender_id="tap-a",
            rows_dropped={"queue_full": 25},
            steps_dropped={"queue_full": 2},
        ),
        encode_step(BUNDLE.bundle_id, K, [], sender_id="tap-b", rows_dropped={"queue_full": 4}),
    ]
    await send(s, steps)
    text = metrics_at(sidecar.metrics_port)
    assert sample(text, "misalign_rows_dropped_total", side="inference", reason="queue_full") == 29
    assert sample(text, "misalign_steps_dropped_total", side="inference", reason="queue_full") == 2
    await ch.close()


async def test_health_reflection_and_unix_socket(sidecar: Sidecar) -> None:
    sock = sidecar.settings.unix_socket
    assert sock is not None and (sock.stat().st_mode & 0o777) == 0o660
    async with grpc.aio.insecure_channel(f"unix:{sock}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        resp = await health.Check(health_pb2.HealthCheckRequest(service="misalign.v1.Monitor"))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        info = await pb_grpc.MonitorStub(ch).DescribeBundle(pb.DescribeBundleRequest())
        assert info.bundle_id == BUNDLE.bundle_id
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        refl = reflection_pb2_grpc.ServerReflectionStub(ch)

        async def ask():  # type: ignore[no-untyped-def]
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        async for r in refl.ServerReflectionInfo(ask()):
            names = {sv.name for sv in r.list_services_response.service}
            assert "misalign.v1.Monitor" in names and "grpc.health.v1.Health" in names


async def test_activations_and_mitigation_from_the_tap(
    sidecar: Sidecar, redis_server: RedisProc
) -> None:
    """The tap sends activations (bias added) and marks mitigated requests and rows: scores equal
    the raw projections' scores, and the mitigation shows in the score, metrics and sample. A
    request whose rules never fired (@flagged, below its threshold) keeps its label but is not
    counted as mitigated."""
    reqs = synthetic_requests(4, seed=5, flag_every=2)  # req-5-0 and req-5-2 are flagged
    batches = list(stream_requests(BUNDLE.bundle_id, K, reqs))
    never_fired = "steer:2:misaligned_persona@flagged"
    for b in batches:
        proj = np.frombuffer(b.projections, "<f4").reshape(-1, K)
        b.projections = (proj + BUNDLE.bias).astype("<f4").tobytes()
        b.activated = True
        # Requests 0 and 1 are mitigated on every row; request 3 has rules that change no row.
        b.mitigation.extend(
            [
                "ablate:misaligned_persona@always"
                if r.endswith(("-0", "-1"))
                else never_fired
                if r.endswith("-3")
                else ""
                for r in b.request_ids
            ]
        )
        changed = np.zeros(len(b.is_response), np.int8)
        for i, r in enumerate(b.request_ids):
            if r.endswith(("-0", "-1")):
                changed[b.row_offsets[i] : b.row_offsets[i + 1]] = 1
        b.mitigated = changed.tobytes()
    # Preempted and recomputed: the first step's rows come again, and are not counted twice.
    again = pb.StepBatch()
    again.CopyFrom(batches[0])
    again.step = len(batches)
    assert not again.finished
    batches.insert(2, again)
    ch, s = stub(sidecar)
    await send(s, batches)
    for rid, _pos, _tok, roles, proj in reqs:
        got = await s.GetRequestScore(pb.GetRequestScoreRequest(request_id=rid))
        want = score_request(BUNDLE, token_scores(BUNDLE, proj), roles)
        assert [g.score for g in got.features] == pytest.approx([w.score for w in want], rel=1e-5)
        mitigated = rid.endswith(("-0", "-1"))
        label = never_fired if rid.endswith("-3") else ""
        assert got.mitigation == ("ablate:misaligned_persona@always" if mitigated else label)
        assert got.mitigated_tokens == (len(roles) if mitigated else 0)
    text = metrics_at(sidecar.metrics_port)
    lab = {"model_name": "m", "model_version": "v1", "bundle": BUNDLE.bundle_id, "mode": "ablate"}
    assert sample(text, "misalign_requests_mitigated_total", flagged="yes", **lab) == 1
    assert sample(text, "misalign_requests_mitigated_total", flagged="no", **lab) == 1
    # Request 3's rules moved nothing: no series for its mode.
    assert sample(text, "misalign_requests_mitigated_total", missing_ok=True, mode="steer") == 0
    del lab["mode"]
    assert sample(text, "misalign_tokens_mitigated_total", **lab) == len(reqs[0][1]) + len(
        reqs[1][1]
    )
    r = redis_server.client()
    await until(lambda: r.xlen("misalign:{flagged}") >= 2, 10, "r.xlen('misalign:{flagged}') >= 2")
    marks = {e[1]["request_id"]: e[1]["mitigation"] for e in r.xrange("misalign:{flagged}")}
    assert marks == {"req-5-0": "ablate:misaligned_persona@always", "req-5-2": ""}
    await ch.close()


async def test_trimming_the_stream_dead_letters_every_sample_not_yet_decided(
    redis_server: RedisProc,
) -> None:
    """At its maximum length the stream drops its oldest entries; one the reviewers decided goes
    quietly, one they hold or never read goes to the dead letters with its fields first."""
    import redis.asyncio as aioredis

    from service.flags import FlagQueue
    from service.metrics import Metrics

    q = FlagQueue(
        aioredis.Redis(unix_socket_path=str(redis_server.socket)),
        Metrics(BUNDLE),
        stream="flags",
        group="reviewers",
        dead_letter_stream="flags:dead",
        maxlen=3,
        buffer_size=10,
        dedup_ttl_s=60,
    )
    await q.start()
    r = redis_server.client()
    try:
        for i in range(3):
            q.put({"n": str(i)}, f"r{i}")
        await until(lambda: r.xlen("flags") == 3, 10, "r.xlen('flags') == 3")
        read = r.xreadgroup("reviewers", "alice", {"flags": ">"}, count=2)[0][1]
        r.xack("flags", "reviewers", read[0][0])  # r0 decided; r1 held by alice, undecided
        for i in range(3, 6):
            q.put({"n": str(i)}, f"r{i}")
        await until(
            lambda: q.metrics.queue_pushes._value.get() == 6,
            10,
            "q.metrics.queue_pushes._value.get() == 6",
        )
        assert [e[1]["request_id"] for e in r.xrange("flags")] == ["r3", "r4", "r5"]
        dead = r.xrange("flags:dead")
        assert [e[1]["request_id"] for e in dead] == ["r1", "r2"]  # held, then never read
        assert all(e[1]["n"] and "trimmed" in e[1]["dead_reason"] for e in dead)
        assert r.xpending("flags", "reviewers")["pending"] == 0  # r1 acknowledged as dead
    finally:
        await q.close()


async def test_multi_layer_head_bundle_scores_equal_offline_scoring(
    tmp_path: Path, redis_server: RedisProc, planted_reader
) -> None:  # type: ignore[no-untyped-def]
    """A bundle reading layers 2 and 4 of the planted model, one feature scored by a head: the
    rows offline scoring projects (each column at its layer), streamed to the sidecar, get the
    request scores and flags offline scoring gives them."""
    from detectors.bundle import ModelRef
    from detectors.offline import score_records
    from detectors.transcripts import parse_lines
    from tests.support.planted import labeled_records
    from tests.support.tiny_models import multi_layer_bundle

    path = tmp_path / "multi.safetensors"
    ref = ModelRef(name="planted", hidden_size=16, num_layers=4)
    bundle = multi_layer_bundle(path, ref, (2, 4))
    records = parse_lines(json.dumps(r) for r in labeled_records(4))
    offline = list(score_records(bundle, planted_reader, records, progress=False))
    assert {len(s.features) for s in offline} == {4}
    sc = await make_sidecar(tmp_path, redis_server.url, bundle=path)
    try:
        reqs = [
            (f"r{s.index}", np.arange(len(s.roles)), s.token_ids, s.roles, s.projections)
            for s in offline
        ]
        ch, s = stub(sc)
        await send(s, stream_requests(bundle.bundle_id, bundle.k, reqs))
        heads = []
        for want in offline:
            got = await s.GetRequestScore(pb.GetRequestScoreRequest(request_id=f"r{want.index}"))
            assert got.bundle_id == bundle.bundle_id
            for g, w in zip(got.features, want.features, strict=True):
                assert g.name == w.name
                assert g.score == pytest.approx(w.score, rel=1e-5, abs=1e-6)
                assert g.flagged == w.flagged
            heads.append(want.features[3].score)
        # the head's score is not its own column's mean: the head ran in both
        assert not np.allclose(heads, [w.features[3].response_mean for w in offline])
        await ch.close()
    finally:
        await sc.stop()
