"""`misalign-monitor serve` as a child process: the one way the demo, tests and benchmarks start it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from detectors.errors import MisalignError
from service.processes import stop_process

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class SidecarProcess:
    proc: subprocess.Popen[bytes]
    grpc_port: int
    metrics_port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM (graceful: drain, flush the flag buffer), then SIGKILL after ``timeout_s``."""
        return stop_process(self.proc, timeout_s, resume=True)

    def __enter__(self) -> SidecarProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_sidecar(
    state_dir: Path,
    *args: str,
    grpc_port: int = 0,
    metrics_port: int = 0,
    env: Mapping[str, str] | None = None,
    log: IO[bytes] | int | None = subprocess.DEVNULL,
    cpus: Sequence[int] | None = None,
    timeout_s: float = 60.0,
) -> SidecarProcess:
    """Start the sidecar and wait until it serves; ``args`` are extra ``serve`` options.

    ``cpus`` pins it with taskset (benchmarks: a sidecar on a core of its own). The ready file
    the sidecar writes once both its listeners are bound carries the ports it got.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    ready = state_dir / f"ready-{time.monotonic_ns()}"
    pin = ["taskset", "-c", ",".join(map(str, cpus))] if cpus else []
    proc = subprocess.Popen(
        [
            *pin,
            sys.executable,
            "-m",
            "misalign_monitor.cli",
            "serve",
            "--grpc-port",
            str(grpc_port),
            "--metrics-port",
            str(metrics_port),
            "--ready-file",
            str(ready),
            *args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT if log is not None else None,
        cwd=ROOT,
        env={**os.environ, "MISALIGN_STATE_DIR": str(state_dir / "state"), **(env or {})},
    )
    deadline = time.monotonic() + timeout_s
    while not ready.exists() or not ready.read_text().strip():
        if proc.poll() is not None:
            raise MisalignError(f"the sidecar exited with status {proc.returncode} before serving")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise MisalignError(f"the sidecar did not become ready within {timeout_s:.0f} s")
        time.sleep(0.05)
    ports = ready.read_text().split()
    return SidecarProcess(proc, int(ports[0]), int(ports[1]))
