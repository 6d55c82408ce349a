"""Real Redis servers and real sidecars for tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from detectors import bundle as bundle_io
from service.server import Sidecar, start
from service.settings import Settings
from tests.support import ROOT
from tests.support.redis_proc import RedisProc
from wire import monitor_pb2 as pb
from wire import monitor_pb2_grpc as pb_grpc
from wire.codec import encode_step


@pytest.fixture
def redis_server(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A Redis server of the test's own that keeps nothing on disk (a restart comes back empty),
    stopped after the test."""
    server = RedisProc(tmp_path / "redis", persist=False).start()
    yield server
    server.stop()


def request_rows(rid: str, proj: np.ndarray, n_prompt: int, seed: int = 0):  # type: ignore[no-untyped-def]
    """Rows of one request: positions, token ids, roles (prompt then response), projections."""
    n = len(proj)
    rng = np.random.default_rng(seed)
    roles = (np.arange(n) >= n_prompt).astype(np.int8)
    return rid, np.arange(n), rng.integers(10, 1000, n), roles, proj.astype(np.float32)


def stream_requests(bundle_id: str, k: int, requests, chunk: int = 4):  # type: ignore[no-untyped-def]
    """Steps as an engine would make them: a prefill chunk, then one decode row per step, with
    several requests interleaved in each step, each finishing in the step after its last row."""
    cursors = {r[0]: 0 for r in requests}
    by_id = {r[0]: r for r in requests}
    step = 0
    pending_finish: list[str] = []
    while cursors or pending_finish:
        rows = []
        for rid in list(cursors):
            _, pos, tok, roles, proj = by_id[rid]
            c = cursors[rid]
            m = chunk if c < int((roles == 0).sum()) else 1
            e = min(c + m, len(pos))
            rows.append((rid, pos[c:e], tok[c:e], roles[c:e], proj[c:e]))
            if e >= len(pos):
                del cursors[rid]
            else:
                cursors[rid] = e
        finished = [
            pb.FinishedRequest(
                request_id=rid,
                client_request_id=f"client-{rid}",
                model="m",
                model_version="v1",
                finish_reason="stop",
            )
            for rid in pending_finish
        ]
        pending_finish = [r[0] for r in rows if r[0] not in cursors]
        yield encode_step(bundle_id, k, rows, step=step, sender_id="test", finished=finished)
        step += 1


def config_check(
    tmp_path: Path, yaml_text: str, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(yaml_text)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MISALIGN_")}
    return subprocess.run(
        [sys.executable, "-m", "misalign_monitor.cli", "config", "check", str(cfg)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**clean, **env},
        timeout=60,
    )


# A sidecar in this process, over real gRPC on a socket, and what tests read from it.
BUNDLE = bundle_io.load(bundle_io.default_bundle_path())
K = BUNDLE.k


async def make_sidecar(tmp_path: Path, redis_url: str, **over: object) -> Sidecar:
    s = Settings(
        grpc_port=0,
        metrics_port=0,
        redis_url=redis_url,
        state_dir=tmp_path / "state",
        unix_socket=tmp_path / "monitor.sock",
        **over,
    )  # type: ignore[arg-type]
    return await start(s)


def stub(sc: Sidecar) -> tuple[grpc.aio.Channel, pb_grpc.MonitorStub]:
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{sc.tcp_port}")
    return ch, pb_grpc.MonitorStub(ch)


def synthetic_requests(n: int, seed: int = 0, flag_every: int = 0):  # type: ignore[no-untyped-def]
    """Requests with random projections; every ``flag_every``-th one is pushed over threshold."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(12, 40))
        proj = rng.normal(scale=0.3, size=(length, K)) - BUNDLE.bias
        if flag_every and i % flag_every == 0:
            proj[:, 0] += 10.0
        out.append(request_rows(f"req-{seed}-{i}", proj, n_prompt=int(rng.integers(4, 10)), seed=i))
    return out


async def send(stub_: pb_grpc.MonitorStub, batches) -> pb.IngestSummary:  # type: ignore[no-untyped-def]
    async def gen():  # type: ignore[no-untyped-def]
        for b in batches:
            yield b

    return await stub_.Ingest(gen())


async def tls_sidecar(
    tmp_path: Path, redis_url: str, pki: dict[str, Path], **over: object
) -> Sidecar:
    """``make_sidecar`` serving TLS with ``pki``'s server certificate (tests.support.pki.make_pki)."""
    return await make_sidecar(
        tmp_path, redis_url, tls_cert=pki["server.pem"], tls_key=pki["server.key"], **over
    )
