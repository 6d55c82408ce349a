"""A real Prometheus server (Debian's ``/usr/bin/prometheus``) for tests and scripts.

It scrapes the given targets every second, evaluates the given rule files every second, keeps its
TSDB in a directory of its own and listens on a free loopback port::

    with PrometheusServer(tmp_path / "prom", ["127.0.0.1:9464"], rule_files=[rules]) as prom:
        prom.wait_for_target_up()
        prom.query('sum(rate(misalign_requests_scored_total[10s]))')
        prom.alerts()
"""

from __future__ import annotations

import base64
import json
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from service.processes import stop_process
from service.vllm_server import free_port
from tests.support.polling import poll

PROMETHEUS = "/usr/bin/prometheus"
JOB = "misalign-sidecar"  # the job name the alert rules and dashboard select on

T = TypeVar("T")


class PrometheusError(RuntimeError):
    pass


class PrometheusServer:
    def __init__(
        self,
        workdir: Path,
        targets: Sequence[str],
        *,
        rule_files: Sequence[Path] = (),
        job: str = JOB,
        scrape_interval: str = "1s",
        evaluation_interval: str = "1s",
        binary: str = PROMETHEUS,
        web_config: dict[str, Any] | None = None,
        client_auth: tuple[str, str] | None = None,
        ca_file: Path | None = None,
    ) -> None:
        """``targets``: ``host:port`` of ``/metrics`` endpoints (scraped as job ``job``).

        ``web_config``: Prometheus's ``--web.config.file`` (TLS, basic auth with bcrypt hashes);
        then ``client_auth`` and ``ca_file`` are what this helper's own calls use, and ``url``
        is ``https://localhost:PORT`` when TLS is on (the test certificates name localhost)."""
        if shutil.which(binary) is None:
            raise PrometheusError(
                f"{binary} not found: install Debian's prometheus package (make setup does)"
            )
        self.workdir = workdir
        self.binary = binary
        self.config = {
            "global": {
                "scrape_interval": scrape_interval,
                "scrape_timeout": scrape_interval,
                "evaluation_interval": evaluation_interval,
            },
            "rule_files": [str(Path(p).resolve()) for p in rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": list(targets)}]},
            ],
        }
        self.web_config = web_config
        self.client_auth = client_auth
        self.ca_file = ca_file
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.web_config and "tls_server_config" in self.web_config:
            return f"https://localhost:{self.port}"
        return f"http://127.0.0.1:{self.port}"

    def _open(self, url: str, timeout: float) -> Any:
        headers = {}
        if self.client_auth is not None:
            raw = ":".join(self.client_auth).encode()
            headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
        context = ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else None
        return urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout, context=context
        )

    @property
    def log_path(self) -> Path:
        return self.workdir / "prometheus.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout_s: float = 60.0) -> PrometheusServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.port = free_port()
        web = []
        if self.web_config is not None:
            web_file = self.workdir / "web.yml"
            web_file.write_text(yaml.safe_dump(self.web_config, sort_keys=False))
            web = [f"--web.config.file={web_file}"]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--web.enable-lifecycle",
                    # Debian's defaults point at /usr/share/prometheus/consoles; not needed here.
                    f"--web.console.templates={self.workdir}",
                    f"--web.console.libraries={self.workdir}",
                    "--log.level=warn",
                    *web,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise PrometheusError(
                    f"prometheus exited with status {self.proc.returncode}:\n{self.log()[-2000:]}"
                )
            try:
                with self._open(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise PrometheusError(f"prometheus not ready within {timeout_s:.0f} s")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 20)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # HTTP API

    def api(self, path: str, **params: str) -> Any:
        """``GET /api/v1/<path>``; returns the ``data`` field, raises with Prometheus's error."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with self._open(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
            raise PrometheusError(
                f"{path} {params}: {body.get('errorType')}: {body.get('error')}"
            ) from exc
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query; the result list (vector: ``{"metric", "value"}`` items)."""
        params = {"query": promql}
        if at is not None:
            params["time"] = repr(at)
        data = self.api("query", **params)
        result = data["result"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": result}]
        return list(result)

    def query_range(
        self, promql: str, start: float, end: float, step: float = 1.0
    ) -> list[dict[str, Any]]:
        """Range query; the result list (matrix: ``{"metric", "values"}`` items)."""
        data = self.api(
            "query_range", query=promql, start=repr(start), end=repr(end), step=repr(step)
        )
        return list(data["result"])

    def alerts(self) -> list[dict[str, Any]]:
        """Active alerts (pending or firing): ``{"labels", "annotations", "state", ...}``."""
        return list(self.api("alerts")["alerts"])

    def alert_state(self, name: str) -> str:
        """``inactive``, ``pending`` or ``firing`` (the most advanced of the alert's series)."""
        states = {a["state"] for a in self.alerts() if a["labels"].get("alertname") == name}
        for s in ("firing", "pending"):
            if s in states:
                return s
        return "inactive"

    def rule_groups(self) -> list[dict[str, Any]]:
        """Every loaded rule group: ``{"name", "file", "rules", ...}``, each rule with its
        ``health`` (``ok``, ``err``, or ``unknown`` until first evaluated) and ``lastError``."""
        return list(self.api("rules")["groups"])

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule, with its health and last error."""
        return [r for g in self.rule_groups() for r in g["rules"]]

    def label_values(self, label: str, match: str | None = None) -> list[str]:
        """``GET /api/v1/label/<label>/values``, restricted to the series ``match`` selects (as
        Grafana asks for a ``label_values(selector, label)`` template variable)."""
        params = {"match[]": match} if match is not None else {}
        return list(self.api(f"label/{urllib.parse.quote(label)}/values", **params))

    def targets(self) -> list[dict[str, Any]]:
        return list(self.api("targets")["activeTargets"])

    def wait_for_target_up(self, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """Wait until every target has been scraped successfully; returns the targets."""

        def all_up() -> list[dict[str, Any]] | None:
            targets = self.targets()
            return targets if targets and all(t["health"] == "up" for t in targets) else None

        return poll(all_up, timeout_s, "every target to be scraped", every=0.5)
