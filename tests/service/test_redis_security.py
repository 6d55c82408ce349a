"""Redis with a password, an ACL user and TLS (a real redis-server, certificates made here), secrets
from the environment or files, and `config check` never printing them."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.steady_load import EngineLoad, scrape
from detectors import bundle as bundle_io
from service.sidecar_process import SidecarProcess, start_sidecar
from service.vllm_server import free_port
from tests.support.harness import Feeder
from tests.support.pki import make_pki
from tests.support.polling import wait_until
from tests.support.redis_proc import RedisProc
from tests.support.sidecar import config_check

BUNDLE = bundle_io.load(bundle_io.default_bundle_path())
PASSWORD = "s3cret-Redis-pw-7d1f"
ACL_PASSWORD = "acl-only-pw-4b2e"


def flag_some(sc: SidecarProcess, n: int = 6) -> list[str]:
    load = EngineLoad(BUNDLE, live=n, lifetime=4, prefill=4, flag_every=1, prefix="sec")
    feeder = Feeder(sc.address, load, None)
    wait_until(lambda: len(load.finished) >= n, 20, "requests finished")
    feeder.finish()
    return load.flagged


def log_text(path: Path) -> str:
    return path.read_text(errors="replace")


@pytest.mark.slow  # three sidecar processes
def test_password_from_env_and_acl_user_from_file(tmp_path: Path) -> None:
    port = free_port()
    redis = RedisProc(
        tmp_path / "redis",
        persist=False,
        password=PASSWORD,
        port=port,
        # The sidecar's own user: streams under misalign:*, nothing else.
        acl_users=[f"flagger on >{ACL_PASSWORD} ~misalign:* resetchannels +@all -@dangerous"],
    ).start()
    url = f"redis://127.0.0.1:{port}"
    try:
        with open(tmp_path / "a.log", "wb") as log:
            # 1. the default user's password from MISALIGN_REDIS_PASSWORD
            with start_sidecar(
                tmp_path / "a",
                "--redis-url",
                url,
                env={"MISALIGN_REDIS_PASSWORD": PASSWORD},
                log=log,
            ) as sc:
                flagged = flag_some(sc)
                wait_until(
                    lambda: redis.client().xlen("misalign:{flagged}") == len(flagged), 20, "pushed"
                )
            # 2. an ACL user, its password from a file
            pw_file = tmp_path / "redis-password"
            pw_file.write_text(ACL_PASSWORD + "\n")
            pw_file.chmod(0o600)
            with start_sidecar(
                tmp_path / "b",
                "--redis-url",
                url,
                env={
                    "MISALIGN_REDIS_USERNAME": "flagger",
                    "MISALIGN_REDIS_PASSWORD_FILE": str(pw_file),
                    "MISALIGN_STREAM": "misalign:acl",
                },
                log=log,
            ) as sc:
                flagged = flag_some(sc)
                wait_until(
                    lambda: redis.client().xlen("misalign:acl") == len(flagged), 30, "pushed"
                )
            # 3. a wrong password: samples wait in the buffer, failures are counted
            with start_sidecar(
                tmp_path / "c",
                "--redis-url",
                url,
                env={
                    "MISALIGN_REDIS_PASSWORD": "wrong-" + PASSWORD,
                    "MISALIGN_STREAM": "misalign:x",
                },
                log=log,
            ) as sc:
                flagged = flag_some(sc)
                wait_until(
                    lambda: scrape(sc.metrics_url)["misalign_queue_push_failures_total"] >= 1,
                    20,
                    "failures counted",
                )
                assert scrape(sc.metrics_url)["misalign_queue_buffered"] == len(flagged)
        assert redis.client().exists("misalign:x") == 0
        text = log_text(tmp_path / "a.log")
        assert "AuthenticationError" in text or "invalid username-password" in text.lower()
        for secret in (PASSWORD, ACL_PASSWORD):
            assert secret not in text
    finally:
        redis.stop()


@pytest.mark.slow  # three sidecar processes
def test_tls_and_mutual_tls_to_redis(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    redis = RedisProc(
        tmp_path / "redis",
        persist=False,
        password=PASSWORD,
        tls={"cert": pki["server.pem"], "key": pki["server.key"], "ca": pki["ca.pem"]},
    ).start()
    url = f"rediss://localhost:{redis.port}"
    try:
        env = {
            "MISALIGN_REDIS_PASSWORD": PASSWORD,
            "MISALIGN_REDIS_TLS_CA": str(pki["ca.pem"]),
            "MISALIGN_REDIS_TLS_CERT": str(pki["client.pem"]),
            "MISALIGN_REDIS_TLS_KEY": str(pki["client.key"]),
        }
        with (
            open(tmp_path / "tls.log", "wb") as log,
            start_sidecar(tmp_path / "a", "--redis-url", url, env=env, log=log) as sc,
        ):
            flagged = flag_some(sc)
            wait_until(
                lambda: redis.client().xlen("misalign:{flagged}") == len(flagged), 30, "pushed"
            )
        # Plain TCP to the TLS port, and TLS with a CA that did not sign the server: refused.
        (tmp_path / "other").mkdir()
        other = make_pki(tmp_path / "other")
        for bad in ({"MISALIGN_REDIS_TLS_CA": str(other["ca.pem"])}, None):
            bad_url = url if bad else f"redis://localhost:{redis.port}"
            with start_sidecar(
                tmp_path / "bad",
                "--redis-url",
                bad_url,
                env={**env, **bad} if bad else {"MISALIGN_REDIS_PASSWORD": PASSWORD},
            ) as sc:
                flag_some(sc, 2)
                wait_until(
                    lambda sc=sc: scrape(sc.metrics_url)["misalign_queue_push_failures_total"] >= 1,
                    20,
                    "failures counted",
                )
        assert redis.client().xlen("misalign:{flagged}") == len(flagged)
    finally:
        redis.stop()


def test_config_check_never_prints_secrets(tmp_path: Path) -> None:
    url_file = tmp_path / "url"
    url_file.write_text(f"redis://app:{PASSWORD}-in-url@redis.internal:6379/0\n")
    out = config_check(
        tmp_path,
        f"redis_url_file: {url_file}\nredis_username: app\n",
        {"MISALIGN_REDIS_PASSWORD": PASSWORD},
    )
    assert out.returncode == 0, out.stderr
    assert PASSWORD not in out.stdout + out.stderr
    assert '"redis_password": "**********"' in out.stdout
    assert str(url_file) in out.stdout  # the file's name, not what it holds

    out = config_check(tmp_path, f"redis_url: redis://app:{PASSWORD}@redis.internal:6379/0\n", {})
    assert out.returncode == 0 and PASSWORD not in out.stdout + out.stderr
    assert '"redis_url": "**********"' in out.stdout

    # An invalid combination: a one-line error naming the settings, and still no secret.
    pw_file = tmp_path / "pw"
    pw_file.write_text(PASSWORD)
    out = config_check(
        tmp_path,
        f"redis_url: rediss://h:1\nredis_password_file: {pw_file}\n",
        {"MISALIGN_REDIS_PASSWORD": PASSWORD},
    )
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "redis_password or redis_password_file" in out.stderr
    assert PASSWORD not in out.stdout + out.stderr


@pytest.mark.parametrize(
    ("yaml_text", "needle"),
    [
        ("redis_username: app\nredis_url: redis://h:1\n", "redis_username needs redis_password"),
        ("redis_password: x\n", "need redis_url or redis_url_file"),
        ("redis_url: redis://h:1\nredis_tls_ca: /etc/hostname\n", "need a rediss:// redis_url"),
        (
            "redis_url: rediss://h:1\nredis_tls_cert: /etc/hostname\n",
            "redis_tls_cert and redis_tls_key",
        ),
        (
            "redis_url: rediss://h:1\nredis_tls_ca: /nonexistent/ca.pem\n",
            "redis_tls_ca: file not found",
        ),
    ],
)
def test_bad_redis_settings_are_named(tmp_path: Path, yaml_text: str, needle: str) -> None:
    out = config_check(tmp_path, yaml_text, {})
    assert out.returncode == 2 and needle in out.stderr, out.stderr
