"""A small random-weight model of another architecture the tap supports, saved like a hub model.

No hub download: the configuration is written here, the weights are random (seeded) and the
tokenizer is SmolLM2's. The tap's parity does not depend on what the weights learned.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from bench.synthetic import synthetic_bundle
from detectors import bundle as bundle_io
from detectors.bundle import FeatureSpec, ModelRef

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
HIDDEN, LAYERS = 128, 4


def tiny_model(out: Path, architecture: str, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    common = dict(
        vocab_size=49152,
        hidden_size=HIDDEN,
        intermediate_size=256,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,  # head size 64: one the CPU attention kernels take
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    configs = {"Qwen2ForCausalLM": lambda: Qwen2Config(**common)}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(configs[architecture](), dtype=torch.float32)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


def tiny_bundle(path: Path, architecture: str, layer: int = 2) -> Path:
    ref = ModelRef(
        name=f"tiny-{architecture}",
        hidden_size=HIDDEN,
        num_layers=LAYERS,
        architecture=architecture,
    )
    b = synthetic_bundle(path, ref, layer, 3, 1.0)
    # An SAE latent too, so parity covers the JumpReLU the op applies on the device.
    sae = FeatureSpec(name="sae_latent", method="sae", kind="jumprelu", source="synthetic")
    rng = np.random.default_rng(1)
    bundle_io.save(b.with_feature(sae, rng.normal(size=HIDDEN), bias=-0.05, jump=0.02), path)
    return path
