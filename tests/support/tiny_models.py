"""Small random-weight models of the architectures the tap reads, saved like hub models.

No hub download: the configuration is written here, the weights are random (seeded) and the
tokenizer is SmolLM2's. The tap's parity does not depend on what the weights learned. The
families' parity tests use 2 layers of width 64 (one attention head of 64: a head size the CPU
attention kernels take), to start each vLLM engine quickly.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from bench.synthetic import synthetic_bundle
from detectors import bundle as bundle_io
from detectors.bundle import Aggregation, Bundle, Calibration, FeatureSpec, ModelRef

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
HIDDEN, LAYERS = 128, 4
# A decoder family's tiny size (tests/tap/test_vllm_tap.py's parity tests).
SMALL_HIDDEN, SMALL_LAYERS = 64, 2


def _config(architecture: str, hidden: int, layers: int) -> Any:
    import transformers as tf

    common: dict[str, Any] = dict(
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,  # head size 64
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    moe = dict(num_experts_per_tok=2)
    configs = {
        "LlamaForCausalLM": lambda: tf.LlamaConfig(**common),
        "MistralForCausalLM": lambda: tf.MistralConfig(**common, sliding_window=None),
        "Qwen2ForCausalLM": lambda: tf.Qwen2Config(**common),
        "Qwen3ForCausalLM": lambda: tf.Qwen3Config(**common, head_dim=64),
        "Gemma2ForCausalLM": lambda: tf.Gemma2Config(
            **common, head_dim=64, query_pre_attn_scalar=64, sliding_window=512
        ),
        "Gemma3ForCausalLM": lambda: tf.Gemma3TextConfig(
            **common, head_dim=64, query_pre_attn_scalar=64, sliding_window=512
        ),
        "Phi3ForCausalLM": lambda: tf.Phi3Config(**common),
        "Olmo2ForCausalLM": lambda: tf.Olmo2Config(**common),
        "GraniteForCausalLM": lambda: tf.GraniteConfig(
            **common,
            embedding_multiplier=2.0,
            residual_multiplier=0.5,
            attention_multiplier=1 / 64,
            logits_scaling=4.0,
        ),
        "Qwen3MoeForCausalLM": lambda: tf.Qwen3MoeConfig(
            **common,
            **moe,
            head_dim=64,
            num_experts=4,
            moe_intermediate_size=hidden,
            decoder_sparse_step=1,
        ),
        "MixtralForCausalLM": lambda: tf.MixtralConfig(
            **common, **moe, num_local_experts=4, sliding_window=None
        ),
        "GPT2LMHeadModel": lambda: tf.GPT2Config(
            vocab_size=49152,
            n_embd=hidden,
            n_layer=layers,
            n_head=hidden // 64,
            n_positions=2048,
            bos_token_id=1,
            eos_token_id=2,
        ),
    }
    cfg = configs[architecture]()
    cfg.architectures = [architecture]
    return cfg


def tiny_model(
    out: Path,
    architecture: str,
    tokenizer_dir: Path,
    hidden: int = HIDDEN,
    layers: int = LAYERS,
) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = _config(architecture, hidden, layers)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


def tiny_bundle(
    path: Path,
    architecture: str,
    layer: int = 2,
    hidden: int = HIDDEN,
    layers: int = LAYERS,
) -> Path:
    ref = ModelRef(
        name=f"tiny-{architecture}",
        hidden_size=hidden,
        num_layers=layers,
        architecture=architecture,
    )
    b = synthetic_bundle(path, ref, layer, 3, 1.0)
    # An SAE latent too, so parity covers the JumpReLU the op applies on the device.
    sae = FeatureSpec(name="sae_latent", method="sae", kind="jumprelu", source="synthetic")
    rng = np.random.default_rng(1)
    bundle_io.save(b.with_feature(sae, rng.normal(size=hidden), bias=-0.05, jump=0.02), path)
    return path


def multi_layer_bundle(path: Path, ref: ModelRef, layers: tuple[int, int]) -> bundle_io.Bundle:
    """A bundle reading two layers, with a JumpReLU latent and a head: columns ``f0`` (bundle
    layer ``layers[0]``), ``f1`` and ``sae_latent`` (``layers[1]``), and ``combined``
    (``layers[0]``), scored by a head over its own, ``f1``'s and the latent's pooled scores."""
    from detectors.bundle import Calibration, Head

    rng = np.random.default_rng(7)
    cal = Calibration(
        baseline_mean=0.0, baseline_std=1.0, threshold=0.5, fpr=0.01, n_benign=100, source="t"
    )
    b = bundle_io.empty(ref, layer=layers[0])
    d = ref.hidden_size
    b = b.with_feature(
        FeatureSpec(name="f0", method="probe", source="synthetic", calibration=cal),
        rng.normal(size=d),
        bias=0.1,
    )
    b = b.with_feature(
        FeatureSpec(name="f1", method="probe", source="synthetic", layer=layers[1]),
        rng.normal(size=d),
        bias=-0.2,
    )
    b = b.with_feature(
        FeatureSpec(
            name="sae_latent", method="sae", kind="jumprelu", source="synthetic", layer=layers[1]
        ),
        rng.normal(size=d),
        bias=-0.05,
        jump=0.02,
    )
    head = Head(inputs=("combined", "f1", "sae_latent"), weights=(0.7, -1.2, 0.5), bias=0.1)
    b = b.with_feature(
        FeatureSpec(
            name="combined", method="probe", source="synthetic", head=head, calibration=cal
        ),
        rng.normal(size=d),
        bias=0.3,
    )
    bundle_io.save(b, path)
    return b


# A model the bundle tests never load: its shape is all a bundle records of it.
MODEL = ModelRef(name="tiny", hidden_size=8, num_layers=4)


def make_bundle(k: int = 2, seed: int = 0) -> Bundle:
    """An in-memory bundle of ``k`` calibrated random probes for ``MODEL`` at layer 2."""
    rng = np.random.default_rng(seed)
    b = bundle_io.empty(MODEL, layer=2)
    for i in range(k):
        cal = Calibration(
            baseline_mean=0.1,
            baseline_std=1.0,
            threshold=2.5,
            fpr=0.01,
            n_benign=200,
            source="benign.jsonl",
        )
        spec = FeatureSpec(
            name=f"f{i}",
            method="probe",
            source="x.jsonl",
            aggregation=Aggregation(reduce="max_rolling_mean", window=4),
            calibration=cal,
            params={"cv_auroc": 0.9},
        )
        b = b.with_feature(spec, rng.normal(size=8), bias=0.5 * i)
    return b
