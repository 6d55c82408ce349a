"""A short atheris run over the ingest path (`bench/fuzz_ingest.py`; longer runs with --runs)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.support import ROOT


def test_fuzzing_the_ingest_path_finds_no_unhandled_exception() -> None:
    runs = 20_000
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fuzz_ingest.py"), "--runs", str(runs)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    m = re.search(r"fuzz_ingest: ([\d,]+) inputs .* no unhandled exception", text)
    assert m, text[-3000:]
    assert int(m.group(1).replace(",", "")) == runs
    print(m.group(0))
