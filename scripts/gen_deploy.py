"""Generate deploy/ files from their sources, so they cannot drift from the code:

- ``deploy/grafana/misalign-monitor.json``: the Grafana dashboard. Every metric a panel names
  must be exported by the sidecar (read from the ``/metrics`` of a real sidecar started on the
  shipped bundle) or recorded by ``deploy/prometheus/rules.yml``; otherwise this script fails.
- ``deploy/k8s/components/misalign-sidecar/prometheusrule.yaml``: ``deploy/prometheus/rules.yml``
  wrapped in a Prometheus Operator ``PrometheusRule``.
- ``deploy/k8s/components/misalign-sidecar/bundle.safetensors``: a copy of the shipped direction
  bundle, which the Component's ``configMapGenerator`` makes a ConfigMap of (kustomize reads only
  files inside the kustomization; a bundle for a 4,096-wide model with 16 features is 256 KiB,
  under the 1 MiB ConfigMap limit).

    python scripts/gen_deploy.py            # write them
    python scripts/gen_deploy.py --check    # exit 1 if a generated file is out of date (make lint)
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "misalign-monitor.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
COMPONENT = ROOT / "deploy" / "k8s" / "components" / "misalign-sidecar"
PROMETHEUS_RULE = COMPONENT / "prometheusrule.yaml"
BUNDLE_COPY = COMPONENT / "bundle.safetensors"
JOB = "misalign-sidecar"

# Series Prometheus makes itself for every target.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds"}

# The dashboard variable stays "model"; the label is vLLM's name for it (service.metrics.MODEL_LABEL).
SEL = 'model_name=~"$model", model_version=~"$version"'
FSEL = f'{SEL}, feature=~"$feature"'
RI = "$__rate_interval"

# Where docs/deploy.md's `kubectl port-forward svc/misalign-review 8642` serves the review page;
# set the dashboard's review_url variable to the address auditors use.
REVIEW_URL = "http://localhost:8642"
# vLLM's own dashboards (its example Grafana dashboard, the production-stack's), found by the tag
# `vllm`, opened on the same time range; and the review page, opened on its queue.
LINKS = [
    {
        "title": "vLLM",
        "type": "dashboards",
        "tags": ["vllm"],
        "asDropdown": True,
        "includeVars": False,
        "keepTime": True,
        "targetBlank": False,
    },
    {
        "title": "Review flagged samples",
        "type": "link",
        "url": "${review_url}/",
        "tooltip": "The auditors' review page: the queue of flagged samples",
        "icon": "external link",
        "targetBlank": True,
    },
]


def registered_metric_names() -> set[str]:
    """Every series name a real sidecar exports: its ``/metrics`` lists each registered family
    (``# TYPE`` line) even before the family has samples."""
    sys.path.insert(0, str(ROOT))
    from service.sidecar_process import start_sidecar

    with (
        tempfile.TemporaryDirectory() as tmp,
        start_sidecar(Path(tmp)) as sidecar,
        urllib.request.urlopen(sidecar.metrics_url, timeout=10) as r,
    ):
        text = r.read().decode()
    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.update(name + s for s in suffixes.get(kind, ("",)))
    return names


def recorded_names() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["record"] for g in groups for r in g["rules"] if "record" in r}


def _target(expr: str, legend: str, ref: str, **extra: Any) -> dict[str, Any]:
    return {
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "expr": expr,
        "legendFormat": legend,
        "refId": ref,
        **extra,
    }


