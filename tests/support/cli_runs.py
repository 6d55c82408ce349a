"""The command line in a child process, as a user runs it, and what a user error must look like."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``misalign-monitor ARGS`` as a user runs it, in a child process, progress bars off."""
    return subprocess.run(
        [sys.executable, "-m", "misalign_monitor.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )


def gate(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``misalign-monitor gate ARGS`` from the repository root (``env``: the child's whole
    environment, e.g. Prometheus credentials)."""
    return subprocess.run(
        [sys.executable, "-m", "misalign_monitor.cli", "gate", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env=env,
    )


def assert_user_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert n in proc.stderr, proc.stderr


def error_line(res: subprocess.CompletedProcess[str]) -> str:
    """The one line a user error prints (exit 2), with no traceback."""
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    return lines[0]
