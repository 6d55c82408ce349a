"""Real Redis servers and real sidecars for tests."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np

from service.embedded_redis import EmbeddedRedis
from tests.conftest import ROOT
from wire import monitor_pb2 as pb
from wire.codec import encode_step


class RedisServer(EmbeddedRedis):
    """A real redis-server on a Unix socket of the test's own (the sidecar's embedded one), that
    the test can stop and restart; it keeps nothing on disk, so a restart comes back empty."""

    def start(self) -> RedisServer:  # type: ignore[override]
        super().start()
        return self

    def stop(self) -> None:
        super().stop()
        self.socket.unlink(missing_ok=True)

    def client(self):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis(unix_socket_path=str(self.socket), decode_responses=True)


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
        [sys.executable, "-m", "service.cli", "config", "check", str(cfg)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**clean, **env},
        timeout=60,
    )


def metric(port: int, name: str, **labels: str) -> float:
    """A sidecar's /metrics sample ``name`` on ``port``, summed over the series with ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )
