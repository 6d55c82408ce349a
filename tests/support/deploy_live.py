"""A real Prometheus, loaded with deploy/prometheus/rules.yml, scraping a real sidecar that receives
engine-like traffic over gRPC: ordinary requests, then a burst of flagged ones.

Used by tests/deploy/test_deploy_live.py and tests/support/render_dashboard.py (docs/dashboard.png).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from detectors import bundle as bundle_io
from service.sidecar_process import SidecarProcess, start_sidecar
from tests.support.prometheus import PrometheusServer
from tests.support.sidecar import request_rows, stream_requests
from wire import monitor_pb2 as pb
from wire import monitor_pb2_grpc as pb_grpc
from wire.codec import encode_step

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "misalign-monitor.json"
BUNDLE = bundle_io.load(bundle_io.default_bundle_path())
FLAG_ALERT = "MisalignFlagRateAboveBaseline"

# Production windows scaled to a test that lasts a minute: rates over 15 s (scrapes every 1 s),
# the "one day" flag baseline over 10 min, every `for:` 3 s.
WINDOWS = {"5m": "15s", "10m": "30s", "1h": "1m", "1d": "10m"}
RATE_INTERVAL = "15s"
FOR = "3s"
TICK_S = 0.25
REQUESTS_PER_TICK = 2


def scaled_rules(text: str) -> str:
    """The rule file with its range windows and `for:` durations shortened (nothing else)."""

    def window(m: re.Match[str]) -> str:
        if m.group(1) not in WINDOWS:
            raise ValueError(f"{RULES}: window [{m.group(1)}] has no test scale in WINDOWS")
        return f"[{WINDOWS[m.group(1)]}]"

    text = re.sub(r"\[(\d+[smhd])\]", window, text)
    return re.sub(r"(\n\s+for: )(?!0m)\d+[smh]", rf"\g<1>{FOR}", text)


VARIABLES = ("model", "version", "feature")  # the dashboard's query variables
ALL = ".*"  # what Grafana puts in for "All" (each variable's allValue)


def regex_escape(value: str) -> str:
    """A chosen value as Grafana's Prometheus data source puts it in a ``=~"..."`` matcher: its
    regex metacharacters escaped, then escaped again for the PromQL string."""
    regex = re.sub(r"([\\^$*+?.()|\[\]{}])", r"\\\1", value)
    return regex.replace("\\", "\\\\").replace('"', '\\"')


def fill(expr: str, values: Mapping[str, str] | None = None) -> str:
    """``expr`` with the template variables replaced as Grafana does: a chosen single value
    escaped, any variable not in ``values`` as "All"; ``$__rate_interval`` at the test's scale."""
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    for var in VARIABLES:
        chosen = (values or {}).get(var)
        expr = expr.replace(f"${var}", ALL if chosen is None else regex_escape(chosen))
    return expr


def uses_variables(expr: str) -> bool:
    return any(f"${var}" in expr for var in VARIABLES)


