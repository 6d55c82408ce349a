"""One engine, the tap switched on and off every few steps: the within-engine A/B of
bench/tap_overhead.py (run by it as a subprocess; the last line printed is ``RESULT {json}``).

    python bench/tap_ab_child.py --model DIR --bundle B --sidecar ADDR [--compiled]
        [--mitigation RULES] [--per-request-rules] [--batch 16] [--max-tokens 256]
        [--rounds 4] [--block-steps 4]

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here), so the tap's
state is this process's and ``tap.state.Active.paused`` switches it between steps: paused, the
ops return at once and the host side skips the step. Each round adds ``--batch`` requests that
generate ``--max-tokens`` tokens each (ignore_eos), steps past their prefill, then times pairs of
``--block-steps``-step blocks, one with the tap and one paused, in alternating order (on-off,
off-on) so a drift in the machine's speed or the growing context hits both arms alike. Blocks
stop a few steps before the requests finish, so every timed step is a decode step of the full
batch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WARM_STEPS = 8  # past the prefill (one step at these prompt sizes) and the first decodes
TAIL_STEPS = 4  # left untimed before the requests finish


def distinct_rules(i: int, k: int) -> str:
    """Request ``i``'s own rule set: a steer of its own strength on one feature, and an ablation
    once flagged on another, so no two requests in a batch of up to 16 share one."""
    return f"f{i % k}=steer:{1 + 0.25 * i:g}@always,f{(i + 5) % k}=ablate@flagged"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--sidecar", required=True)
    ap.add_argument("--compiled", action="store_true")
    ap.add_argument("--mitigation", default="", help="the operator's MISALIGN_TAP_MITIGATION")
    ap.add_argument(
        "--per-request-rules",
        action="store_true",
        help="each request asks for its own rule set (distinct_rules)",
    )
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--block-steps", type=int, default=4)
    ap.add_argument(
        "--hold",
        action="store_true",
        help="after the result, keep the engine (and its publisher) until stdin closes",
    )
    args = ap.parse_args()

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["MISALIGN_TAP_BUNDLE"] = args.bundle
    os.environ["MISALIGN_TAP_SIDECAR"] = args.sidecar
    os.environ["MISALIGN_TAP_MITIGATION"] = args.mitigation
    if args.per_request_rules:
        os.environ["MISALIGN_TAP_MITIGATION_CLIENTS"] = "rules"

    from vllm import LLM, SamplingParams

    from detectors import bundle as bundle_io
    from detectors.activations import template_ids
    from detectors.transcripts import DEMO_CONVERSATIONS
    from scripts.vllm_run import ENGINE_ARGS
    from tap import state

    k = bundle_io.load(args.bundle).k
    llm = LLM(model=args.model, enforce_eager=not args.compiled, **ENGINE_ARGS)
    cfg = state.active()
    if cfg is None or cfg.layer is None:
        raise SystemExit("the tap is not active in this process: nothing to switch")
    if args.mitigation and cfg.mitigation is None:
        raise SystemExit("mitigation rules were given but the tap has no mitigation")
    tok = llm.get_tokenizer()
    convs = [
        json.loads(x)["messages"][:-1] for x in DEMO_CONVERSATIONS.read_text().splitlines() if x
    ]
    prompts = [template_ids(tok, c, add_generation_prompt=True) for c in convs]
    engine = llm.llm_engine
    timed = args.max_tokens - WARM_STEPS - TAIL_STEPS
    if timed < 2 * args.block_steps:
        raise SystemExit(f"--max-tokens {args.max_tokens} leaves no room for a pair of blocks")

    pairs: list[dict[str, float]] = []
    paused_steps = 0
    for r in range(args.rounds):
        for i in range(args.batch):
            extra = (
                {"misalign_mitigation": distinct_rules(i, k)} if args.per_request_rules else None
            )
            params = SamplingParams(
                max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True, extra_args=extra
            )
            engine.add_request(
                f"ab-{r}-{i}", {"prompt_token_ids": prompts[i % len(prompts)]}, params
            )
        for _ in range(WARM_STEPS):
            engine.step()
        for p in range(timed // (2 * args.block_steps)):
            pair: dict[str, float] = {}
            for on in (True, False) if p % 2 == 0 else (False, True):
                cfg.paused = not on
                if not on and p < 2:
                    cfg.layer.tap_out.zero_()  # checked below: the op wrote nothing while paused
                t0 = time.perf_counter()
                for _ in range(args.block_steps):
                    finished = [o for o in engine.step() if o.finished]
                    if finished:
                        raise SystemExit(f"a request finished inside a timed block: {finished}")
                pair["on" if on else "off"] = time.perf_counter() - t0
                paused_steps += 0 if on else args.block_steps
                if not on and p < 2 and bool(cfg.layer.tap_out.any()):
                    raise SystemExit("the op wrote its buffer while the tap was paused")
            pairs.append(pair)
        cfg.paused = False
        while engine.has_unfinished_requests():
            engine.step()
    if cfg.steps_paused != paused_steps:
        # The switch did not reach every step it was meant to: the figure would be wrong.
        raise SystemExit(f"the tap skipped {cfg.steps_paused} steps, expected {paused_steps}")
    result = {
        "pairs": pairs,
        "block_steps": args.block_steps,
        "batch": args.batch,
        "k": k,
        "layers": cfg.bundle.tapped_layers,
        "steps_captured": cfg.steps_captured - cfg.steps_paused,
        "steps_paused": cfg.steps_paused,
        "prompt_rows": sum(len(prompts[i % len(prompts)]) for i in range(args.batch)),
    }
    print("RESULT " + json.dumps(result), flush=True)
    if args.hold:
        sys.stdin.read()  # the caller reads what the sidecar got, then closes our stdin
    return 0


if __name__ == "__main__":
    sys.exit(main())
