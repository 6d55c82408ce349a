"""The tap's op registers and computes with torch alone, as on a GPU machine without vLLM.

vLLM is hidden from a child process (``sys.modules["vllm"] = None`` makes every import of it
fail), so ``register`` takes its ``torch.library`` path; the op's output is checked against the
plain formula, and the per-step timing bench runs through the host side too.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support import ROOT

CHILD = """
import sys
sys.modules["vllm"] = None
sys.path.insert(0, {root!r})
import json, runpy, torch
from tap import projection_op
projection_op.register()
torch.manual_seed(0)
h, r = torch.randn(5, 8), torch.randn(5, 8)
w, b = torch.randn(8, 3), torch.randn(3)
jump = torch.tensor([-float("inf"), 0.5, -float("inf")])
out = torch.zeros(16, 3)
torch.ops.misalign.project(h, r, w, b, jump, out)
want = (h + r) @ w + b
want[:, 1] = torch.where(want[:, 1] > 0.5, want[:, 1], torch.zeros(()))
print("OP", json.dumps({{"max_err": float((out[:5] - want).abs().max()),
                         "untouched": float(out[5:].abs().max())}}))
sys.argv = ["tap_overhead.py", "--components-only", "--json"]
runpy.run_path({bench!r}, run_name="__main__")
"""


def test_op_and_host_side_without_vllm() -> None:
    code = CHILD.format(root=str(ROOT), bench=str(ROOT / "bench" / "tap_overhead.py"))
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    op = json.loads(next(x for x in lines if x.startswith("OP ")).removeprefix("OP "))
    assert op["max_err"] < 1e-5 and op["untouched"] == 0.0
    parts = json.loads(lines[-1])
    assert parts["device"] == "cpu" and parts["op_us"] > 0 and parts["host_us"] > 0
