"""Real Redis topologies on loopback for the tests: a three-node Redis Cluster and a primary with a
replica watched by a Sentinel. redis-server cannot take port 0, so each node gets a port found free
and is started again on another one if something took it in between; every wait is on a condition.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import redis

from tests.support.polling import wait_until
from tests.support.redis_proc import RedisProc

SERVICE = "flagged-primary"  # the name the Sentinel monitors the primary under


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port(cluster_bus: bool) -> int:
    """A free port below 55536, so that a cluster node's bus (port + 10000) is a port too."""
    while True:
        port = random.randint(20000, 55535)
        if _bindable(port) and (not cluster_bus or _bindable(port + 10000)):
            return port


def start_on_free_port(make: Callable[[int], RedisProc], cluster_bus: bool = False) -> RedisProc:
    """``make(port).start()``, on another port while the chosen one was taken in between."""
    for _ in range(5):
        node = make(_free_port(cluster_bus))
        try:
            return node.start()
        except AssertionError:
            log = node.dir / "redis.log"
            if not log.exists() or "Address already in use" not in log.read_text():
                raise
    raise AssertionError("no free port for redis-server after 5 tries")


def tcp(port: int, **kwargs: object) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, decode_responses=True, **kwargs)  # type: ignore[arg-type]


class LocalCluster:
    """Three primaries, no replicas: ``redis-cli --cluster create``, then cluster_state:ok."""

    def __init__(self, root: Path, nodes: int = 3) -> None:
        self.nodes = [
            start_on_free_port(
                lambda port, i=i: RedisProc(
                    root / f"node{i}",
                    persist=False,
                    port=port,
                    extra=["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"],
                ),
                cluster_bus=True,
            )
            for i in range(nodes)
        ]
        try:
            cli = shutil.which("redis-cli")
            assert cli, "redis-cli is not installed (make setup installs it)"
            create = [cli, "--cluster", "create", *self.addresses, "--cluster-replicas", "0"]
            subprocess.run(
                [*create, "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=60,
            )
            wait_until(
                lambda: all(
                    "cluster_state:ok" in n.client().execute_command("CLUSTER", "INFO")
                    for n in self.nodes
                ),
                30,
                "cluster_state:ok on every node",
            )
        except BaseException:
            self.stop()
            raise

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{n.port}" for n in self.nodes]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(self.addresses)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


class LocalSentinel:
    """A primary, its replica and one Sentinel (quorum 1) that fails over 0.5 s after the
    primary stops answering. ``spare=True``: a second replica, which the failover turns into the
    new primary's replica (a sidecar waiting for one replica's WAIT writes on after a SIGKILL)."""

    def __init__(self, root: Path, spare: bool = False) -> None:
        self.primary = start_on_free_port(
            lambda port: RedisProc(root / "primary", persist=False, port=port)
        )
        self.replica: RedisProc | None = None
        self.spare: RedisProc | None = None
        self.sentinel: RedisProc | None = None
        try:
            self.replica = self._replica(root / "replica")
            if spare:
                self.spare = self._replica(root / "spare")
            conf = (
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 1\n"
                f"sentinel down-after-milliseconds {SERVICE} 500\n"
                f"sentinel failover-timeout {SERVICE} 10000\n"
            )
            self.sentinel = start_on_free_port(
                lambda port: RedisProc(root / "sentinel", persist=False, port=port, sentinel=conf)
            )
            replicas = self.replicas
            wait_until(
                lambda: all(
                    r.client().info("replication")["master_link_status"] == "up" for r in replicas
                ),
                30,
                "the replicas in sync",
            )
            wait_until(
                lambda: (
                    {r["port"] for r in tcp(self.sentinel.port).sentinel_slaves(SERVICE)}  # type: ignore[union-attr]
                    >= {r.port for r in replicas}
                ),
                30,
                "the sentinel knows the replicas",
            )
        except BaseException:
            self.stop()
            raise

    def _replica(self, path: Path) -> RedisProc:
        return start_on_free_port(
            lambda port: RedisProc(
                path,
                persist=False,
                port=port,
                extra=["--replicaof", "127.0.0.1", str(self.primary.port)],
            )
        )

    @property
    def replicas(self) -> list[RedisProc]:
        return [r for r in (self.replica, self.spare) if r is not None]

    @property
    def url(self) -> str:
        assert self.sentinel is not None
        return f"redis+sentinel://127.0.0.1:{self.sentinel.port}/{SERVICE}"

    def primary_port(self) -> int:
        assert self.sentinel is not None
        return int(tcp(self.sentinel.port).sentinel_get_master_addr_by_name(SERVICE)[1])

    def stop(self) -> None:
        for node in (self.sentinel, self.spare, self.replica, self.primary):
            if node is not None:
                node.stop()
