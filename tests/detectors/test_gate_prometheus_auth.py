"""`gate --prometheus` against a Prometheus that wants credentials.

A real Prometheus (Debian's binary) with ``--web.config.file``: TLS from a test CA and basic auth
(bcrypt hash). Bearer tokens and tenant headers are what managed Prometheus services (Grafana
Cloud, Mimir, Thanos, Cortex) ask for, and Prometheus itself cannot demand them: a small HTTP
proxy in the test stands in for such a service in front of the real one. The scores Prometheus
scrapes are the sidecar's own histograms (``service.metrics.Metrics``) served from the test.
"""

from __future__ import annotations

import http.server
import os
import threading
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest

from detectors import bundle as bundle_io
from detectors.errors import MisalignError
from detectors.gate import PrometheusAccess, _prometheus_query
from service.metrics import Metrics
from tests.support.cli_runs import error_line, gate
from tests.support.pki import make_pki
from tests.support.polling import poll
from tests.support.prometheus import PrometheusServer

with warnings.catch_warnings():
    # bcrypt hashes for --web.config.file from libxcrypt; the module is gone in 3.13, where
    # this needs the bcrypt package instead (requires-python stops at 3.12).
    warnings.simplefilter("ignore", DeprecationWarning)
    import crypt

BUNDLE = bundle_io.load(bundle_io.default_bundle_path())
USER, PASSWORD = "gate", "s3cret-basic-pw"
TOKEN, TENANT = "tok-6f1d2a9b7c", "team-a"


