"""deploy/prometheus: the rules load, every alert is unit-tested with `promtool test rules`, names
only metrics the sidecar registers, names its recording rules level:metric:operations, and carries
a summary, a description and a runbook_url whose anchor docs/runbooks.md has."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from scripts import gen_deploy
from tests.support import ROOT

RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
TESTS = ROOT / "deploy" / "prometheus" / "tests"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
ANNOTATIONS = {"summary", "description", "runbook_url"}
PROMTOOL = "/usr/bin/promtool"


def rules() -> list[dict]:  # type: ignore[type-arg]
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_rules_load_with_promtool() -> None:
    out = promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules())} rules found" in out.stdout


def test_promtool_unit_tests_pass_on_the_shipped_files(tmp_path: Path) -> None:
    # As an ops team's CI runs them: the shipped files, nothing copied or stripped, from another
    # directory (promtool finds rule_files relative to each test file).
    files = sorted(TESTS.glob("*.yml"))
    assert files
    out = promtool("test", "rules", *map(str, files), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("SUCCESS") == len(files)


def test_every_firing_expectation_lists_the_annotations() -> None:
    for f in TESTS.glob("*.yml"):
        for case in yaml.safe_load(f.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                for alert in check["exp_alerts"]:
                    notes = alert.get("exp_annotations", {})
                    assert set(notes) == ANNOTATIONS, f"{f.name}: {check['alertname']}"


def test_a_changed_annotation_fails_the_unit_tests(tmp_path: Path) -> None:
    # The same layout as deploy/prometheus, with one alert's description reworded.
    (tmp_path / "tests").mkdir()
    for f in TESTS.glob("*.yml"):
        shutil.copy(f, tmp_path / "tests" / f.name)
    text = RULES.read_text()
    assert text.count("so its scores cover only part of the traffic") == 1
    changed = text.replace("so its scores cover only part of the traffic", "so scores are partial")
    (tmp_path / "rules.yml").write_text(changed)
    out = promtool("test", "rules", *(str(f) for f in sorted((tmp_path / "tests").glob("*.yml"))))
    assert out.returncode == 1, out.stdout + out.stderr
    failed = re.findall(r"alertname: (\w+), time", out.stdout + out.stderr)
    assert set(failed) == {"MisalignTapDroppingRows"}, out.stdout + out.stderr


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for f in TESTS.glob("*.yml"):
        for case in yaml.safe_load(f.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    alerts = {r["alert"] for r in rules() if "alert" in r}
    assert alerts - fired == set(), "alerts never shown firing"
    assert alerts - quiet == set(), "alerts never shown staying quiet"


def runbook_sections() -> dict[str, str]:
    """``{anchor: section text}`` of docs/runbooks.md, anchors as GitHub makes them from the
    ``##`` headings."""
    sections: dict[str, str] = {}
    anchor = None
    for line in RUNBOOKS.read_text().splitlines():
        if line.startswith("## "):
            title = line[3:].strip().lower()
            anchor = re.sub(r"[^a-z0-9 _-]", "", title).replace(" ", "-")
            sections[anchor] = ""
        elif anchor is not None:
            sections[anchor] += line + "\n"
    return sections


def test_every_alert_has_a_summary_a_description_and_a_runbook_url() -> None:
    sections = runbook_sections()
    for rule in (r for r in rules() if "alert" in r):
        name = rule["alert"]
        notes = rule.get("annotations", {})
        assert set(notes) == ANNOTATIONS, name
        assert notes["summary"] and len(notes["description"]) > 60, name
        page, _, anchor = notes["runbook_url"].partition("#")
        assert page == "docs/runbooks.md" and (ROOT / page).is_file(), name
        assert anchor == name.lower(), name
        assert anchor in sections, f"{name}: no section #{anchor} in {page}"
        assert "First:" in sections[anchor] and len(sections[anchor]) > 200, name
        assert rule["labels"]["severity"] in {"warning", "critical"}


def test_recording_rules_are_named_level_metric_operations() -> None:
    """``level:metric:operations`` (prometheus.io, "Recording rules"): the level is a label the
    rule keeps, the metric a registered one (``_total`` dropped for a rate, a histogram by its
    name, ``X_per_Y`` for a ratio), the operations end with the range they are over."""
    registered = gen_deploy.registered_metric_names()
    records = [r for r in rules() if "record" in r]
    assert len(records) >= 8
    for rule in records:
        level, metric, ops = rule["record"].split(":")
        assert re.fullmatch(r"[a-z_]+", level) and re.fullmatch(r"[a-z0-9_]+", ops), rule
        kept = re.findall(r"\bby \(([^)]*)\)", rule["expr"])
        if kept:
            assert level in {label.strip() for label in kept[0].split(",")}, rule["record"]
        else:  # built on another recorded series of the same level
            assert f"{level}:" in rule["expr"], rule["record"]
        parts = metric.split("_per_")
        named = {parts[0], parts[0] + "_total", parts[0] + "_bucket"}  # a histogram: its buckets
        assert named & registered, rule["record"]
        assert ops.endswith(("rate5m", "1d")), rule["record"]


def test_rules_name_only_registered_metrics() -> None:
    known = (
        gen_deploy.registered_metric_names()
        | gen_deploy.recorded_names()
        | gen_deploy.PROMETHEUS_SERIES
    )
    named = {m for r in rules() for m in gen_deploy.METRIC.findall(str(r["expr"])) if m != "up"}
    assert named - known == set()
    assert len(named) > 10


def test_the_docs_joins_with_vllms_metrics_are_unit_tested() -> None:
    """Each query in docs/deploy.md's "Metrics that join vLLM's" is a promql_expr_test of the
    promtool tests (on series named and labelled as vLLM's), word for word."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    section = text.split("## Metrics that join vLLM's", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```promql\n(.*?)```", section, re.S)
    documented = [
        " ".join(q.split())
        for block in blocks
        for q in re.split(r"\n\s*\n", block)
        for q in ["\n".join(line for line in q.splitlines() if not line.startswith("#"))]
        if q.strip()
    ]
    tested = {
        " ".join(t["expr"].split())
        for f in TESTS.glob("*.yml")
        for case in yaml.safe_load(f.read_text())["tests"]
        for t in case.get("promql_expr_test", [])
    }
    assert len(documented) == 2 and all("vllm:" in q for q in documented)
    assert set(documented) <= tested
