"""Finding a model's decoder layers from its own module structure, for any architecture.

The transformers reader (detectors.activations) and the vLLM tap (tap.layer_tap) both read the
residual stream after decoder layer L. Rather than a list of known class layouts, both take the
model's decoder layer list: the shallowest ``nn.ModuleList`` holding exactly the config's
``num_hidden_layers`` modules (``model.layers`` in Llama-like models, ``transformer.h`` in GPT-2,
``model.language_model.layers`` in multimodal wrappers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def text_num_layers(config: Any) -> int:
    """The decoder depth of a (possibly multimodal) transformers config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.num_hidden_layers)


def find_decoder_layers(model: Any, num_layers: int) -> Sequence[Any] | str:
    """The decoder layer list, or why there is none (a sentence naming the model's class)."""
    import torch

    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == num_layers
    ]
    what = type(model).__name__
    if not found:
        return f"{what} has no list of {num_layers} modules (the config's num_hidden_layers)"
    depth = min(name.count(".") for name, _ in found)
    best = [(name, mod) for name, mod in found if name.count(".") == depth]
    if len(best) > 1:
        names = ", ".join(name for name, _ in best)
        return f"{what} has several lists of {num_layers} modules ({names}); which are its layers is unclear"
    return list(best[0][1])
