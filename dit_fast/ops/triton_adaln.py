"""The Triton adaLN ops (kernels/adaln.py) as torch ops with autograd.

Registered ops, named like the ext backend's (docs/DESIGN.md, "Op contract"): forwards return the row
statistics mean, rstd [B, L] (compute dtype, dtypes.py) saved for backward; backwards take the output
gradients first, then the saved tensors, then dtype arguments.
  dit_fast_triton::adaln_modulate_fwd(x, shift?, scale, eps, h_dtype, rms, weight?) -> (h, mean, rstd)
  dit_fast_triton::adaln_modulate_bwd(dh, x, mean, rstd, scale, shift_dtype?, rms, weight?)
      -> (dx, dshift, dscale, dweight)
  dit_fast_triton::gated_residual_fwd(x, y, gate, bias?) -> x_out
  dit_fast_triton::gated_residual_bwd(dout, y, gate, bias?) -> (dy, dgate, dbias)
  dit_fast_triton::gated_residual_adaln_fwd(x, y, gate, bias?, shift?, scale, eps, h_dtype, rms, weight?)
      -> (x_out, h, mean, rstd)
  dit_fast_triton::gated_residual_adaln_bwd(dh?, dx_out?, x_out, y, gate, bias?, mean, rstd, scale, shift_dtype?,
      rms, weight?) -> (dx, dy, dgate, dbias, dshift, dscale, dweight)
bias [D] (optional): the bias of the GEMM that made y, added in the kernel (x + gate * (y + bias)); its
gradient is summed in the backward's pass. Norm modes: rms (RMSNorm instead of LayerNorm), weight [D] (the
norm's gain), shift None (scale-only adaLN; shift_dtype None in the backward). An absent input's gradient
comes back from a registered backward as an empty tensor.
Gradients come back in their inputs' dtypes. float64 inputs are computed in float64 by the same kernels.
The three call paths of each op (compiled, eager with grad, eager without) come from one spec (triton_op.py).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from ..kernels import adaln as K
from . import differentiable_backward as DB
from .adaln_saved import setup_adaln_modulate, setup_gated_residual, setup_gated_residual_adaln
from .dtypes import compute_dtype
from .triton_op import TritonOp

# ----------------------------------------------------------------------------------------------
# Registered ops (schema + fake kernel)
# ----------------------------------------------------------------------------------------------


def _stats_like(x: Tensor, *inputs: Tensor) -> Tensor:
    B, L, _ = x.shape
    return x.new_empty((B, L), dtype=compute_dtype(*inputs))


def _present(*tensors: Optional[Tensor]) -> tuple[Tensor, ...]:
    return tuple(t for t in tensors if t is not None)


@torch.library.custom_op("dit_fast_triton::adaln_modulate_fwd", mutates_args=())
def _adaln_modulate_fwd(
    x: Tensor, shift: Optional[Tensor], scale: Tensor, eps: float, h_dtype: Optional[torch.dtype], rms: bool = False,
    weight: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    return K.adaln_modulate_fwd(x, shift, scale, eps, h_dtype, rms, weight)


@_adaln_modulate_fwd.register_fake
def _(x, shift, scale, eps, h_dtype, rms=False, weight=None):
    inputs = (x, scale, *_present(shift, weight))
    return (x.new_empty(x.shape, dtype=h_dtype or x.dtype), _stats_like(x, *inputs), _stats_like(x, *inputs))


def _norm_grads_out(dshift, dweight, like: Tensor):
    """A registered op returns tensors only: an absent shift's / weight's gradient -> an empty tensor."""
    return _dbias_out(dshift, like), _dbias_out(dweight, like)


def _launch_adaln_modulate_bwd(dh, x, mean, rstd, scale, shift_dtype, rms, weight):
    dx, dshift, dscale, *dweight = K.adaln_modulate_bwd(dh, x, scale, mean, rstd, shift_dtype, rms, weight)
    dshift, dweight = _norm_grads_out(dshift, dweight[0] if dweight else None, x)
    return dx, dshift, dscale, dweight


@torch.library.custom_op("dit_fast_triton::adaln_modulate_bwd", mutates_args=())
def _adaln_modulate_bwd(
    dh: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor, shift_dtype: Optional[torch.dtype],
    rms: bool = False, weight: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _launch_adaln_modulate_bwd(dh, x, mean, rstd, scale, shift_dtype, rms, weight)


def _fake_dshift(shift_dtype, like: Tensor) -> Tensor:
    B, _, D = like.shape
    return like.new_empty(0) if shift_dtype is None else like.new_empty((B, D), dtype=shift_dtype)


@_adaln_modulate_bwd.register_fake
def _(dh, x, mean, rstd, scale, shift_dtype, rms=False, weight=None):
    B, _, D = x.shape
    return (x.new_empty(x.shape), _fake_dshift(shift_dtype, x), x.new_empty((B, D), dtype=scale.dtype),
            _dbias_fake(weight, x))


def _dbias_out(dbias: Optional[Tensor], like: Tensor) -> Tensor:
    """A registered op returns tensors only: no bias -> an empty dbias."""
    return like.new_empty(0) if dbias is None else dbias


def _dbias_fake(bias: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if bias is None else bias.new_empty(bias.shape)


def _with_bias(*inputs: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, ...]:
    return inputs if bias is None else (*inputs, bias)


@torch.library.custom_op("dit_fast_triton::gated_residual_fwd", mutates_args=())
def _gated_residual_fwd(x: Tensor, y: Tensor, gate: Tensor, bias: Optional[Tensor]) -> Tensor:
    return K.gated_residual_fwd(x, y, gate, bias)


@_gated_residual_fwd.register_fake
def _(x, y, gate, bias):
    return x.new_empty(x.shape)


def _launch_gated_residual_bwd(dout, y, gate, bias):
    dy, dgate, dbias = K.gated_residual_bwd(dout, y, gate, bias)
    return dy, dgate, _dbias_out(dbias, y)


@torch.library.custom_op("dit_fast_triton::gated_residual_bwd", mutates_args=())
def _gated_residual_bwd(dout: Tensor, y: Tensor, gate: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    return _launch_gated_residual_bwd(dout, y, gate, bias)


@_gated_residual_bwd.register_fake
def _(dout, y, gate, bias):
    return y.new_empty(y.shape), gate.new_empty(gate.shape), _dbias_fake(bias, y)


def _launch_gated_residual_adaln_fwd(x, y, gate, bias, shift, scale, eps, h_dtype, rms, weight):
    return K.gated_residual_adaln_fwd(x, y, gate, shift, scale, eps, h_dtype, bias, rms, weight)


@torch.library.custom_op("dit_fast_triton::gated_residual_adaln_fwd", mutates_args=())
def _gated_residual_adaln_fwd(
    x: Tensor, y: Tensor, gate: Tensor, bias: Optional[Tensor], shift: Optional[Tensor], scale: Tensor, eps: float,
    h_dtype: Optional[torch.dtype], rms: bool = False, weight: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _launch_gated_residual_adaln_fwd(x, y, gate, bias, shift, scale, eps, h_dtype, rms, weight)


@_gated_residual_adaln_fwd.register_fake
def _(x, y, gate, bias, shift, scale, eps, h_dtype, rms=False, weight=None):
    inputs = (x, y, gate, scale, *_present(shift, bias, weight))
    return (
        x.new_empty(x.shape),
        x.new_empty(x.shape, dtype=h_dtype or x.dtype),
        _stats_like(x, *inputs),
        _stats_like(x, *inputs),
    )


def _launch_gated_residual_adaln_bwd(dh, dx_out, x_out, y, gate, bias, mean, rstd, scale, shift_dtype, rms, weight):
    dx, dy, dgate, dshift, dscale, dbias, *dweight = K.gated_residual_adaln_bwd(
        dx_out, dh, x_out, y, gate, scale, mean, rstd, shift_dtype, bias, rms, weight)
    dshift, dweight = _norm_grads_out(dshift, dweight[0] if dweight else None, x_out)
    return dx, dy, dgate, _dbias_out(dbias, y), dshift, dscale, dweight


@torch.library.custom_op("dit_fast_triton::gated_residual_adaln_bwd", mutates_args=())
def _gated_residual_adaln_bwd(
    dh: Optional[Tensor],
    dx_out: Optional[Tensor],
    x_out: Tensor,
    y: Tensor,
    gate: Tensor,
    bias: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    scale: Tensor,
    shift_dtype: Optional[torch.dtype],
    rms: bool = False,
    weight: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _launch_gated_residual_adaln_bwd(dh, dx_out, x_out, y, gate, bias, mean, rstd, scale, shift_dtype, rms,
                                            weight)


@_gated_residual_adaln_bwd.register_fake
def _(dh, dx_out, x_out, y, gate, bias, mean, rstd, scale, shift_dtype, rms=False, weight=None):
    B, _, D = x_out.shape
    return (
        x_out.new_empty(x_out.shape),
        y.new_empty(y.shape),
        gate.new_empty((B, D)),
        _dbias_fake(bias, y),
        _fake_dshift(shift_dtype, x_out),
        scale.new_empty((B, D)),
        _dbias_fake(weight, x_out),
    )


# The backward kernels, reached directly (eager) or as registered ops (compiled); same signatures.
_EAGER = SimpleNamespace(
    adaln_modulate_bwd=_launch_adaln_modulate_bwd,
    gated_residual_bwd=_launch_gated_residual_bwd,
    gated_residual_adaln_bwd=_launch_gated_residual_adaln_bwd,
)
_COMPILED = SimpleNamespace(
    adaln_modulate_bwd=_adaln_modulate_bwd,
    gated_residual_bwd=_gated_residual_bwd,
    gated_residual_adaln_bwd=_gated_residual_adaln_bwd,
)

# ----------------------------------------------------------------------------------------------
# Autograd specs: what is saved (adaln_saved.py, shared with the ext backend), the first-order backward, the
# differentiable backward
# ----------------------------------------------------------------------------------------------


def _absent_as_none(grad: Tensor, present: bool):
    """The registered backwards return an empty tensor for an absent input's gradient: None to autograd."""
    return grad if present else None


