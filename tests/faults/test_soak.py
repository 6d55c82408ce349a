"""A one-minute soak in CI (`bench/soak.py` is the 30-minute one): RSS and open file descriptors
flat, no error counter moving, every flagged sample in the stream."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest

from bench.soak import parser, run_soak, write_csv
from tests.support.harness import report

pytestmark = pytest.mark.slow  # a minute by design


def test_short_soak_is_flat(tmp_path: Path) -> None:
    args = parser().parse_args(["--minutes", "1", "--sample-s", "2", "--stream-s", "20"])
    samples, v = run_soak(args, tmp_path)
    write_csv(samples, tmp_path / "soak.csv")
    assert v.stream_errors == 0 and v.errors_after_warmup == 0
    assert v.fds_warm_max - v.fds_warm_min <= 2, (v.fds_warm_min, v.fds_warm_max)
    assert v.rss_growth_mb < args.rss_slack_mb, [s.rss_mb for s in samples]
    assert v.requests_scored > 1000 and v.flagged_in_stream == v.flagged_sent > 100
    assert v.flat
    report("soak (CI, 1 min)", **asdict(v))
