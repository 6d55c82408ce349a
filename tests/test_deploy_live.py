"""The dashboard and the alert rules against a real Prometheus (Debian's) scraping a real sidecar
fed over gRPC: every panel query returns data, and the flag-rate alert goes from inactive to
firing when a burst of flagged requests follows ordinary traffic."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from tests.deploy_live import FLAG_ALERT, live_stack, panel_queries


@pytest.mark.slow
def test_real_prometheus_dashboard_queries_and_flag_rate_alert(tmp_path: Path) -> None:
    from scripts.render_dashboard import render

    with live_stack(tmp_path) as live:
        bad = [r for r in live.prom.rules() if r["health"] not in ("ok", "unknown")]
        assert bad == [], bad
        start = time.time()
        live.send_faults()
        # Ordinary traffic long enough for the baseline and every rate window to fill.
        live.drive(35, flagged=False)
        normal = [s for _, s in live.states]
        assert normal and set(normal) == {"inactive"}, normal
        burst_start = time.time()
        live.drive(45, flagged=True, until_alert=FLAG_ALERT)
        fired_at = next((t for t, s in live.states if s == "firing"), None)
        assert fired_at is not None, live.states[-10:]
        assert fired_at - burst_start < 40
        firing = [a for a in live.prom.alerts() if a["labels"]["alertname"] == FLAG_ALERT]
        assert {a["labels"]["feature"] for a in firing if a["state"] == "firing"} == {
            "misaligned_persona"
        }
        assert all(a["annotations"]["runbook"] for a in firing)

        empty = []
        for title, expr in panel_queries():
            result = live.prom.query(expr)
            values = [float(r["value"][1]) for r in result]
            if not any(math.isfinite(v) for v in values):
                empty.append(f"{title}: {expr} -> {values}")
        assert empty == [], "\n".join(empty)

        png = render(live.prom, start, time.time(), tmp_path / "dashboard.png", alert_at=fired_at)
        assert png.stat().st_size > 50_000
