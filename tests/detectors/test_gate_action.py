"""action.yml: the composite action's gate step, run as the runner runs it.

The step's ``run`` script is taken from action.yml and run with bash, its ``env`` filled in as the
runner fills ``${{ inputs.* }}``, and ``GITHUB_STEP_SUMMARY``/``GITHUB_OUTPUT`` pointing at temp
files; ``misalign-monitor`` on PATH is this checkout's CLI.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from misalign_monitor.commands.gate import gate as gate_command
from tests.support import ROOT
from tests.support.gate_scores import draws, write_scores

ACTION = ROOT / "action.yml"


def action() -> dict[str, Any]:
    return yaml.safe_load(ACTION.read_text())


def gate_step() -> dict[str, Any]:
    (step,) = [s for s in action()["runs"]["steps"] if s.get("id") == "gate"]
    return step


def run_step(tmp_path: Path, **inputs: str) -> tuple[subprocess.CompletedProcess[str], str, str]:
    spec = action()
    values = {k: v.get("default", "") for k, v in spec["inputs"].items()} | inputs
    step = gate_step()
    env = dict(os.environ)
    for name, template in step["env"].items():
        m = re.fullmatch(r"\$\{\{ inputs\.([a-z-]+) \}\}", template)
        assert m, f"env {name}: {template!r} is not one input"
        env[name] = values[m.group(1)]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "misalign-monitor"
    shim.write_text(f'#!/bin/sh\ncd {ROOT} && exec {sys.executable} -m misalign_monitor.cli "$@"\n')
    shim.chmod(0o755)
    summary, output = tmp_path / "summary.md", tmp_path / "output"
    summary.write_text("earlier step's summary\n")
    output.write_text("")
    env |= {
        "PATH": f"{bin_dir}:{env['PATH']}",
        "GITHUB_STEP_SUMMARY": str(summary),
        "GITHUB_OUTPUT": str(output),
        "RUNNER_TEMP": str(tmp_path / "runner"),
    }
    (tmp_path / "runner").mkdir(exist_ok=True)
    res = subprocess.run(
        ["bash", "--noprofile", "--norc", "-e", "-o", "pipefail", "-c", step["run"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return res, summary.read_text(), output.read_text()


def test_the_action_is_a_composite_whose_inputs_reach_the_gate_only_as_environment() -> None:
    spec = action()
    assert spec["runs"]["using"] == "composite"
    for step in spec["runs"]["steps"]:
        if "run" in step:
            assert step["shell"] == "bash"
            # Inputs pasted into a script are a command injection from a pull request's values.
            assert "${{" not in step["run"], step.get("name")
    env = gate_step()["env"]
    # The names the CLI reads its credentials from, so secrets never sit on a command line.
    by_name = {p.name: p for p in gate_command.params}
    assert by_name["prometheus_bearer_token"].envvar == "MISALIGN_PROMETHEUS_BEARER_TOKEN"
    assert by_name["prometheus_basic_auth"].envvar == "MISALIGN_PROMETHEUS_BASIC_AUTH"
    assert env["MISALIGN_PROMETHEUS_BEARER_TOKEN"] == "${{ inputs.prometheus-bearer-token }}"
    assert env["MISALIGN_PROMETHEUS_BASIC_AUTH"] == "${{ inputs.prometheus-basic-auth }}"
    used = set(re.findall(r"inputs\.([a-z-]+)", ACTION.read_text()))
    assert used == set(spec["inputs"]), used ^ set(spec["inputs"])


def test_a_passing_gate_writes_the_report_to_the_summary(tmp_path: Path) -> None:
    base = write_scores(tmp_path / "base.jsonl", draws(60, 0))
    same = write_scores(tmp_path / "same.jsonl", draws(60, 1))
    res, summary, output = run_step(tmp_path, args=f"--from-scores {base} {same}")
    assert res.returncode == 0, res.stdout + res.stderr
    assert summary.startswith("earlier step's summary\n")  # appended, not overwritten
    assert "## misalign-monitor gate: **PASS**" in summary
    assert "| `misaligned_persona` |" in summary and "distributions.png)" not in summary
    assert "passed=true" in output and "exit-code=0" in output
    report = Path(re.search(r"report=(.*)", output).group(1))  # type: ignore[union-attr]
    assert (report / "distributions.png").is_file()


def test_a_failing_gate_fails_the_step_and_a_broken_one_says_why(tmp_path: Path) -> None:
    base = write_scores(tmp_path / "base.jsonl", draws(60, 0))
    bad = write_scores(tmp_path / "bad.jsonl", draws(60, 2, shift=1.0))
    res, summary, output = run_step(tmp_path, args=f"--from-scores {base} {bad}")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "**FAIL**" in summary and "Decided by: misaligned_persona:" in summary
    assert "passed=false" in output and "exit-code=1" in output
    # A source error: exit 2, and the summary holds the one error line.
    dead = "http://127.0.0.1:9"
    res, summary, output = run_step(
        tmp_path,
        prometheus=dead,
        **{"baseline-version": "v1", "candidate-version": "v2"},
        **{"prometheus-headers": "X-Scope-OrgID: team-a\n\n", "prometheus-bearer-token": "t0k"},
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "**could not run** (exit 2)" in summary
    assert f"error: Prometheus at {dead} does not answer" in summary
    assert "t0k" not in summary + res.stderr
    assert "exit-code=2" in output
