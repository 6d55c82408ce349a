"""`misalign-monitor serve` as its own process: embedded Redis, SIGTERM, config checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis

from detectors import bundle as bundle_io
from service.sidecar_process import start_sidecar
from tests.support.redis_proc import RedisProc
from tests.support.sidecar import request_rows, stream_requests
from wire import monitor_pb2 as pb
from wire import monitor_pb2_grpc as pb_grpc

BUNDLE = bundle_io.load(bundle_io.default_bundle_path())


def serve(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    sidecar = start_sidecar(tmp_path, *extra, log=subprocess.PIPE)
    return sidecar.proc, sidecar.grpc_port


def stopped(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """SIGTERM, then everything the sidecar logged."""
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=timeout)
    return out.decode()


def flagged_batches():  # type: ignore[no-untyped-def]
    proj = np.zeros((20, BUNDLE.k), np.float32) - BUNDLE.bias
    proj[:, 0] += 10.0
    return list(stream_requests(BUNDLE.bundle_id, BUNDLE.k, [request_rows("r-1", proj, 5)]))


def send(port: int, batches) -> pb.IngestSummary:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return pb_grpc.MonitorStub(ch).Ingest(iter(batches), timeout=30)


def test_embedded_redis_by_default_and_graceful_sigterm(tmp_path: Path) -> None:
    proc, port = serve(tmp_path)
    socket = tmp_path / "state" / "redis" / "redis.sock"
    assert socket.exists()
    assert send(port, flagged_batches()).finished == 1
    r = redis.Redis(unix_socket_path=str(socket), decode_responses=True)
    deadline = time.monotonic() + 10
    while r.xlen("misalign:{flagged}") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert r.xrange("misalign:{flagged}")[0][1]["request_id"] == "r-1"
    err = stopped(proc, 30)
    assert proc.returncode == 0, err
    assert "started embedded redis-server" in err
    assert "shutting down" in err and "stopped in" in err
    assert not socket.exists() or proc.returncode == 0
    with pytest.raises(redis.exceptions.ConnectionError):
        r.ping()  # the embedded server went with the sidecar


def test_sigterm_flushes_samples_buffered_while_redis_was_away(tmp_path: Path) -> None:
    server = RedisProc(tmp_path / "r", persist=False).start()
    proc, port = serve(tmp_path, "--redis-url", server.url)
    try:
        server.stop()
        assert send(port, flagged_batches()).finished == 1
        server.start()
        err = stopped(proc, 60)
        assert proc.returncode == 0, err
        assert [e[1]["request_id"] for e in server.client().xrange("misalign:{flagged}")] == ["r-1"]
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "misalign_monitor.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_config_check(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        "grpc_port: 7000\nredis_url: redis://:hunter2@127.0.0.1:6379/0\nbuffer_size: 50\n"
    )
    p = cli("config", "check", str(good))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["grpc_port"] == 7000 and out["buffer_size"] == 50
    assert "hunter2" not in p.stdout and out["redis_url"] == "**********"
    p = cli("config", "check", str(good), env={"MISALIGN_BUFFER_SIZE": "7"})
    assert json.loads(p.stdout)["buffer_size"] == 7  # environment wins over the file

    bad = tmp_path / "bad.toml"
    bad.write_text("grpc_port = 70000\nbuffer_sise = 3\n")
    p = cli("config", "check", str(bad))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "setting 'grpc_port'" in p.stderr and "65535" in p.stderr
    assert "setting 'buffer_sise'" in p.stderr
    (tmp_path / "broken.yaml").write_text("grpc_port: [1\n")
    p = cli("config", "check", str(tmp_path / "broken.yaml"))
    assert p.returncode == 2 and "not valid YAML" in p.stderr
    tls = tmp_path / "tls.yaml"
    tls.write_text(f"tls_cert: {good}\n")
    p = cli("config", "check", str(tls))
    assert p.returncode == 2 and "tls_cert and tls_key go together" in p.stderr
