"""deploy/argo: the Argo Rollouts AnalysisTemplate's structure, and its PromQL evaluated by
``promtool test rules`` on synthetic sidecar series, so each query is known to parse and to give
the value its success and failure conditions are written for."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.support import ROOT

TEMPLATE = ROOT / "deploy" / "argo" / "analysis-template.yaml"
PROMTOOL = "/usr/bin/promtool"
ARGS = {
    "model-name": "m",
    "candidate-version": "v2",
    "stable-version": "v1",
    "prometheus-address": "http://prometheus:9090",
    "window": "10m",
    "max-flag-rate": "0.05",
    "max-excess": "0.02",
}


def template() -> dict[str, Any]:
    return yaml.safe_load(TEMPLATE.read_text())


def filled(text: str) -> str:
    """``{{args.NAME}}`` replaced as Argo Rollouts replaces it."""
    return re.sub(r"\{\{args\.([a-z-]+)\}\}", lambda m: ARGS[m.group(1)], text)


def test_the_template_is_an_analysis_template_whose_args_are_all_declared() -> None:
    t = template()
    assert (t["apiVersion"], t["kind"]) == ("argoproj.io/v1alpha1", "AnalysisTemplate")
    declared = [a["name"] for a in t["spec"]["args"]]
    assert len(declared) == len(set(declared)) and set(declared) == set(ARGS)
    used = set(re.findall(r"\{\{args\.([a-z-]+)\}\}", TEMPLATE.read_text()))
    assert used == set(declared)
    # The three a Rollout must pass have no default: a missing one is refused, not guessed.
    required = {a["name"] for a in t["spec"]["args"] if "value" not in a}
    assert required == {"model-name", "candidate-version", "stable-version"}
    metrics = {m["name"]: m for m in t["spec"]["metrics"]}
    assert set(metrics) == {"candidate-flag-rate", "flag-rate-vs-stable"}
    for name, m in metrics.items():
        prom = m["provider"]["prometheus"]
        assert prom["address"] == "{{args.prometheus-address}}" and prom["query"].strip()
        limit = "max-flag-rate" if name == "candidate-flag-rate" else "max-excess"
        # Both conditions guard the empty result, so no traffic is Inconclusive, never Failed.
        assert m["successCondition"] == f"len(result) > 0 && result[0] <= {{{{args.{limit}}}}}"
        assert m["failureCondition"] == f"len(result) > 0 && result[0] > {{{{args.{limit}}}}}"
        assert m["failureLimit"] >= 1 and m["inconclusiveLimit"] >= 1
        assert 'model_version="{{args.candidate-version}}"' in prom["query"]


def _series(version: str, scored: int, flagged: dict[str, int]) -> list[dict[str, str]]:
    labels = f'model_name="m",model_version="{version}",bundle="b",job="misalign-sidecar"'
    out = [{"series": f"misalign_requests_scored_total{{{labels}}}", "values": f"0+{scored}x30"}]
    out += [
        {
            "series": f'misalign_requests_flagged_total{{{labels},feature="{f}"}}',
            "values": f"0+{n}x30",
        }
        for f, n in flagged.items()
    ]
    return out


def test_the_queries_give_the_rates_their_conditions_judge(tmp_path: Path) -> None:
    queries = {
        m["name"]: filled(m["provider"]["prometheus"]["query"])
        for m in template()["spec"]["metrics"]
    }
    (tmp_path / "empty.yml").write_text("groups: []\n")

    def case(
        series: list[dict[str, str]], rate: float | None, excess: float | None
    ) -> dict[str, Any]:
        def expect(value: float | None) -> list[dict[str, Any]]:
            return [] if value is None else [{"labels": "{}", "value": value}]

        return {
            "interval": "1m",
            "input_series": series,
            "promql_expr_test": [
                {"expr": queries["candidate-flag-rate"], "eval_time": "20m",
                 "exp_samples": expect(rate)},
                {"expr": queries["flag-rate-vs-stable"], "eval_time": "20m",
                 "exp_samples": expect(excess)},
            ],
        }  # fmt: skip

    tests = [
        # The canary flags toxic on 1/8 of requests and persona on 1/32; stable flags toxic on
        # 1/32 and never persona: worst rate 0.125 (fails 0.05), worst excess 0.125 - 0.03125.
        case(
            _series("v2", 64, {"toxic": 8, "misaligned_persona": 2})
            + _series("v1", 64, {"toxic": 2}),
            0.125,
            0.09375,
        ),
        # Same rates on both: passes both conditions.
        case(_series("v2", 64, {"toxic": 2}) + _series("v1", 128, {"toxic": 4}), 0.03125, 0.0),
        # A persona flag stable never had is the whole excess (stable's missing series is 0).
        case(_series("v2", 64, {"misaligned_persona": 4}) + _series("v1", 64, {}), 0.0625, 0.0625),
        # Canary without traffic yet: empty results, Inconclusive by the conditions.
        case(_series("v1", 64, {"toxic": 2}), None, None),
    ]
    spec = tmp_path / "argo_test.yml"
    spec.write_text(
        yaml.safe_dump({"rule_files": ["empty.yml"], "evaluation_interval": "1m", "tests": tests})
    )
    out = subprocess.run(
        [PROMTOOL, "test", "rules", str(spec)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_a_wrong_expected_value_fails_promtool(tmp_path: Path) -> None:
    """The promtool check above can fail: the same query with a value it does not give."""
    query = filled(template()["spec"]["metrics"][0]["provider"]["prometheus"]["query"])
    (tmp_path / "empty.yml").write_text("groups: []\n")
    spec = tmp_path / "t.yml"
    spec.write_text(
        yaml.safe_dump(
            {
                "rule_files": ["empty.yml"],
                "tests": [
                    {
                        "interval": "1m",
                        "input_series": _series("v2", 64, {"toxic": 8}),
                        "promql_expr_test": [
                            {"expr": query, "eval_time": "20m",
                             "exp_samples": [{"labels": "{}", "value": 0.5}]}
                        ],
                    }
                ],
            }
        )
    )  # fmt: skip
    out = subprocess.run(
        [PROMTOOL, "test", "rules", str(spec)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1 and "got: {} 1.25E-01" in out.stdout + out.stderr, (
        out.stdout + out.stderr
    )
