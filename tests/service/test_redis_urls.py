"""Redis URLs: every credential form hidden wherever a URL is printed (``redact_url``), the cluster
and sentinel forms parsed, and a malformed URL refused in one line at `config check` and at start.
The processes (sidecar, review page, CLI) run for real against a real password-protected Redis,
or against a port where nothing listens."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench.steady_load import scrape
from detectors.errors import RedisSettingsError, SettingsError
from service.redis_conn import parse_target, redact_url
from service.settings import load_settings
from service.sidecar_process import start_sidecar
from service.vllm_server import free_port
from tests.support import ROOT
from tests.support.polling import wait_until
from tests.support.redis_proc import RedisProc
from tests.support.sidecar import config_check

SECRET = "Qz7-url-secret-41"
REVIEW = [sys.executable, "-m", "misalign_monitor.cli", "review"]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"redis://app:{SECRET}@redis.internal:6379/0", "redis://redis.internal:6379/0"),
        (f"redis://h:1/0?password={SECRET}", "redis://h:1/0?password=***"),
        (
            f"rediss://h:6380/0?username={SECRET}&password={SECRET}&socket_timeout=3",
            "rediss://h:6380/0?username=***&password=***&socket_timeout=3",
        ),
        (f"redis://:{SECRET}/x?y#z@h:1/0", "redis://h:1/0"),  # unencoded / ? # in the password
        (
            f"unix://:{SECRET}@/run/redis.sock?password={SECRET}",
            "unix:///run/redis.sock?password=***",
        ),
        (f"redis://h:1/0?pass%77ord={SECRET}", "redis://h:1/0?password=***"),  # encoded name
        (f"redis://h:1/0?{SECRET}", "redis://h:1/0?***"),
        (f"redis://h:1/0?db=2&credential_provider={SECRET}", "redis://h:1/0?db=2&***"),
        (f"redis://h:1/0#{SECRET}", "redis://h:1/0"),
        (f"redis+cluster://:{SECRET}@a:7000,b:7001", "redis+cluster://a:7000,b:7001"),
        (
            f"rediss+sentinel://u:{SECRET}@s1:26379,s2/svc/2"
            f"?sentinel_username=admin&sentinel_password={SECRET}",
            "rediss+sentinel://s1:26379,s2/svc/2?sentinel_username=***&sentinel_password=***",
        ),
        (f"redis://:{SECRET}", "redis://<unreadable host>"),  # the host forgotten
        (f"redis://h:{SECRET}/0", "redis://<unreadable host>/0"),
        (SECRET, "<a redis URL without a scheme>"),
        (f"{SECRET}://h:1", "<a redis URL without a scheme>"),
    ],
)
def test_redact_url_hides_every_credential_form(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert SECRET not in redact_url(url)


def test_cluster_and_sentinel_urls_parse() -> None:
    c = parse_target("rediss+cluster://a:7000,[::1]:7001,b?socket_timeout=1.5")
    assert (c.kind, c.tls) == ("cluster", True)
    assert c.nodes == (("a", 7000), ("::1", 7001), ("b", 6379))
    assert c.options == {"socket_timeout": 1.5}
    s = parse_target("redis+sentinel://:pw@s1,s2:26380/flagged-primary/3?sentinel_password=sp")
    assert (s.kind, s.tls, s.service_name, s.db) == ("sentinel", False, "flagged-primary", 3)
    assert s.nodes == (("s1", 26379), ("s2", 26380))
    assert s.options == {"password": "pw", "sentinel_password": "sp"}
    assert parse_target("unix:///run/redis.sock").kind == "standalone"


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("memcached://h:1", "expected a scheme among redis://"),
        ("redis+cluster://", "expected host:port[,host:port...]"),
        (f"redis+cluster://:{SECRET}@h:99999", "port of 'h:99999': expected 1-65535"),
        ("redis+cluster://h:1,:2", "expected host:port, got ':2'"),
        (f"redis+cluster://:{SECRET}/x@h:1,:2", "expected host:port, got ':2'"),  # '/' unencoded
        (f"redis://:{SECRET[:4]}:{SECRET[4:]}", "Port could not be cast"),  # no '@': host:port?
        ("redis+cluster://h:1/2", "a Redis Cluster has no database number"),
        (f"redis+sentinel://:{SECRET}@h:1", "expected /<service name>[/db]"),
        ("redis+sentinel://h:1/svc/x", "database 'x': expected a number"),
        (
            f"redis+sentinel://h:1/svc?sentinel_pasword={SECRET}",
            "'sentinel_pasword' is not read here",
        ),
        ("redis+cluster://h:1?sentinel_password=x", "'sentinel_password' is not read here"),
        ("redis+cluster://h:1?socket_timeout=soon", "socket_timeout: expected a float"),
        (f"redis://:{SECRET}@h:notaport/0", "Port could not be cast"),
        ("redis://h:1/0?socket_timeout=soon", "Invalid value for 'socket_timeout'"),
    ],
)
def test_malformed_url_is_named_without_its_secret(url: str, needle: str) -> None:
    with pytest.raises(RedisSettingsError) as err:
        parse_target(url)
    assert needle in str(err.value), err.value
    assert SECRET not in str(err.value) and SECRET[4:] not in str(err.value), err.value
    with pytest.raises(SettingsError) as err2:
        load_settings(redis_url=url)
    message = str(err2.value)
    assert (
        "redis URL" in message
        and needle in message
        and "\n" not in message
        and SECRET not in message
    )


def test_cluster_refuses_keys_in_different_slots(tmp_path: Path) -> None:
    """The keys before the hash tags (misalign:flagged, its :dead and misalign:labels) would
    make every script CROSSSLOT on a cluster: refused at `config check`, exit 2, one line."""
    url_file = tmp_path / "url"
    url_file.write_text(f"redis+cluster://:{SECRET}@h:7000\n")
    out = config_check(
        tmp_path,
        f"redis_url_file: {url_file}\nstream: misalign:flagged\n"
        "dead_letter_stream: misalign:flagged:dead\nreview:\n  labels_stream: misalign:labels\n",
        {},
    )
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "dead_letter_stream, review.labels_stream hash apart" in out.stderr
    assert SECRET not in out.stdout + out.stderr
    # The defaults share one tag; a single Redis takes any names.
    ok = config_check(tmp_path, f"redis_url_file: {url_file}\n", {})
    assert ok.returncode == 0, ok.stderr
    load_settings(redis_url="redis://h:1", stream="misalign:flagged")


@pytest.mark.parametrize(
    ("yaml_text", "needle"),
    [
        # WAIT vouches for one connection's writes; a cluster client spreads a batch over several.
        ("redis_url: redis+cluster://h:7000\nredis_wait_replicas: 1\n", "expected 0 with a"),
        # The embedded redis has no replica: every batch would wait forever.
        ("redis_wait_replicas: 1\n", "redis_wait_replicas needs redis_url"),
        (
            "redis_url: redis+sentinel://h/s\nredis_wait_replicas: -1\n",
            "greater than or equal to 0",
        ),
        # WAIT 0 blocks for ever; above the socket timeout the client gives up first.
        (
            "redis_url: redis+sentinel://h/s\nredis_wait_timeout_ms: 0\n",
            "greater than or equal to 1",
        ),
        (
            "redis_url: redis+sentinel://h/s\nredis_wait_timeout_ms: 2000\n",
            "less than or equal to 1500",
        ),
    ],
)
def test_bad_wait_settings_are_refused_in_one_line(
    tmp_path: Path, yaml_text: str, needle: str
) -> None:
    out = config_check(tmp_path, yaml_text, {})
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert needle in out.stderr, out.stderr


def test_wait_replicas_default_follows_the_url() -> None:
    from service.redis_conn import wait_replicas

    sentinel = "redis+sentinel://h:26379/s"
    assert wait_replicas(load_settings(redis_url=sentinel), sentinel) == 1
    assert wait_replicas(load_settings(redis_url="redis://h:1"), "redis://h:1") == 0
    assert wait_replicas(load_settings(), "unix:///tmp/embedded.sock") == 0
    two = load_settings(redis_url=sentinel, redis_wait_replicas=2)
    assert wait_replicas(two, sentinel) == 2


def test_malformed_url_stops_the_sidecar_in_one_line(tmp_path: Path) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MISALIGN_")}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "misalign_monitor.cli",
            "serve",
            "--redis-url",
            f"redis+sentinel://:{SECRET}@h",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**clean, "MISALIGN_STATE_DIR": str(tmp_path)},
        timeout=60,
    )
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "expected /<service name>[/db]" in out.stderr and SECRET not in out.stderr


def _review_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "review.yaml"
    cfg.write_text("review:\n  users:\n    - name: alice\n      password_env: REVIEW_PW\n")
    return cfg


def test_password_in_url_query_is_never_printed(tmp_path: Path) -> None:
    """``?password=`` (which redis-py reads): the sidecar, the review page and the CLI print the
    URL at start and in their Redis errors with the password hidden, reachable or not."""
    port = free_port()
    redis = RedisProc(tmp_path / "redis", persist=False, password=SECRET, port=port).start()
    url = f"redis://127.0.0.1:{port}/0?password={SECRET}"
    down = f"redis://127.0.0.1:{free_port()}/0?password={SECRET}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MISALIGN_")},
        "MISALIGN_STATE_DIR": str(tmp_path / "state"),
        "REVIEW_PW": "alice-pw",
    }
    cfg = _review_config(tmp_path)
    try:
        # The review page, started: its log line names where the samples come from.
        ready = tmp_path / "review.ready"
        listen = ["--port", "0", "--ready-file", str(ready)]
        review = subprocess.Popen(
            [*REVIEW, "serve", "--config", str(cfg), "--redis-url", url, *listen],
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_until(lambda: ready.exists() or review.poll() is not None, 30, "review ready")
        finally:
            review.send_signal(signal.SIGINT)
            _, review_err = review.communicate(timeout=30)
        assert f"samples from redis://127.0.0.1:{port}/0?password=***" in review_err, review_err
        # The review page and the CLI with nothing listening: one-line errors.
        failed = [
            subprocess.run(
                [*REVIEW, *args, "--redis-url", down],
                capture_output=True,
                text=True,
                cwd=ROOT,
                env=env,
                timeout=60,
            )
            for args in (["serve", "--config", str(cfg), "--port", "0"], ["list"])
        ]
        for out in failed:
            assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
            assert "Connect call failed" in out.stderr or "Connection refused" in out.stderr
            assert f"{down.split('?')[0]}?password=***" in out.stderr
        # The sidecar: once with Redis reachable (the query's password works), once with not.
        logs = []
        for i, target in enumerate((url, down)):
            log_path = tmp_path / f"sidecar-{i}.log"
            with (
                log_path.open("wb") as log,
                start_sidecar(tmp_path / f"sc{i}", "--redis-url", target, log=log) as sc,
            ):
                wait_until(
                    lambda sc=sc: "misalign_queue_buffer_capacity" in scrape(sc.metrics_url),
                    20,
                    "up",
                )
            logs.append(log_path.read_text(errors="replace"))
        assert "flags to redis://127.0.0.1" in logs[0] and "password=***" in logs[0]
        assert "redis unreachable at start" in logs[1] and "password=***" in logs[1]
        for text in (review_err, *(o.stdout + o.stderr for o in failed), *logs):
            assert SECRET not in text
    finally:
        redis.stop()