class Layout:
    """Panels on Grafana's 24-column grid, row by row."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.y = 0
        self.x = 0
        self.next_id = 1

    def row(self, title: str) -> None:
        if self.x:
            self.y += 8
            self.x = 0
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "id": self._id(),
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.y += 1

    def panel(
        self,
        title: str,
        targets: list[tuple[str, str]],
        *,
        kind: str = "timeseries",
        unit: str = "short",
        width: int = 8,
        description: str = "",
        thresholds: list[float] | None = None,
        **extra: Any,
    ) -> None:
        if self.x + width > 24:
            self.y += 8
            self.x = 0
        steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
        steps += [{"color": "red", "value": t} for t in thresholds or []]
        field: dict[str, Any] = {
            "defaults": {
                "unit": unit,
                "thresholds": {"mode": "absolute", "steps": steps},
            },
            "overrides": [],
        }
        if thresholds and kind == "timeseries":
            field["defaults"]["custom"] = {"thresholdsStyle": {"mode": "dashed"}}
        self.panels.append(
            {
                "type": kind,
                "title": title,
                "description": description,
                "id": self._id(),
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": width, "x": self.x, "y": self.y},
                "fieldConfig": field,
                "targets": [
                    _target(expr, legend, chr(ord("A") + i), **extra.pop("target_extra", {}))
                    for i, (expr, legend) in enumerate(targets)
                ],
                **extra,
            }
        )
        self.x += width

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": f"{name}-values"},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def dashboard() -> dict[str, Any]:
    L = Layout()
    L.row("Traffic and flags")
    L.panel(
        "Requests scored / s",
        [
            (
                f"sum by (model_name, model_version) (rate(misalign_requests_scored_total{{{SEL}}}[{RI}]))",
                "{{model_name}} {{model_version}}",
            )
        ],
        unit="reqps",
    )
    L.panel(
        "Share of requests flagged",
        [
            (
                f"sum by (model_version, feature) (rate(misalign_requests_flagged_total{{{FSEL}}}[{RI}]))"
                " / ignoring (feature) group_left"
                f" sum by (model_version) (rate(misalign_requests_scored_total{{{SEL}}}[{RI}]))",
                "{{model_version}} {{feature}}",
            )
        ],
        unit="percentunit",
        description="Each feature's threshold is calibrated at 1% false positives on benign traffic.",
        thresholds=[0.03],
    )
    L.panel(
        "Flagged / s",
        [
            (
                f"sum by (model_version, feature) (rate(misalign_requests_flagged_total{{{FSEL}}}[{RI}]))",
                "{{model_version}} {{feature}}",
            )
        ],
        unit="reqps",
    )
    L.panel(
        "Token rows ingested / s",
        [
            (
                "sum by (bundle) (rate(misalign_tokens_ingested_total[$__rate_interval]))",
                "{{bundle}}",
            )
        ],
        unit="short",
    )
    L.panel(
        "Engine steps ingested / s",
        [("sum by (bundle) (rate(misalign_steps_ingested_total[$__rate_interval]))", "{{bundle}}")],
        unit="short",
    )
    L.panel(
        "Running requests",
        [("sum by (instance) (misalign_active_requests)", "{{instance}}")],
    )

    L.row("Score distributions")
    L.panel(
        "Request score: $feature",
        [
            (
                f"sum by (le) (increase(misalign_request_score_bucket{{{FSEL}}}[{RI}]))",
                "{{le}}",
            )
        ],
        kind="heatmap",
        width=12,
        repeat="feature",
        repeatDirection="h",
        description="Requests per score bucket; the buckets include the threshold and the benign deciles.",
        options={"calculate": False, "yAxis": {"unit": "short"}, "cellGap": 1},
        target_extra={"format": "heatmap"},
    )
    L.panel(
        "Score quantiles and threshold",
        [
            (
                f"histogram_quantile(0.5, sum by (feature, le) (rate(misalign_request_score_bucket{{{FSEL}}}[{RI}])))",
                "p50 {{feature}}",
            ),
            (
                f"histogram_quantile(0.99, sum by (feature, le) (rate(misalign_request_score_bucket{{{FSEL}}}[{RI}])))",
                "p99 {{feature}}",
            ),
            (
                'max by (feature) (misalign_feature_threshold{feature=~"$feature"})',
                "threshold {{feature}}",
            ),
        ],
        width=12,
    )

    L.row("Drift from the calibration baseline")
    L.panel(
        "Mean shift (baseline σ)",
        [(f"misalign_drift_mean_shift_sigmas{{{FSEL}}}", "{{model_version}} {{feature}}")],
        width=6,
        thresholds=[1.0],
    )
    L.panel(
        "PSI",
        [(f"misalign_drift_psi{{{FSEL}}}", "{{model_version}} {{feature}}")],
        width=6,
        thresholds=[0.25],
    )
    L.panel(
        "KS statistic",
        [(f"misalign_drift_ks{{{FSEL}}}", "{{model_version}} {{feature}}")],
        width=6,
    )
    L.panel(
        "Requests in the drift window",
        [(f"misalign_drift_window_requests{{{FSEL}}}", "{{model_version}} {{feature}}")],
        width=6,
    )

    L.row("Tap and queue health")
    L.panel(
        "Token rows dropped / s",
        [
            (
                "sum by (side, reason) (rate(misalign_rows_dropped_total[$__rate_interval]))",
                "{{side}} {{reason}}",
            )
        ],
        description='side="inference": the tap could not send; side="sidecar": refused on arrival.',
    )
    L.panel(
        "Engine steps dropped / s",
        [
            (
                "sum by (side, reason) (rate(misalign_steps_dropped_total[$__rate_interval]))",
                "{{side}} {{reason}}",
            )
        ],
    )
    L.panel(
        "Requests expired / s",
        [
            (
                "sum by (reason) (rate(misalign_requests_expired_total[$__rate_interval]))",
                "{{reason}}",
            )
        ],
    )
    L.panel(
        "Scoring latency",
        [
            (
                "histogram_quantile(0.5, sum by (le) (rate(misalign_scoring_latency_seconds_bucket[$__rate_interval])))",
                "p50",
            ),
            (
                "histogram_quantile(0.99, sum by (le) (rate(misalign_scoring_latency_seconds_bucket[$__rate_interval])))",
                "p99",
            ),
        ],
        unit="s",
        description="From a request's finish arriving to its score being available.",
    )
    L.panel(
        "Flag buffer (samples waiting for Redis)",
        [
            ("sum by (instance) (misalign_queue_buffered)", "buffered {{instance}}"),
            ("sum by (instance) (misalign_queue_buffer_capacity)", "capacity {{instance}}"),
        ],
    )
    L.panel(
        "Flag stream writes / s",
        [
            ("sum(rate(misalign_queue_pushes_total[$__rate_interval]))", "written"),
            ("sum(rate(misalign_queue_duplicates_total[$__rate_interval]))", "duplicate"),
            ("sum(rate(misalign_queue_push_failures_total[$__rate_interval]))", "failed"),
            ("sum(rate(misalign_queue_dropped_total[$__rate_interval]))", "dropped"),
        ],
    )
    L.panel(
        "Review backlog",
        [
            ("max(misalign_review_backlog)", "undecided"),
            ("max(misalign_review_dead_letter)", "dead letters"),
        ],
        description="Flagged samples the reviewers' group has not decided yet (one Redis, so max over sidecars).",
    )
    L.panel(
        "Refused messages / s",
        [
            (
                "sum by (rpc, reason) (rate(misalign_ingest_errors_total[$__rate_interval]))",
                "{{rpc}} {{reason}}",
            ),
            (
                "sum by (reason) (rate(misalign_finishes_ignored_total[$__rate_interval]))",
                "finish ignored: {{reason}}",
            ),
        ],
    )
    L.panel(
        "Sidecars up",
        [(f'up{{job="{JOB}"}}', "{{instance}}")],
        kind="stat",
        options={"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "background"},
    )
    return {
        "title": "misalign-monitor",
        "uid": "misalign-monitor",
        "description": "Generated by scripts/gen_deploy.py from the metrics the sidecar registers; do not edit by hand.",
        "tags": ["misalign-monitor"],
        "editable": False,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "utc",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                },
                _variable(
                    "model", "model", "label_values(misalign_requests_scored_total, model_name)"
                ),
                _variable(
                    "version",
                    "version",
                    'label_values(misalign_requests_scored_total{model_name=~"$model"}, model_version)',
                ),
                _variable(
                    "feature", "feature", "label_values(misalign_feature_threshold, feature)"
                ),
                {
                    "name": "review_url",
                    "label": "review page",
                    "type": "textbox",
                    "description": "Where the review page is served (the dashboard's link to it)",
                    "query": REVIEW_URL,
                    "current": {"text": REVIEW_URL, "value": REVIEW_URL},
                },
            ]
        },
        "links": LINKS,
        "annotations": {"list": []},
        "panels": L.panels,
    }


# A sidecar metric, a recorded one (level:misalign_metric:operations), or Prometheus's `up`.
METRIC = re.compile(r"\b((?:[a-z_]+:)?misalign_[A-Za-z0-9_:]*|up)\b")


def queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """``(panel title, expr)`` of every panel query and template variable."""
    out = [
        (p["title"], t["expr"]) for p in dash["panels"] if p["type"] != "row" for t in p["targets"]
    ]
    out += [
        (f"variable {v['name']}", v["definition"])
        for v in dash["templating"]["list"]
        if v["type"] == "query"
    ]
    return out


def check_names(dash: dict[str, Any], known: set[str]) -> None:
    missing = sorted(
        {
            f"{title!r}: {name}"
            for title, expr in queries(dash)
            for name in METRIC.findall(expr)
            if name not in known
        }
    )
    if missing:
        raise SystemExit(
            "dashboard panels name metrics the sidecar does not register and no rule records:\n  "
            + "\n  ".join(missing)
        )


def prometheus_rule() -> str:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "misalign-monitor",
            "labels": {"app.kubernetes.io/name": "misalign-monitor", "release": "prometheus"},
        },
        "spec": {"groups": groups},
    }
    head = "# Generated by scripts/gen_deploy.py from deploy/prometheus/rules.yml; do not edit.\n"
    return head + yaml.safe_dump(doc, sort_keys=False, width=100)


def bundle_bytes() -> bytes:
    sys.path.insert(0, str(ROOT))
    from detectors import bundle as bundle_io

    return bundle_io.default_bundle_path().read_bytes()


def render() -> dict[Path, str | bytes]:
    dash = dashboard()
    check_names(dash, registered_metric_names() | recorded_names() | PROMETHEUS_SERIES)
    return {
        DASHBOARD: json.dumps(dash, indent=2, ensure_ascii=False) + "\n",
        PROMETHEUS_RULE: prometheus_rule(),
        BUNDLE_COPY: bundle_bytes(),
    }


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from scripts.generated import write_or_check

    return write_or_check("gen_deploy.py", __doc__.split("\n\n")[0], render)


if __name__ == "__main__":
    sys.exit(main())