def _backward_adaln_modulate(ctx, kernels, dh):
    x, mean, rstd, scale, weight = ctx.saved_tensors
    dx, dshift, dscale, dweight = kernels.adaln_modulate_bwd(dh, x, mean, rstd, scale, ctx.shift_dtype, ctx.rms,
                                                             weight)
    return (dx, _absent_as_none(dshift, ctx.shift_dtype is not None), dscale, None, None, None,
            _absent_as_none(dweight, weight is not None))


def _graph_backward_adaln_modulate(ctx, dh):
    x, _, _, scale, weight = ctx.saved_tensors
    dx, dshift, dscale, dweight = DB.adaln_modulate(x, ctx.shift_dtype, scale, ctx.eps, ctx.h_dtype, dh, ctx.norm,
                                                    weight)
    return dx, dshift, dscale, None, None, None, dweight


def _backward_gated_residual(ctx, kernels, dout):
    y, gate, bias = ctx.saved_tensors
    dy, dgate, dbias = kernels.gated_residual_bwd(dout, y, gate, bias)
    return dout.to(ctx.x_dtype), dy, dgate, dbias if bias is not None else None


def _graph_backward_gated_residual(ctx, dout):
    return DB.gated_residual(ctx.x_dtype, *ctx.saved_tensors, dout)


