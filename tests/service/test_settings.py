"""Where a setting comes from: command-line flag > environment > settings file > default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from detectors.errors import SettingsError
from service.settings import load_settings
from tests.support.redis_proc import RedisProc

FILE = """\
metrics_port: 1111
grpc_port: 2222
review:
  session_ttl_s: 100
  claim_idle_s: 30
"""


@pytest.fixture
def settings_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.startswith("MISALIGN_"):
            monkeypatch.delenv(name)
    path = tmp_path / "sidecar.yaml"
    path.write_text(FILE)
    return path


def test_flag_beats_environment_beats_file_beats_default(
    settings_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = load_settings(settings_file)
    assert (s.metrics_port, s.grpc_port, s.shutdown_grace_s) == (1111, 2222, 10.0)
    monkeypatch.setenv("MISALIGN_METRICS_PORT", "3333")
    s = load_settings(settings_file)
    assert (s.metrics_port, s.grpc_port) == (3333, 2222)
    s = load_settings(settings_file, metrics_port=4444, grpc_port=None)  # None: flag not given
    assert (s.metrics_port, s.grpc_port) == (4444, 2222)


def test_a_nested_environment_name_sets_one_field_of_a_file_section(
    settings_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MISALIGN_REVIEW__SESSION_TTL_S", "200")
    s = load_settings(settings_file)
    assert (s.review.session_ttl_s, s.review.claim_idle_s) == (200.0, 30.0)
    monkeypatch.setenv("MISALIGN_REVIEW__SESSION_TTL_S", "0.5")
    with pytest.raises(
        SettingsError, match=r"review\.session_ttl_s.*MISALIGN_REVIEW__SESSION_TTL_S"
    ):
        load_settings(settings_file)


def test_toml_files_and_bad_files_name_the_file(settings_file: Path, tmp_path: Path) -> None:
    toml = tmp_path / "sidecar.toml"
    toml.write_text("metrics_port = 5\n[review]\nsession_ttl_s = 9\n")
    s = load_settings(toml)
    assert (s.metrics_port, s.review.session_ttl_s) == (5, 9.0)
    for path, text, expected in (
        (toml, "metrics_port = ", "not valid TOML"),
        (settings_file, "metrics_port: [\n", "not valid YAML"),
        (settings_file, "- metrics_port\n", "expected a mapping of settings, got list"),
        (settings_file, "metrics_prot: 1\n", "metrics_prot"),
    ):
        path.write_text(text)
        with pytest.raises(SettingsError, match=expected) as err:
            load_settings(path)
        assert str(path) in str(err.value)
    with pytest.raises(SettingsError, match="cannot read config file"):
        load_settings(tmp_path / "missing.yaml")


def test_the_redis_url_flag_wins_over_the_environment_in_the_cli(tmp_path: Path) -> None:
    """The pod sets MISALIGN_REDIS_URL; an operator's --redis-url must still be the one used."""
    server = RedisProc(tmp_path / "r", persist=False).start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MISALIGN_")}
        env["MISALIGN_REDIS_URL"] = "redis://127.0.0.1:1/0"  # nothing listens on port 1
        url = f"unix://{server.socket}"
        p = subprocess.run(
            [sys.executable, "-m", "misalign_monitor.cli", "review", "list", "--redis-url", url],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert p.returncode == 0, p.stderr
        assert "127.0.0.1:1" not in p.stderr
    finally:
        server.stop()
