"""Listener and credential settings mistakes (the sidecar's TLS, token, health port, socket mode;
the tap's mTLS): one line and exit 2, at `config check` / `config tap` and at start."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.pki import make_pki

TOKEN = "a-token-long-enough-to-keep"


def cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "misalign_monitor.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "GRPC_VERBOSITY": "NONE", **(env or {})},
    )


def one_line_error(p: subprocess.CompletedProcess[str], needle: str) -> None:
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], p.stderr


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def mistakes(pki: dict[str, Path], tmp: Path) -> list[tuple[str, str]]:
    return [
        (f"tls_cert: {tmp / 'nope.pem'}\ntls_key: {pki['server.key']}\n", "tls_cert: cannot read"),
        (
            f"tls_cert: {pki['server.key']}\ntls_key: {pki['server.key']}\n",
            "holds no PEM certificate",
        ),
        (
            f"tls_cert: {pki['server.pem']}\ntls_key: {pki['server.pem']}\n",
            "tls_key: " + str(pki["server.pem"]) + " holds no PEM private key",
        ),
        (
            f"tls_cert: {pki['server.pem']}\ntls_key: {pki['client.key']}\n",
            "are not a certificate and its private key",
        ),
        (f"tls_key: {pki['server.key']}\n", "tls_cert and tls_key go together"),
        (
            f"tls_cert: {pki['server.pem']}\ntls_key: {pki['server.key']}\n"
            f"tls_client_ca: {pki['server.key']}\n",
            "tls_client_ca: ",
        ),
        (f"grpc_host: 0.0.0.0\napi_token: {TOKEN}\n", "would cross the network in clear"),
        ("api_token: short\n", "at least 16 characters"),
        (f"api_token_file: {tmp / 'no-token'}\n", "api_token_file: cannot read"),
        ("health_port: 9999\nmetrics_port: 9999\n", "health_port 9999 is also metrics_port"),
        ("unix_socket_mode: '0999'\n", "expected an octal mode such as '0660'"),
        ("unix_socket_mode: 4095\n", "(at most 0o777), got 4095 (0o7777)"),
    ]


def test_listener_settings_mistakes_at_config_check_and_at_start(
    pki: dict[str, Path], tmp_path: Path
) -> None:
    for i, (text, needle) in enumerate(mistakes(pki, tmp_path)):
        cfg = tmp_path / f"bad-{i}.yaml"
        cfg.write_text(text)
        one_line_error(cli("config", "check", cfg), needle)
        one_line_error(cli("serve", "--config", cfg), needle)


def test_good_listener_settings_pass_and_hide_the_token(
    pki: dict[str, Path], tmp_path: Path
) -> None:
    cfg = tmp_path / "good.yaml"
    cfg.write_text(
        f"grpc_host: 0.0.0.0\ntls_cert: {pki['server.pem']}\ntls_key: {pki['server.key']}\n"
        f"tls_client_ca: {pki['ca.pem']}\napi_token: {TOKEN}\nhealth_port: 50052\n"
    )
    p = cli("config", "check", cfg, env={"MISALIGN_UNIX_SOCKET_MODE": "0640"})
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["health_port"] == 50052 and out["unix_socket_mode"] == 0o640
    assert out["api_token"] == "**********" and TOKEN not in p.stdout


def test_a_port_taken_is_one_line_at_start(taken_port: int, tmp_path: Path) -> None:
    env = {"MISALIGN_STATE_DIR": str(tmp_path / "state")}
    for flag, setting in (("--grpc-port", "grpc_port"), ("--metrics-port", "metrics_port")):
        p = cli("serve", "--grpc-port", "0", "--metrics-port", "0", flag, str(taken_port), env=env)
        one_line_error(p, f"setting '{setting}': cannot listen on 127.0.0.1:{taken_port}")
    # Refused before the embedded Redis was started: nothing of it was left behind.
    assert not (tmp_path / "state" / "redis").exists()


def test_tap_tls_mistakes_at_config_tap(pki: dict[str, Path], tmp_path: Path) -> None:
    good = {
        "MISALIGN_TAP_SIDECAR": "sidecar.example:50051",
        "MISALIGN_TAP_TLS_CA": str(pki["ca.pem"]),
        "MISALIGN_TAP_TLS_CERT": str(pki["client.pem"]),
        "MISALIGN_TAP_TLS_KEY": str(pki["client.key"]),
    }
    p = cli("config", "tap", env=good)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["tls_ca"] == str(pki["ca.pem"])
    cases = [
        (
            {"MISALIGN_TAP_TLS_KEY": ""},
            "MISALIGN_TAP_TLS_CERT and MISALIGN_TAP_TLS_KEY go together",
        ),
        ({"MISALIGN_TAP_TLS_CA": ""}, "need MISALIGN_TAP_TLS_CA"),
        (
            {"MISALIGN_TAP_SIDECAR": "unix:/run/misalign/sidecar.sock"},
            "the Unix socket is plaintext",
        ),
        ({"MISALIGN_TAP_TLS_CA": str(tmp_path / "nope")}, "MISALIGN_TAP_TLS_CA: cannot read"),
        ({"MISALIGN_TAP_TLS_KEY": str(pki["client.pem"])}, "MISALIGN_TAP_TLS_KEY: "),
    ]
    for change, needle in cases:
        env = {**good, **change}
        for name in [n for n, v in env.items() if v == ""]:
            del env[name]
        base = {k: v for k, v in os.environ.items() if not k.startswith("MISALIGN_TAP_")}
        p = subprocess.run(
            [sys.executable, "-m", "misalign_monitor.cli", "config", "tap"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**base, **env},
        )
        one_line_error(p, needle)
