"""The one ``--check`` loop of the generators (gen_deploy.py, gen_docs.py): write what they
render, or, with ``--check`` (make lint), fail naming every file that is out of date."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_or_check(
    script: str, description: str, render: Callable[[], Mapping[Path, str | bytes]]
) -> int:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--check", action="store_true", help="fail if a generated file is stale")
    args = ap.parse_args()
    stale = []
    for path, content in render().items():
        data = content.encode() if isinstance(content, str) else content
        if args.check:
            if not path.exists() or path.read_bytes() != data:
                stale.append(path.relative_to(ROOT))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(
            f"out of date (run: python scripts/{script}): " + ", ".join(map(str, stale)),
            file=sys.stderr,
        )
        return 1
    return 0
