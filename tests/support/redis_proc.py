"""The one real redis-server the tests start: on a Unix socket of the test's own, and one it can
kill, pause and restart. Where a test needs it, what production Redis has and the embedded one
does not: an append-only file (so a SIGKILL loses nothing acknowledged), a password, ACL users,
TLS, cluster or sentinel mode. ``persist=False`` keeps nothing on disk: a restart comes back
empty."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from service.processes import stop_process
from service.vllm_server import free_port


@dataclass
class RedisProc:
    dir: Path
    persist: bool = True
    password: str | None = None
    acl_users: list[str] = field(
        default_factory=list
    )  # ACL SETUSER rules, e.g. "app on >pw ~* +@all"
    tls: dict[str, Path] | None = None  # cert, key, ca: serve TLS only, on `port`
    port: int = 0  # TCP port; 0: a Unix socket only
    extra: list[str] = field(default_factory=list)  # more options: cluster mode, --replicaof
    sentinel: str | None = None  # a sentinel's configuration file: run `redis-server --sentinel`
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.dir / "redis.sock"

    def args(self) -> list[str]:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (make setup installs it)"
        a = [binary, str(self.dir / "sentinel.conf"), "--sentinel"] if self.sentinel else [binary]
        a += ["--dir", str(self.dir), "--logfile", str(self.dir / "redis.log"), "--save", ""]
        a += (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.persist
            else ["--appendonly", "no"]
        )
        if self.tls:
            a += ["--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1"]
            a += ["--tls-cert-file", str(self.tls["cert"]), "--tls-key-file", str(self.tls["key"])]
            a += ["--tls-ca-cert-file", str(self.tls["ca"]), "--tls-auth-clients", "optional"]
        elif self.port:
            a += ["--port", str(self.port), "--bind", "127.0.0.1"]
        else:
            a += ["--port", "0"]
        a += ["--unixsocket", str(self.socket), "--unixsocketperm", "700"]
        if self.password:
            a += ["--requirepass", self.password]
        for rule in self.acl_users:
            a += ["--user", *rule.split()]
        return a + self.extra

    def start(self, timeout_s: float = 10.0) -> RedisProc:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.tls and not self.port:
            self.port = free_port()
        self.socket.unlink(missing_ok=True)
        if self.sentinel is not None:  # redis-server --sentinel needs its file (and rewrites it)
            (self.dir / "sentinel.conf").write_text(self.sentinel)
        self.proc = subprocess.Popen(
            self.args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        end = time.monotonic() + timeout_s
        while not self.socket.exists():
            assert self.proc.poll() is None, (self.dir / "redis.log").read_text()[-2000:]
            assert time.monotonic() < end, "redis-server did not start"
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save; only what the append-only file holds survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.socket.unlink(missing_ok=True)

    def pause(self) -> None:
        """SIGSTOP: the sockets stay open and connects still succeed, but nothing is answered;
        what clients send meanwhile waits in the kernel and runs on `resume`."""
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10, resume=True)
        self.socket.unlink(missing_ok=True)

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def client(self) -> redis.Redis:
        """A client on the Unix socket as the default user (with the password, if any), decoding
        replies."""
        return redis.Redis(
            unix_socket_path=str(self.socket), password=self.password, decode_responses=True
        )
