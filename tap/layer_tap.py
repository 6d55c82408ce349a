"""Turn the decoder layer at the bundle's depth (or each layer a multi-layer bundle reads) into one
that projects after its forward.

Bundle layer L is the residual stream after decoder layer L (1-based). The decoder layers are
found from vLLM's own module structure, for any architecture (detectors.decoder_layers: the
shallowest module list of the config's ``num_hidden_layers`` layers). A layer's output is then
read in one of the two forms vLLM's decoder layers have: ``(hidden, residual)`` with the last add
deferred (Llama, Qwen, Gemma, Phi-3, OLMo 2, Granite, the MoE models: the sum is the stream), or
the stream itself (GPT-2 and its like). Any other output stops vLLM at its first forward (the
profile run, before it serves) with a message naming the layer's class.

The layer's class is swapped for a subclass once the weights are loaded and before the first
forward, so torch.compile traces the projection op into the graph (and CUDA graphs capture it):
the same effect as overriding the model class, for every architecture at once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from detectors.bundle import Bundle
from detectors.decoder_layers import find_decoder_layers
from detectors.errors import TapConfigError
from tap import projection_op

_TAPPED: dict[tuple[type, str], type] = {}


def _stream_parts(base: type, out: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden, residual) of a decoder layer's output, whose sum is the stream. A layer
    that returns the stream itself gets a zero ``hidden`` and the stream as ``residual`` (which
    mitigation edits in place)."""
    # Rows flattened: vLLM's Transformers backend runs its layers on [1, tokens, hidden] (a view
    # of the same storage, so mitigation's in-place edit reaches the returned tensor).
    if isinstance(out, torch.Tensor):
        stream = out.view(-1, out.shape[-1])
        return torch.zeros_like(stream), stream
    if (
        isinstance(out, tuple)
        and len(out) == 2
        and isinstance(out[0], torch.Tensor)
        and isinstance(out[1], torch.Tensor)
    ):
        return out[0].view(-1, out[0].shape[-1]), out[1].view(-1, out[1].shape[-1])
    raise TapConfigError(
        f"misalign tap: the decoder layer {base.__module__}.{base.__qualname__} returns "
        f"{type(out).__name__} of {len(out) if isinstance(out, tuple) else '?'} items, neither "
        "(hidden, residual) nor the residual stream; refusing to serve unmonitored"
    )


def _tapped(base: Any, kind: str) -> type:
    """``base`` with the op after its forward: ``kind`` is 'project' (all k columns),
    'columns' (this layer's columns of a multi-layer bundle) or 'mitigate'."""
    if (base, kind) in _TAPPED:
        return _TAPPED[base, kind]

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = base.forward(self, *args, **kwargs)
        hidden, residual = _stream_parts(base, out)
        torch.ops.misalign.project(
            hidden, residual, self.tap_weight, self.tap_bias, self.tap_jump, self.tap_out
        )
        return out

    def forward_mitigate(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = base.forward(self, *args, **kwargs)
        hidden, residual = _stream_parts(base, out)
        torch.ops.misalign.project_mitigate(
            hidden,
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
        return out  # the tensors the op edited in place

    def forward_columns(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = base.forward(self, *args, **kwargs)
        hidden, residual = _stream_parts(base, out)
        torch.ops.misalign.project_columns(
            hidden,
            residual,
            self.tap_weight,
            self.tap_bias,
            self.tap_jump,
            self.tap_cols,
            self.tap_out,
        )
        return out

    forwards = {"project": forward, "columns": forward_columns, "mitigate": forward_mitigate}
    name = f"Tapped{base.__name__}"
    cls = type(name, (base,), {"forward": forwards[kind]})
    _TAPPED[base, kind] = cls
    return cls


def decoder_layers(model: Any, num_layers: int) -> Any:
    layers = find_decoder_layers(model, num_layers)
    if isinstance(layers, str):
        raise TapConfigError(
            f"misalign tap: {layers}; cannot find the decoder layers, refusing to serve unmonitored"
        )
    return layers


def _weighted(layers: Any, layer: int) -> tuple[Any, torch.device]:
    target = layers[layer - 1]
    params = list(target.parameters())
    if not params:  # vLLM's PPMissingLayer, or a layer without weights: nothing to read
        raise TapConfigError(
            f"misalign tap: decoder layer {layer} is a {type(target).__name__} "
            "without weights in this process; refusing to serve unmonitored"
        )
    return target, params[0].device


def attach(model: Any, bundle: Bundle, rows: int, mitigate: bool) -> Any:
    """Tap ``model``'s decoder layer at the bundle's depth; return that layer.

    ``rows`` is the most tokens one engine step can hold (buffers are preallocated once);
    ``mitigate`` selects the op that can also move the residual stream (tap.mitigation).
    A bundle whose directions read several layers gets the op after each of them, all writing
    into one ``tap_out`` buffer; the deepest is returned (the host reads ``tap_out`` after the
    forward, when every layer has written its columns).
    """
    tapped = bundle.tapped_layers
    if len(tapped) > 1:
        if mitigate:
            raise TapConfigError(
                f"misalign tap: MISALIGN_TAP_MITIGATION needs a bundle at one layer, but bundle "
                f"{bundle.bundle_id} reads layers {tapped}; unset it or use a single-layer bundle"
            )
        return _attach_columns(model, bundle, rows, tapped)
    target, device = _weighted(
        decoder_layers(model, bundle.spec.model.num_layers), bundle.spec.layer
    )
    if hasattr(target, "tap_out"):
        return target
    k = bundle.k

    def buf(name: str, value: np.ndarray | torch.Tensor) -> None:
        t = torch.as_tensor(np.ascontiguousarray(value, dtype=np.float32), device=device)
        # Buffers, not parameters: no weight loader sees them, the compiled graph captures them.
        target.register_buffer(name, t, persistent=False)

    jump = _jumps(bundle)
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
    target.__class__ = _tapped(type(target), "mitigate" if mitigate else "project")
    return target


def _jumps(bundle: Bundle) -> np.ndarray:
    return np.where(
        [f.kind == "jumprelu" for f in bundle.spec.features], bundle.jump_threshold, -np.inf
    )


def _attach_columns(model: Any, bundle: Bundle, rows: int, tapped: list[int]) -> Any:
    layers = decoder_layers(model, bundle.spec.model.num_layers)
    targets = [_weighted(layers, layer) for layer in tapped]
    if hasattr(targets[-1][0], "tap_out"):
        return targets[-1][0]
    jump = _jumps(bundle)
    out = torch.zeros((rows, bundle.k), dtype=torch.float32, device=targets[-1][1])
    for layer, (target, device) in zip(tapped, targets, strict=True):
        cols = bundle.columns_at(layer)

        def buf(name: str, value: np.ndarray, dtype: Any = np.float32) -> None:
            t = torch.as_tensor(np.ascontiguousarray(value, dtype=dtype), device=device)  # noqa: B023
            target.register_buffer(name, t, persistent=False)  # noqa: B023

        buf("tap_weight", bundle.directions[cols].T)
        buf("tap_bias", bundle.bias[cols])
        buf("tap_jump", jump[cols])
        buf("tap_cols", cols, np.int64)
        # The same tensor on every tapped layer: one buffer, each layer its columns.
        target.register_buffer("tap_out", out, persistent=False)
        target.__class__ = _tapped(type(target), "columns")
    return targets[-1][0]


def mitigation_thresholds(bundle: Bundle) -> np.ndarray:
    """Each feature's calibrated threshold; a feature without one is never 'flagged'."""
    return np.array(
        [f.calibration.threshold if f.calibration else np.inf for f in bundle.spec.features]
    )