def _backward_gated_residual_adaln(ctx, kernels, dx_out, dh):
    x_out, y, gate, bias, mean, rstd, scale, weight = ctx.saved_tensors
    dx, dy, dgate, dbias, dshift, dscale, dweight = kernels.gated_residual_adaln_bwd(
        dh, dx_out, x_out, y, gate, bias, mean, rstd, scale, ctx.shift_dtype, ctx.rms, weight)
    return (dx, dy, dgate, _absent_as_none(dbias, bias is not None),
            _absent_as_none(dshift, ctx.shift_dtype is not None), dscale, None, None, None,
            _absent_as_none(dweight, weight is not None))


def _graph_backward_gated_residual_adaln(ctx, dx_out, dh):
    x_out, y, gate, bias, _, _, scale, weight = ctx.saved_tensors
    dx, dy, dgate, dbias, dshift, dscale, dweight = DB.gated_residual_adaln(
        x_out, y, gate, bias, ctx.shift_dtype, scale, ctx.eps, ctx.h_dtype, dx_out, dh, ctx.norm, weight)
    return dx, dy, dgate, dbias, dshift, dscale, None, None, None, dweight


_ADALN_MODULATE = TritonOp(
    _adaln_modulate_fwd, K.adaln_modulate_fwd, setup_adaln_modulate, _backward_adaln_modulate,
    _graph_backward_adaln_modulate, eager_kernels=_EAGER, compiled_kernels=_COMPILED, n_out=1,
)
_GATED_RESIDUAL = TritonOp(
    _gated_residual_fwd, K.gated_residual_fwd, setup_gated_residual, _backward_gated_residual,
    _graph_backward_gated_residual, eager_kernels=_EAGER, compiled_kernels=_COMPILED, n_out=1,
)
_GATED_RESIDUAL_ADALN = TritonOp(
    _gated_residual_adaln_fwd, _launch_gated_residual_adaln_fwd, setup_gated_residual_adaln,
    _backward_gated_residual_adaln, _graph_backward_gated_residual_adaln,
    eager_kernels=_EAGER, compiled_kernels=_COMPILED, n_out=2,
)

# ----------------------------------------------------------------------------------------------
# Backend entry points (positional signatures of dit_fast.ops.torch_backend; inputs checked by dit_fast.ops)
# ----------------------------------------------------------------------------------------------


def adaln_modulate(x, shift, scale, eps: float = 1e-6, h_dtype: Optional[torch.dtype] = None, norm: str = "layer",
                   weight=None):
    """norm(x) * weight * (1 + scale) + shift, fused (norm "layer" or "rms"; weight, shift optional); h in
    h_dtype or x.dtype."""
    return _ADALN_MODULATE(x, shift, scale, float(eps), h_dtype, norm == "rms", weight)


def gated_residual(x, y, gate, bias=None):
    """x + gate * (y + bias) in x.dtype, fused."""
    return _GATED_RESIDUAL(x, y, gate, bias)


def gated_residual_adaln(x, y, gate, shift, scale, eps: float = 1e-6, h_dtype: Optional[torch.dtype] = None,
                         bias=None, norm: str = "layer", weight=None):
    """(x_out, h): x_out = x + gate * (y + bias) and h = adaln_modulate(x_out, shift, scale, norm=norm,
    weight=weight), in one pass."""
    return tuple(_GATED_RESIDUAL_ADALN(x, y, gate, bias, shift, scale, float(eps), h_dtype, norm == "rms", weight))
