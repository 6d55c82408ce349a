"""Render the Grafana dashboard's main panels with matplotlib from real Prometheus data.

No Grafana runs here, so this draws the panels of deploy/grafana/misalign-monitor.json (their own
queries) from a real Prometheus scraping a real sidecar: ordinary traffic, then a burst of flagged
requests until the flag-rate alert fires (tests/support/deploy_live.py, the same run as the CI test).

    python tests/support/render_dashboard.py            # writes docs/dashboard.png (about 1.5 min)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.support.deploy_live import (  # noqa: E402
    DASHBOARD,
    FLAG_ALERT,
    RATE_INTERVAL,
    live_stack,
)
from tests.support.prometheus import PrometheusServer  # noqa: E402

HEATMAP_FEATURE = "misaligned_persona"
PANELS = [
    "Requests scored / s",
    "Share of requests flagged",
    "Request score: $feature",
    "Score quantiles and threshold",
    "Mean shift (baseline σ)",
    "Token rows dropped / s",
    "Scoring latency",
    "Flag stream writes / s",
    "Review backlog",
]


def _expr(expr: str, feature: str = ".*") -> str:
    expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$feature", feature)
    return expr.replace("$model", ".*").replace("$version", ".*")


def _legend(fmt: str, metric: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt).strip()


def _heatmap(ax: Any, prom: PrometheusServer, expr: str, start: float, end: float) -> None:
    series = prom.query_range(_expr(expr, HEATMAP_FEATURE), start, end)
    les = sorted(series, key=lambda s: float(s["metric"]["le"]))
    edges = [float(s["metric"]["le"]) for s in les]
    finite = [e for e in edges if np.isfinite(e)]
    times = np.array([float(t) for t, _ in les[0]["values"]]) - start
    cum = np.array([[float(v) for _, v in s["values"]] for s in les])  # [buckets, time]
    counts = np.diff(cum, axis=0, prepend=0)[: len(finite)]
    y = np.array([finite[0] - 0.5, *finite])
    keep = (y[1:] > -6) & (y[:-1] < 8)
    rows = np.nonzero(keep)[0]
    ax.pcolormesh(
        times, y[rows[0] : rows[-1] + 2], counts[rows[0] : rows[-1] + 1, :-1], cmap="viridis"
    )
    for r in prom.query(f'max(misalign_feature_threshold{{feature="{HEATMAP_FEATURE}"}})'):
        ax.axhline(float(r["value"][1]), color="red", linestyle="--", linewidth=0.8)
    ax.set_ylabel("score (requests per bucket)")


def render(
    prom: PrometheusServer, start: float, end: float, out: Path, *, alert_at: float | None = None
) -> Path:
    dash = json.loads(DASHBOARD.read_text())
    panels = {p["title"]: p for p in dash["panels"] if p["type"] != "row"}
    fig, axes = plt.subplots(3, 3, figsize=(18, 11), constrained_layout=True)
    for ax, title in zip(axes.flat, PANELS, strict=True):
        panel = panels[title]
        shown = title.replace("$feature", HEATMAP_FEATURE)
        if panel["type"] == "heatmap":
            _heatmap(ax, prom, panel["targets"][0]["expr"], start, end)
        else:
            for target in panel["targets"]:
                for s in prom.query_range(_expr(target["expr"]), start, end):
                    t = np.array([float(x) for x, _ in s["values"]]) - start
                    v = np.array([float(y) for _, y in s["values"]])
                    ax.plot(t, v, label=_legend(target["legendFormat"], s["metric"]))
            unit = panel["fieldConfig"]["defaults"]["unit"]
            if unit == "percentunit":
                ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
            elif unit == "s":
                ax.set_ylabel("seconds")
            for step in panel["fieldConfig"]["defaults"]["thresholds"]["steps"][1:]:
                ax.axhline(step["value"], color="red", linestyle="--", linewidth=0.8)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="upper left")
        if alert_at is not None:
            ax.axvline(alert_at - start, color="red", linewidth=1.2, alpha=0.7)
        ax.set_title(shown, fontsize=11)
        ax.set_xlabel("seconds")
        ax.grid(alpha=0.3)
    fired = f"; red line: {FLAG_ALERT} firing" if alert_at else ""
    fig.suptitle(
        "misalign-monitor dashboard, rendered from a real Prometheus scraping a real sidecar "
        f"(ordinary traffic, then flagged requests{fired})",
        fontsize=12,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, live_stack(Path(tmp)) as live:
        start = time.time()
        live.send_faults()
        live.drive(35, flagged=False)
        live.drive(45, flagged=True, until_alert=FLAG_ALERT)
        live.drive(8, flagged=True)
        fired = next((t for t, s in live.states if s == "firing"), None)
        render(live.prom, start, time.time(), args.out, alert_at=fired)
        series = live.prom.query('count({job="misalign-sidecar"})')[0]["value"][1]
        score = live.prom.query("count(misalign_request_score_bucket)")[0]["value"][1]
    print(f"wrote {args.out}")
    print(f"series scraped from one sidecar (one model version): {series}, of them {score} buckets")
    if fired is not None:
        print(f"{FLAG_ALERT} fired {fired - start:.0f} s into the run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