class _Metrics(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


def _serve(handler: type[http.server.BaseHTTPRequestHandler]) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@dataclass
class Secured:
    prom: PrometheusServer
    ca: Path


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """v1 and v2 from the calibration's baseline distribution, v3 shifted up by one sd."""
    d = tmp_path_factory.mktemp("prom-auth")
    pki = make_pki(d / "pki")
    metrics = Metrics(BUNDLE)
    rng = np.random.default_rng(0)
    cal = [f.calibration for f in BUNDLE.spec.features if f.calibration]
    mean = np.array([c.baseline_mean for c in cal])
    std = np.array([c.baseline_std for c in cal])
    for version, shift in (("v1", 0.0), ("v2", 0.0), ("v3", 1.0)):
        metrics.request_score.observe(
            "m", version, mean + std * (rng.normal(size=(300, 3)) + shift)
        )
    handler = type("H", (_Metrics,), {"body": generate_latest(metrics.registry)})
    target = _serve(handler)
    web = {
        "tls_server_config": {
            "cert_file": str(pki["server.pem"]),
            "key_file": str(pki["server.key"]),
        },
        "basic_auth_users": {USER: crypt.crypt(PASSWORD, crypt.mksalt(crypt.METHOD_BLOWFISH))},
    }
    prom = PrometheusServer(
        d / "prom",
        [f"127.0.0.1:{target.server_address[1]}"],
        web_config=web,
        client_auth=(USER, PASSWORD),
        ca_file=pki["ca.pem"],
    )
    with prom:
        poll(
            lambda: prom.query('misalign_request_score_count{model_version="v3"}'),
            30,
            "v3 scores scraped",
            every=0.5,
        )
        yield Secured(prom, pki["ca.pem"])
    target.shutdown()


def versions(cand: str = "v2") -> list[str]:
    return ["--baseline-version", "v1", "--candidate-version", cand]


def test_basic_auth_over_tls_on_a_real_prometheus(secured: Secured, tmp_path: Path) -> None:
    url, ca = secured.prom.url, secured.ca
    auth = ["--prometheus-basic-auth", f"{USER}:{PASSWORD}", "--prometheus-ca-file", ca]
    same = gate("--prometheus", url, *versions(), *auth)
    assert same.returncode == 0, same.stdout + same.stderr
    assert f"Prometheus {url}" in same.stdout and PASSWORD not in same.stdout + same.stderr
    moved = gate("--prometheus", url, *versions("v3"), *auth)
    assert moved.returncode == 1, moved.stdout + moved.stderr
    # The same from a file and from the environment (what a CI secret becomes).
    pair = tmp_path / "basic"
    pair.write_text(f"{USER}:{PASSWORD}\n")
    res = gate("--prometheus", url, *versions(), "--prometheus-basic-auth-file", pair,
               "--prometheus-ca-file", ca)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    env = {**os.environ, "MISALIGN_PROMETHEUS_BASIC_AUTH": f"{USER}:{PASSWORD}"}
    res = gate("--prometheus", url, *versions("v3"), "--prometheus-ca-file", ca, env=env)
    assert res.returncode == 1, res.stdout + res.stderr


def test_wrong_or_missing_credentials_and_an_unknown_ca_exit_2(
    secured: Secured, tmp_path: Path
) -> None:
    url, ca = secured.prom.url, secured.ca
    wrong = gate("--prometheus", url, *versions(), "--prometheus-ca-file", ca,
                 "--prometheus-basic-auth", f"{USER}:not-the-pw")  # fmt: skip
    line = error_line(wrong)
    assert f"Prometheus at {url} refused the request (HTTP 401 Unauthorized)" in line
    assert f"basic auth as user '{USER}'" in line
    assert "not-the-pw" not in wrong.stdout + wrong.stderr
    line = error_line(gate("--prometheus", url, *versions(), "--prometheus-ca-file", ca))
    assert "HTTP 401" in line and "with no credentials" in line
    # Without the CA the server's certificate is not trusted: the same "does not answer" as a
    # Prometheus that is down, with the TLS reason.
    line = error_line(
        gate("--prometheus", url, *versions(), "--prometheus-basic-auth", f"{USER}:{PASSWORD}")
    )
    assert f"Prometheus at {url} does not answer" in line and "CERTIFICATE_VERIFY_FAILED" in line
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    line = error_line(gate("--prometheus", url, *versions(), "--prometheus-ca-file", junk))
    assert f"--prometheus-ca-file {junk}: not a readable PEM CA bundle" in line


def _proxy_in_test(upstream: Secured) -> http.server.ThreadingHTTPServer:
    """A stand-in for a managed Prometheus: demands ``Authorization: Bearer TOKEN`` and an
    ``X-Scope-OrgID`` tenant (401 otherwise, as Mimir and Cortex answer), then forwards the
    query to the real Prometheus with that one's own credentials."""
    basic = upstream.prom._open  # the helper's authenticated opener

    class Proxy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self._send(401, b'{"status":"error","error":"authentication required"}')
            if self.headers.get("X-Scope-OrgID") != TENANT:
                return self._send(401, b"no org id\n")
            try:
                with basic(upstream.prom.url + self.path, timeout=10) as r:
                    return self._send(r.status, r.read())
            except urllib.error.HTTPError as exc:
                return self._send(exc.code, exc.read())

        def _send(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    return _serve(Proxy)


def test_bearer_token_and_tenant_header_through_a_proxy_standing_in_for_a_managed_prometheus(
    secured: Secured, tmp_path: Path
) -> None:
    proxy = _proxy_in_test(secured)
    url = f"http://127.0.0.1:{proxy.server_address[1]}"
    tenant = ["--prometheus-header", f"X-Scope-OrgID: {TENANT}"]
    try:
        res = gate(
            "--prometheus", url, *versions("v3"), "--prometheus-bearer-token", TOKEN, *tenant
        )
        assert res.returncode == 1, res.stdout + res.stderr
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        res = gate("--prometheus", url, *versions(), "--prometheus-bearer-token-file", token_file,
                   *tenant)  # fmt: skip
        assert res.returncode == 0, res.stdout + res.stderr
        env = {**os.environ, "MISALIGN_PROMETHEUS_BEARER_TOKEN": TOKEN}
        assert gate("--prometheus", url, *versions(), *tenant, env=env).returncode == 0
        bad = gate("--prometheus", url, *versions(), "--prometheus-bearer-token", "tok-wrong-1",
                   *tenant)  # fmt: skip
        line = error_line(bad)
        assert "HTTP 401 Unauthorized) with a bearer token, header X-Scope-OrgID" in line
        assert "tok-wrong-1" not in bad.stdout + bad.stderr
        line = error_line(
            gate("--prometheus", url, *versions(), "--prometheus-bearer-token", TOKEN)
        )
        assert "HTTP 401" in line and "with a bearer token:" in line
    finally:
        proxy.shutdown()


def test_an_error_echoing_a_secret_is_masked(tmp_path: Path) -> None:
    """A proxy that puts the request's header into its error text (some do, for 'debugging')."""

    class Echo(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(502, f"bad gateway for {self.headers.get('X-Api-Key')}")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = _serve(Echo)
    access = PrometheusAccess(headers=(("X-Api-Key", "key-123456"),))
    try:
        with pytest.raises(MisalignError) as exc:
            _prometheus_query(f"http://127.0.0.1:{server.server_address[1]}", "up", 5, access)
    finally:
        server.shutdown()
    assert "HTTP 502" in str(exc.value) and "key-123456" not in str(exc.value)
    assert "***" in str(exc.value)
    assert "key-123456" not in repr(access)


def test_credential_options_are_checked_before_any_request(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9"  # never asked: every case fails before the first query
    scores = tmp_path / "s.jsonl"
    scores.write_text("")
    cases = [
        (["--prometheus-header", "X-Scope-OrgID"], "--prometheus-header 'X-Scope-OrgID': expected"),
        (["--prometheus-header", "Bad Name: v"], "expected 'Name: value' with a token name"),
        (["--prometheus-header", "Authorization: Bearer x"], "set Authorization with"),
        (["--prometheus-bearer-token", "t", "--prometheus-basic-auth", "u:p"], "not both"),
        (["--prometheus-basic-auth", "no-colon-secret"], "expected USER:PASSWORD"),
        (["--prometheus-bearer-token-file", tmp_path / "none"], "cannot read"),
        (["--prometheus-ca-file", tmp_path / "none.pem"], "no such file"),
    ]
    for args, expected in cases:
        res = gate("--prometheus", url, *versions(), *args)
        assert expected in error_line(res), (args, res.stderr)
        assert "no-colon-secret" not in res.stderr
    line = error_line(gate("--from-scores", scores, scores, "--prometheus-bearer-token", "t"))
    assert "--prometheus-bearer-token goes with --prometheus" in line
