"""The tap's work inside the forward, as registered custom ops so torch.compile and CUDA graphs
keep them (a Python forward hook would be skipped by a compiled graph; an op is not).

``misalign::project`` writes each row's feature activations into a persistent buffer the host
reads after the step::

    out[:n] = act((hidden + residual) @ weight + bias)     act: JumpReLU where a feature has a
                                                            threshold (SAE latents), else identity

``misalign::project_columns`` is the same for a bundle whose directions read several layers: the
op after each tapped layer computes that layer's directions and writes their columns of the one
buffer (``out[:n, cols]``), so after the forward each row holds its k numbers as for one layer.

``misalign::project_mitigate`` does the same, then moves the residual stream of the rows the host
marked (``ctl``, written before the step) away from the features::

    ablate:  x - (x·v̂) v̂        steer:  x - α v̂

For a feature mitigated only once its request is flagged, the decision is made here, on the
device, from the projection just computed: the request's running response mean (its sum and count
before this step come in ``ctl``) against the feature's threshold. ``applied[:n]`` says which rows
were changed, for the host to report.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.library import Library

from tap import state

_LIB = Library("misalign", "FRAGMENT")  # the ops live as long as this object

# Column blocks of the per-row control buffer ``ctl [rows, CTL_BLOCKS * k + 1]``.
ABLATE, STEER, GATED, PREV_SUM = range(4)
CTL_BLOCKS = 4  # then one column: the number of response rows before this step


def ctl_width(k: int) -> int:
    return CTL_BLOCKS * k + 1


def _activations(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, jump: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """Raw projections ``x @ weight`` (returned) and activations written into ``out``."""
    raw = torch.matmul(x, weight)
    act = raw + bias
    # NaN stays NaN (NaN <= t is false): the sidecar refuses it instead of scoring a 0.
    out.copy_(act.masked_fill(act <= jump, 0.0))
    return raw


def _project(
    hidden: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    jump: torch.Tensor,
    out: torch.Tensor,
) -> None:
    if state.paused():
        return
    n = hidden.shape[0]
    _activations((hidden + residual).to(torch.float32), weight, bias, jump, out[:n])


def _project_columns(
    hidden: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    jump: torch.Tensor,
    cols: torch.Tensor,
    out: torch.Tensor,
) -> None:
    if state.paused():
        return
    n = hidden.shape[0]
    act = torch.matmul((hidden + residual).to(torch.float32), weight) + bias
    out[:n].index_copy_(1, cols, act.masked_fill(act <= jump, 0.0))


def _project_columns_fake(
    hidden: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    jump: torch.Tensor,
    cols: torch.Tensor,
    out: torch.Tensor,
) -> None:
    return None


def _project_mitigate(
    hidden: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    jump: torch.Tensor,
    out: torch.Tensor,
    unit: torch.Tensor,
    inv_norm: torch.Tensor,
    threshold: torch.Tensor,
    ctl: torch.Tensor,
    applied: torch.Tensor,
) -> None:
    if state.paused():
        return
    n = hidden.shape[0]
    k = weight.shape[1]
    raw = _activations((hidden + residual).to(torch.float32), weight, bias, jump, out[:n])
    c = ctl[:n]
    ablate, steer = c[:, ABLATE * k : (ABLATE + 1) * k], c[:, STEER * k : (STEER + 1) * k]
    gated, prev_sum = c[:, GATED * k : (GATED + 1) * k], c[:, PREV_SUM * k : (PREV_SUM + 1) * k]
    running = (prev_sum + out[:n]) / (c[:, -1:] + 1.0)
    on = (gated == 0) | (running > threshold)  # as the sidecar flags: score > threshold
    coef = torch.where(on, ablate * raw * inv_norm + steer, 0.0)
    residual.sub_(torch.matmul(coef, unit).to(residual.dtype))
    applied[:n] = (coef != 0).any(dim=1).to(applied.dtype)


def _project_fake(
    hidden: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    jump: torch.Tensor,
    out: torch.Tensor,
) -> None:
    return None


def _project_mitigate_fake(
    hidden: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    jump: torch.Tensor,
    out: torch.Tensor,
    unit: torch.Tensor,
    inv_norm: torch.Tensor,
    threshold: torch.Tensor,
    ctl: torch.Tensor,
    applied: torch.Tensor,
) -> None:
    return None


def _register_plain(
    op_name: str,
    op_func: Callable[..., Any],
    mutates_args: list[str],
    fake_impl: Callable[..., Any],
) -> None:
    """What vLLM's ``direct_register_custom_op`` does, with torch alone (for timing the op where
    vLLM is not installed, such as a GPU machine with PyTorch only)."""
    from torch.library import infer_schema

    _LIB.define(op_name + infer_schema(op_func, mutates_args=mutates_args))
    key = "CUDA" if torch.cuda.is_available() else "CPU"
    _LIB.impl(op_name, op_func, dispatch_key=key)
    _LIB._register_fake(op_name, fake_impl)


def register() -> None:
    if hasattr(torch.ops.misalign, "project"):
        return
    register_op: Callable[..., Any] = _register_plain
    try:
        from vllm.utils.torch_utils import direct_register_custom_op

        register_op = partial(direct_register_custom_op, target_lib=_LIB)
    except ImportError:  # torch alone: timing the op on a machine without vLLM
        pass
    register_op("project", _project, ["out"], _project_fake)
    register_op("project_columns", _project_columns, ["out"], _project_columns_fake)
    register_op(
        "project_mitigate",
        _project_mitigate,
        ["out", "residual", "applied"],
        _project_mitigate_fake,
    )