def panel_targets() -> list[tuple[str, str]]:
    """``(panel title, PromQL as written in the dashboard)`` of every panel query."""
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def panel_queries(values: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` of every dashboard panel query, Grafana's variables filled in
    from ``values`` (the dashboard's "All" for any not given)."""
    return [(title, fill(expr, values)) for title, expr in panel_targets()]


def template_variables() -> dict[str, tuple[str | None, str]]:
    """The dashboard's ``label_values`` variables: name -> (series selector or None, label)."""
    dash = json.loads(DASHBOARD.read_text())
    out = {}
    for v in dash["templating"]["list"]:
        if v["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((?:(.+),\s*)?(\w+)\)", v["query"]["query"])
        if m is None:
            raise ValueError(f"{v['name']}: not a label_values() query: {v['query']['query']}")
        out[v["name"]] = (m.group(1), m.group(2))
    return out


def _requests(rng: np.random.Generator, tick: int, flagged: bool) -> list[tuple[Any, ...]]:
    """Request rows whose token scores sit around each feature's benign baseline (half its spread,
    so ordinary requests never pass a threshold); a flagged request puts misaligned_persona 3
    above its threshold."""
    out = []
    for j in range(REQUESTS_PER_TICK):
        n_prompt, n_resp = 6, 12
        center = np.array(
            [
                f.calibration.baseline_mean + 0.5 * f.calibration.baseline_std * rng.normal()
                if f.calibration
                else 0.0
                for f in BUNDLE.spec.features
            ]
        )
        if flagged and j == 0:
            c0 = BUNDLE.spec.features[0].calibration
            assert c0 is not None
            center[0] = c0.threshold + 3.0
        scores = center + 0.1 * rng.normal(size=(n_prompt + n_resp, BUNDLE.k))
        proj = (scores - BUNDLE.bias).astype(np.float32)  # the sidecar adds the bias back
        out.append(request_rows(f"t{tick}-{j}", proj, n_prompt, seed=tick))
    return out


@dataclass
class Live:
    sidecar: SidecarProcess
    prom: PrometheusServer
    channel: grpc.Channel
    stub: pb_grpc.MonitorStub
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    tick: int = 0
    dropped_rows: int = 0
    dropped_steps: int = 0
    states: list[tuple[float, str]] = field(default_factory=list)
    # (model, model_version) of every request the traffic finished: the labels it was scored as
    models: set[tuple[str, str]] = field(default_factory=set)

    def send_tick(self, flagged: bool) -> None:
        batches = list(
            stream_requests(BUNDLE.bundle_id, BUNDLE.k, _requests(self.rng, self.tick, flagged))
        )
        self.models |= {(f.model, f.model_version) for b in batches for f in b.finished}
        # The tap's own losses ride in every batch as cumulative counts (side="inference").
        self.dropped_rows += 3
        self.dropped_steps += 1
        batches[0].drops.rows_by_reason["queue_full"] = self.dropped_rows
        batches[0].drops.steps_by_reason["queue_full"] = self.dropped_steps
        self.stub.Ingest(iter(batches), timeout=30)
        self.tick += 1

    def send_faults(self) -> None:
        """One of each event that only the faults make visible: an unfinished request (expires),
        a finish for a request never seen, and a malformed batch (refused)."""
        rid, pos, tok, roles, proj = _requests(self.rng, 10_000 + self.tick, False)[0]
        self.stub.Ingest(
            iter(
                [
                    encode_step(
                        BUNDLE.bundle_id,
                        BUNDLE.k,
                        [(f"abandoned-{self.tick}", pos, tok, roles, proj)],
                        sender_id="faults",
                        finished=[pb.FinishedRequest(request_id=f"never-seen-{self.tick}")],
                    )
                ]
            ),
            timeout=30,
        )
        bad = encode_step(BUNDLE.bundle_id, BUNDLE.k, [(rid, pos, tok, roles, proj * np.nan)])
        with contextlib.suppress(grpc.RpcError):
            self.stub.Ingest(iter([bad]), timeout=30)

    def drive(self, seconds: float, *, flagged: bool, until_alert: str | None = None) -> None:
        """Send a tick of traffic every TICK_S for ``seconds`` (or until ``until_alert`` fires),
        noting the flag-rate alert's state about once a second."""
        end = time.monotonic() + seconds
        next_check = 0.0
        while time.monotonic() < end:
            t0 = time.monotonic()
            self.send_tick(flagged)
            if t0 >= next_check:
                state = self.prom.alert_state(FLAG_ALERT)
                self.states.append((time.time(), state))
                next_check = t0 + 1.0
                if until_alert and state == "firing":
                    return
            time.sleep(max(0.0, TICK_S - (time.monotonic() - t0)))


@contextlib.contextmanager
def live_stack(workdir: Path) -> Iterator[Live]:
    """A sidecar (embedded Redis, requests expire after 1 s) and a Prometheus scraping it with
    the scaled rules; yields once the first scrape succeeded."""
    workdir.mkdir(parents=True, exist_ok=True)
    rules = workdir / "rules.yml"
    rules.write_text(scaled_rules(RULES.read_text()))
    with (
        start_sidecar(
            workdir / "sidecar",
            env={"MISALIGN_REQUEST_TIMEOUT_S": "1"},
            log=(workdir / "sidecar.log").open("wb"),
        ) as sidecar,
        PrometheusServer(
            workdir / "prometheus", [f"127.0.0.1:{sidecar.metrics_port}"], rule_files=[rules]
        ) as prom,
        grpc.insecure_channel(sidecar.address) as channel,
    ):
        prom.wait_for_target_up()
        yield Live(sidecar, prom, channel, pb_grpc.MonitorStub(channel))
