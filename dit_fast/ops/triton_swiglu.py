"""Triton swiglu as registered torch ops with autograd (kernels/swiglu.py holds the kernels).

dit_fast_triton::swiglu_fwd (schema + fake kernel) and dit_fast_triton::swiglu_bwd (the one-pass backward,
with w12's bias gradient summed in the same pass when a bias is passed); the three call paths (compiled,
eager with grad, eager without) come from one spec (triton_op.py). Output and d(ab) in ab's dtype, d(bias)
in the bias's dtype; math in float32, so the capability table sends float64 inputs to the torch backend.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch

from ..kernels import swiglu as _sw
from . import bias_grad_op as BG
from . import torch_lightning
from .differentiable_backward import _vjp
from .triton_op import TritonOp

__all__ = ["swiglu"]


def _launch_fwd(ab, bias):
    return _sw.swiglu_fwd(ab, bias)


@torch.library.custom_op("dit_fast_triton::swiglu_fwd", mutates_args=())
def _swiglu_fwd(ab: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _launch_fwd(ab, bias)


@_swiglu_fwd.register_fake
def _(ab, bias):
    return ab.new_empty((*ab.shape[:-1], ab.shape[-1] // 2))


_launch_bwd, _swiglu_bwd = BG.backward_op("swiglu_bwd", _sw.swiglu_bwd)


def _backward(ctx, kernels, dout):
    return BG.backward(ctx, kernels.swiglu_bwd, dout)


def _graph_backward(ctx, dout):
    ab, bias = ctx.saved_tensors
    return _vjp(torch_lightning.swiglu, (ab, bias), (dout,))


_SWIGLU = TritonOp(
    _swiglu_fwd, _launch_fwd, BG.save_inputs, _backward, _graph_backward,
    eager_kernels=SimpleNamespace(swiglu_bwd=_launch_bwd),
    compiled_kernels=SimpleNamespace(swiglu_bwd=_swiglu_bwd),
)


def swiglu(ab, bias=None):
    """silu(a) * b for ab = [a | b] [..., 2H], bias [2H] or None (w12's bias); see kernels/swiglu.py."""
    return _SWIGLU(ab, bias)
