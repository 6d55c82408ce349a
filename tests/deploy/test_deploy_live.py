"""The dashboard and the alert rules against a real Prometheus (Debian's) scraping a real sidecar
fed over gRPC: every panel query returns data, the flag-rate alert goes from inactive to firing
when a burst of flagged requests follows ordinary traffic, every rule evaluates without error on
that data, and the dashboard's template variables list what the traffic used and filter the
panels by it."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import yaml

from tests.support.deploy_live import (
    BUNDLE,
    FLAG_ALERT,
    RULES,
    fill,
    live_stack,
    panel_queries,
    panel_targets,
    template_variables,
    uses_variables,
)


@pytest.mark.slow
def test_real_prometheus_dashboard_queries_and_flag_rate_alert(tmp_path: Path) -> None:
    from tests.support.render_dashboard import render

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
        assert all(a["annotations"]["runbook_url"] for a in firing)

        empty = []
        for title, expr in panel_queries():
            result = live.prom.query(expr)
            values = [float(r["value"][1]) for r in result]
            if not any(math.isfinite(v) for v in values):
                empty.append(f"{title}: {expr} -> {values}")
        assert empty == [], "\n".join(empty)

        # Every rule again, now that each has evaluated over real data (before the traffic,
        # "unknown" was allowed; some errors, many-to-many matches say, only come with data).
        groups = {g["name"]: g["rules"] for g in live.prom.rule_groups()}
        written = yaml.safe_load(RULES.read_text())["groups"]
        assert {n: len(r) for n, r in groups.items()} == {
            g["name"]: len(g["rules"]) for g in written
        }
        unhealthy = [
            (group, r["name"], r["health"], r.get("lastError"))
            for group, rules in groups.items()
            for r in rules
            if r["health"] != "ok"
        ]
        assert unhealthy == [], unhealthy

        # The template variables, asked of Prometheus as Grafana asks (label values of the
        # series the variable's selector picks), list exactly what the traffic used.
        variables = template_variables()
        assert set(variables) == {"model", "version", "feature"}

        def options(name: str, **chosen: str) -> set[str]:
            selector, label = variables[name]
            match = None if selector is None else fill(selector, chosen)
            return set(live.prom.label_values(label, match))

        ((model, version),) = live.models  # tests.support.sidecar labels every request ("m", "v1")
        flagged = BUNDLE.spec.features[0].name
        assert options("model") == {model}
        assert options("version") == {version}
        assert options("version", model=model) == {version}
        assert options("version", model="no-such-model") == set()
        calibrated = {f.name for f in BUNDLE.spec.features if f.calibration is not None}
        assert flagged in calibrated and options("feature") == calibrated

        # Panels with the variables set to one value each: data, and only for that value...
        chosen = {"model": model, "version": version, "feature": flagged}
        filtered = [(t, e) for t, e in panel_targets() if uses_variables(e)]
        assert len(filtered) >= 10, filtered
        empty, leaked = [], []
        for title, expr in filtered:
            result = live.prom.query(fill(expr, chosen))
            if not any(math.isfinite(float(r["value"][1])) for r in result):
                empty.append(f"{title}: {fill(expr, chosen)} -> {result}")
            for r in result:
                got = {k: r["metric"].get(k) for k in ("model_name", "model_version", "feature")}
                want = {"model_name": model, "model_version": version, "feature": flagged}
                if any(v is not None and v != want[k] for k, v in got.items()):
                    leaked.append(f"{title}: {r['metric']}")
        assert empty == [], "\n".join(empty)
        assert leaked == [], "\n".join(leaked)
        # ...and none for a value no series has.
        absent = {"model": "no-such-model", "version": "v0.none", "feature": "no_such_feature"}
        found = [
            f"{title}: {fill(expr, absent)}"
            for title, expr in filtered
            if live.prom.query(fill(expr, absent))
        ]
        assert found == [], "\n".join(found)

        png = render(live.prom, start, time.time(), tmp_path / "dashboard.png", alert_at=fired_at)
        assert png.stat().st_size > 50_000
