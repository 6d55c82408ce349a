"""deploy/prometheus: the rules load, every alert is unit-tested with `promtool test rules`, names
only metrics the sidecar registers, and carries a summary and a runbook."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from scripts import gen_deploy

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
TESTS = ROOT / "deploy" / "prometheus" / "tests"
PROMTOOL = "/usr/bin/promtool"


def rules() -> list[dict]:  # type: ignore[type-arg]
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_rules_load_with_promtool() -> None:
    out = promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules())} rules found" in out.stdout


def test_promtool_unit_tests_pass(tmp_path: Path) -> None:
    # promtool compares annotations verbatim; the tests check labels and timing, so they run on
    # the rules with the annotations (checked below) taken out, expressions untouched.
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    files = sorted(TESTS.glob("*.yml"))
    assert files
    for f in files:
        shutil.copy(f, tmp_path / f.name)
    out = promtool("test", "rules", *(f.name for f in files), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("SUCCESS") == len(files)


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


def test_every_alert_has_a_summary_and_a_runbook() -> None:
    for rule in (r for r in rules() if "alert" in r):
        notes = rule.get("annotations", {})
        assert notes.get("summary"), rule["alert"]
        runbook = notes.get("runbook", "")
        assert "First:" in runbook and len(runbook) > 80, f"{rule['alert']}: runbook {runbook!r}"
        assert rule["labels"]["severity"] in {"warning", "critical"}


def test_rules_name_only_registered_metrics() -> None:
    known = (
        gen_deploy.registered_metric_names()
        | gen_deploy.recorded_names()
        | gen_deploy.PROMETHEUS_SERIES
    )
    named = {
        m for r in rules() for m in re.findall(r"\b(misalign[_:][A-Za-z0-9_:]*)", str(r["expr"]))
    }
    assert named - known == set()
    assert len(named) > 10
