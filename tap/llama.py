"""Llama-family override: the decoder layer at the bundle's depth projects after its forward.

Bundle layer L is the residual stream after decoder layer L (1-based): ``hidden + residual`` out of
``model.layers[L - 1]``. SmolLM2, Llama, Mistral and Qwen2 share this layout.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM

from tap import state


class TappedDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config: Any, prefix: str = "", **kwargs: Any) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        index = int(prefix.rsplit(".", 1)[-1])
        cfg = state.active()
        self.tapped = cfg is not None and index == cfg.bundle.spec.layer - 1
        if self.tapped:
            assert cfg is not None
            rows = vllm_config.scheduler_config.max_num_batched_tokens
            w = torch.from_numpy(np.ascontiguousarray(cfg.bundle.directions.T))
            # Buffers, not parameters: the weight loader ignores them, the graph captures them.
            self.register_buffer("tap_weight", w.to(torch.float32), persistent=False)
            self.register_buffer(
                "tap_out", torch.zeros(rows, cfg.bundle.k, dtype=torch.float32), persistent=False
            )
            state.register_layer(self)

    def forward(self, positions: Any, hidden_states: Any, residual: Any) -> Any:
        hidden_states, residual = super().forward(positions, hidden_states, residual)
        if self.tapped:
            torch.ops.misalign.project(hidden_states, residual, self.tap_weight, self.tap_out)
        return hidden_states, residual


class TappedLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=TappedDecoderLayer)
