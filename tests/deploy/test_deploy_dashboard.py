"""deploy/grafana: the generated dashboard is current, names only metrics a real sidecar exports,
and is laid out as Grafana expects; the provisioning files point at it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from scripts import gen_deploy
from tests.support import ROOT

GRAFANA = ROOT / "deploy" / "grafana"


@pytest.fixture(scope="module")
def generated() -> dict[Path, str | bytes]:
    """What scripts/gen_deploy.py would write now (it starts a real sidecar to read /metrics)."""
    return gen_deploy.render()


def test_generated_files_are_up_to_date(generated: dict[Path, str | bytes]) -> None:
    stale = [
        p
        for p, content in generated.items()
        if p.read_bytes() != (content.encode() if isinstance(content, str) else content)
    ]
    assert stale == [], "run: .venv/bin/python scripts/gen_deploy.py"


def test_generator_refuses_a_panel_naming_an_unknown_metric() -> None:
    dash = gen_deploy.dashboard()
    dash["panels"][1]["targets"][0]["expr"] = "sum(rate(misalign_requests_scord_total[5m]))"
    known = gen_deploy.registered_metric_names() | gen_deploy.recorded_names() | {"up"}
    with pytest.raises(SystemExit, match="misalign_requests_scord_total"):
        gen_deploy.check_names(dash, known)


def test_dashboard_layout() -> None:
    dash = json.loads((GRAFANA / "misalign-monitor.json").read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert {"datasource", "model", "version", "feature"} <= set(variables)
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert rows == [
        "Traffic and flags",
        "Score distributions",
        "Drift from the calibration baseline",
        "Tap and queue health",
    ]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
    heat = next(p for p in dash["panels"] if p["type"] == "heatmap")
    assert heat["repeat"] == "feature"
    assert heat["targets"][0]["format"] == "heatmap"
    assert "misalign_request_score_bucket" in heat["targets"][0]["expr"]
    # Every panel query filters on the template variables where its metric has those labels.
    for p in dash["panels"]:
        for t in p.get("targets", []):
            if re.search(
                r"misalign_(request_score|requests_scored|requests_flagged|drift)", t["expr"]
            ):
                assert 'model_version=~"$version"' in t["expr"], p["title"]


def test_provisioning_points_at_the_dashboard() -> None:
    providers = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "misalign-monitor.yaml").read_text()
    )["providers"]
    folder = providers[0]["options"]["path"]
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/misalign-monitor.json:{folder}/misalign-monitor.json:ro" in mounts
    sources = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )["datasources"]
    assert sources[0]["type"] == "prometheus" and sources[0]["isDefault"]


def test_dashboard_links_to_vllms_dashboards_and_the_review_page() -> None:
    dash = json.loads((GRAFANA / "misalign-monitor.json").read_text())
    links = {link["title"]: link for link in dash["links"]}
    vllm = links["vLLM"]
    assert vllm["type"] == "dashboards" and vllm["tags"] == ["vllm"] and vllm["keepTime"]
    review = links["Review flagged samples"]
    assert review["type"] == "link"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    (used,) = re.findall(r"\$\{(\w+)\}", review["url"])
    assert variables[used]["type"] == "textbox"
    # The default is where docs/deploy.md port-forwards the review Service.
    assert variables[used]["query"] in (ROOT / "docs" / "deploy.md").read_text()
    # Every query selects the model by vLLM's label name, so it joins vLLM's series.
    for p in dash["panels"]:
        for t in p.get("targets", []):
            assert not re.search(r"\bmodel=~", t["expr"]), p["title"]
    assert variables["model"]["query"]["query"].endswith(", model_name)")
