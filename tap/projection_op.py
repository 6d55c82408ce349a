"""The projection as a registered custom op, so torch.compile and CUDA graphs keep it.

``out[:n] = (hidden + residual) @ weight`` in fp32, written into a persistent buffer the host side
reads after the step. A Python forward hook would be skipped by a compiled graph; an op is not.
"""

from __future__ import annotations

import torch
from torch.library import Library

_LIB = Library("misalign", "FRAGMENT")  # the op lives as long as this object


def _project(
    hidden: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, out: torch.Tensor
) -> None:
    n = hidden.shape[0]
    torch.matmul((hidden + residual).to(torch.float32), weight, out=out[:n])


def _project_fake(
    hidden: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, out: torch.Tensor
) -> None:
    return None


def register() -> None:
    if hasattr(torch.ops.misalign, "project"):
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op(
        op_name="project",
        op_func=_project,
        mutates_args=["out"],
        fake_impl=_project_fake,
        target_lib=_LIB,
    )
