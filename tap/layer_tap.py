"""Turn the decoder layer at the bundle's depth into one that projects after its forward.

Bundle layer L is the residual stream after decoder layer L (1-based): ``hidden + residual`` out of
``model.layers[L - 1]``. The architectures below share that layout in vLLM (their decoder layers
return ``(hidden, residual)`` whose sum is the residual stream); others are refused rather than
tapped at the wrong point.

The layer's class is swapped for a subclass once the weights are loaded and before the first
forward, so torch.compile traces the projection op into the graph (and CUDA graphs capture it):
the same effect as overriding the model class, for every supported architecture at once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from detectors.bundle import Bundle
from tap import projection_op
from tap.settings import TapConfigError

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


_TAPPED: dict[tuple[type, bool], type] = {}


def _tapped(base: Any, mitigate: bool) -> type:
    if (base, mitigate) in _TAPPED:
        return _TAPPED[base, mitigate]

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        hidden_states, residual = base.forward(self, *args, **kwargs)
        torch.ops.misalign.project(
            hidden_states, residual, self.tap_weight, self.tap_bias, self.tap_jump, self.tap_out
        )
        return hidden_states, residual

    def forward_mitigate(self: Any, *args: Any, **kwargs: Any) -> Any:
        hidden_states, residual = base.forward(self, *args, **kwargs)
        torch.ops.misalign.project_mitigate(
            hidden_states,
            residual,
            self.tap_weight,
            self.tap_bias,
            self.tap_jump,
            self.tap_out,
            self.tap_unit,
            self.tap_inv_norm,
            self.tap_threshold,
            self.tap_ctl,
            self.tap_applied,
        )
        return hidden_states, residual

    name = f"Tapped{base.__name__}"
    cls = type(name, (base,), {"forward": forward_mitigate if mitigate else forward})
    _TAPPED[base, mitigate] = cls
    return cls


def decoder_layers(model: Any) -> Any:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TapConfigError(
            f"misalign tap: {type(model).__name__} has no model.layers; cannot find the decoder layers"
        )
    return layers


def attach(model: Any, architecture: str, bundle: Bundle, rows: int, mitigate: bool) -> Any:
    """Tap ``model``'s decoder layer at the bundle's depth; return that layer.

    ``rows`` is the most tokens one engine step can hold (buffers are preallocated once);
    ``mitigate`` selects the op that can also move the residual stream (tap.mitigation).
    """
    if architecture not in SUPPORTED:
        raise TapConfigError(
            f"misalign tap: the model's architecture {architecture} is not one the tap supports "
            f"({', '.join(SUPPORTED)}); refusing to serve unmonitored"
        )
    target = decoder_layers(model)[bundle.spec.layer - 1]
    if hasattr(target, "tap_out"):
        return target
    device = next(target.parameters()).device
    k = bundle.k

    def buf(name: str, value: np.ndarray | torch.Tensor) -> None:
        t = torch.as_tensor(np.ascontiguousarray(value, dtype=np.float32), device=device)
        # Buffers, not parameters: no weight loader sees them, the compiled graph captures them.
        target.register_buffer(name, t, persistent=False)

    jump = np.where(
        [f.kind == "jumprelu" for f in bundle.spec.features], bundle.jump_threshold, -np.inf
    )
    buf("tap_weight", bundle.directions.T)
    buf("tap_bias", bundle.bias)
    buf("tap_jump", jump)
    buf("tap_out", np.zeros((rows, k)))
    if mitigate:
        norms = np.linalg.norm(bundle.directions, axis=1)
        buf("tap_unit", bundle.directions / norms[:, None])
        buf("tap_inv_norm", 1.0 / norms)
        buf("tap_threshold", mitigation_thresholds(bundle))
        buf("tap_ctl", np.zeros((rows, projection_op.ctl_width(k))))
        buf("tap_applied", np.zeros(rows))
    target.__class__ = _tapped(type(target), mitigate)
    return target


def mitigation_thresholds(bundle: Bundle) -> np.ndarray:
    """Each feature's calibrated threshold; a feature without one is never 'flagged'."""
    return np.array(
        [f.calibration.threshold if f.calibration else np.inf for f in bundle.spec.features]
    )
