"""A real redis-server of the sidecar's own, on a Unix socket, when no Redis URL is configured."""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from pathlib import Path

from detectors.errors import MisalignError
from service.processes import stop_process

log = logging.getLogger(__name__)


class EmbeddedRedis:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "redis"
        self.socket = self.dir / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout_s: float = 10.0) -> str:
        binary = shutil.which("redis-server")
        if binary is None:
            raise MisalignError(
                "no redis_url configured and no redis-server on PATH to start an embedded one: "
                "install redis-server (apt-get install redis-server) or set MISALIGN_REDIS_URL"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                "0",
                "--unixsocket",
                str(self.socket),
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--logfile",
                str(self.dir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise MisalignError(
                    f"embedded redis-server did not start; see {self.dir / 'redis.log'}"
                )
            time.sleep(0.02)
        log.info("started embedded redis-server (pid %d) at %s", self.proc.pid, self.url)
        return self.url

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 5)
        self.proc = None
