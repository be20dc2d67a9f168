"""The Triton adaLN ops (kernels/adaln.py) as torch ops with autograd.

Each kernel pair is registered with `torch.library.custom_op` (schema + fake kernel +
register_autograd), so torch.compile traces through it with fullgraph=True. In eager mode the
dispatcher's per-call overhead is kept off the hot path: the public functions call the launchers
through a torch.autograd.Function instead, and only switch to the registered ops while
torch.compile is tracing. Both paths run the same launchers and the same backward formulas.

Registered ops (forwards also return the float32 row statistics mean, rstd [B, L] saved for backward):
  dit_fast::adaln_modulate(x, shift, scale, eps, h_dtype) -> (h, mean, rstd)
  dit_fast::adaln_modulate_backward(dh, x, scale, mean, rstd, shift_dtype) -> (dx, dshift, dscale)
  dit_fast::gated_residual(x, y, gate) -> x_out
  dit_fast::gated_residual_backward(dout, y, gate) -> (dy, dgate)
  dit_fast::gated_residual_adaln(x, y, gate, shift, scale, eps, h_dtype) -> (x_out, h, mean, rstd)
  dit_fast::gated_residual_adaln_backward(dx_out?, dh?, x_out, y, gate, scale, mean, rstd, shift_dtype)
      -> (dx, dy, dgate, dshift, dscale)

float64 inputs are computed in float64 by the same kernels (statistics then float64 too).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from ..kernels import adaln as K

# ----------------------------------------------------------------------------------------------
# Registered ops
# ----------------------------------------------------------------------------------------------


def _stats_like(x: Tensor, *inputs: Tensor) -> Tensor:
    B, L, _ = x.shape
    return x.new_empty((B, L), dtype=K.compute_dtype(*inputs))


@torch.library.custom_op("dit_fast::adaln_modulate", mutates_args=())
def _adaln_modulate_op(
    x: Tensor, shift: Tensor, scale: Tensor, eps: float, h_dtype: Optional[torch.dtype]
) -> tuple[Tensor, Tensor, Tensor]:
    return K.adaln_modulate_fwd(x, shift, scale, eps, h_dtype)


@_adaln_modulate_op.register_fake
def _(x, shift, scale, eps, h_dtype):
    return (
        x.new_empty(x.shape, dtype=h_dtype or x.dtype),
        _stats_like(x, x, shift, scale),
        _stats_like(x, x, shift, scale),
    )


@torch.library.custom_op("dit_fast::adaln_modulate_backward", mutates_args=())
def _adaln_modulate_backward_op(
    dh: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor, shift_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    return K.adaln_modulate_bwd(dh, x, scale, mean, rstd, shift_dtype)


@_adaln_modulate_backward_op.register_fake
def _(dh, x, scale, mean, rstd, shift_dtype):
    B, _, D = x.shape
    return (
        x.new_empty(x.shape),
        x.new_empty((B, D), dtype=shift_dtype),
        x.new_empty((B, D), dtype=scale.dtype),
    )


@torch.library.custom_op("dit_fast::gated_residual", mutates_args=())
def _gated_residual_op(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    return K.gated_residual_fwd(x, y, gate)


@_gated_residual_op.register_fake
def _(x, y, gate):
    return x.new_empty(x.shape)


@torch.library.custom_op("dit_fast::gated_residual_backward", mutates_args=())
def _gated_residual_backward_op(dout: Tensor, y: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    return K.gated_residual_bwd(dout, y, gate)


@_gated_residual_backward_op.register_fake
def _(dout, y, gate):
    return y.new_empty(y.shape), gate.new_empty(gate.shape)


@torch.library.custom_op("dit_fast::gated_residual_adaln", mutates_args=())
def _gated_residual_adaln_op(
    x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float, h_dtype: Optional[torch.dtype]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return K.gated_residual_adaln_fwd(x, y, gate, shift, scale, eps, h_dtype)


@_gated_residual_adaln_op.register_fake
def _(x, y, gate, shift, scale, eps, h_dtype):
    inputs = (x, y, gate, shift, scale)
    return (
        x.new_empty(x.shape),
        x.new_empty(x.shape, dtype=h_dtype or x.dtype),
        _stats_like(x, *inputs),
        _stats_like(x, *inputs),
    )


@torch.library.custom_op("dit_fast::gated_residual_adaln_backward", mutates_args=())
def _gated_residual_adaln_backward_op(
    dx_out: Optional[Tensor],
    dh: Optional[Tensor],
    x_out: Tensor,
    y: Tensor,
    gate: Tensor,
    scale: Tensor,
    mean: Tensor,
    rstd: Tensor,
    shift_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return K.gated_residual_adaln_bwd(dx_out, dh, x_out, y, gate, scale, mean, rstd, shift_dtype)


@_gated_residual_adaln_backward_op.register_fake
def _(dx_out, dh, x_out, y, gate, scale, mean, rstd, shift_dtype):
    B, _, D = x_out.shape
    return (
        x_out.new_empty(x_out.shape),
        y.new_empty(y.shape),
        gate.new_empty((B, D)),
        gate.new_empty((B, D), dtype=shift_dtype),
        scale.new_empty((B, D)),
    )


# The two ways of reaching the kernels; the backward formulas below take either.
_LAUNCH = SimpleNamespace(
    adaln_modulate_bwd=K.adaln_modulate_bwd,
    gated_residual_bwd=K.gated_residual_bwd,
    gated_residual_adaln_bwd=K.gated_residual_adaln_bwd,
)
_OPS = SimpleNamespace(
    adaln_modulate_bwd=_adaln_modulate_backward_op,
    gated_residual_bwd=_gated_residual_backward_op,
    gated_residual_adaln_bwd=_gated_residual_adaln_backward_op,
)

# ----------------------------------------------------------------------------------------------
# Backward formulas, shared by the registered ops and the eager autograd.Functions
# ----------------------------------------------------------------------------------------------


def _adaln_modulate_grads(kern, saved, shift_dtype, dh):
    x, scale, mean, rstd = saved
    return kern.adaln_modulate_bwd(dh, x, scale, mean, rstd, shift_dtype)


def _gated_residual_grads(kern, saved, x_dtype, dout):
    y, gate = saved
    dy, dgate = kern.gated_residual_bwd(dout, y, gate)
    return dout.to(x_dtype), dy, dgate


def _gated_residual_adaln_grads(kern, saved, shift_dtype, dx_out, dh):
    x_out, y, gate, scale, mean, rstd = saved
    return kern.gated_residual_adaln_bwd(dx_out, dh, x_out, y, gate, scale, mean, rstd, shift_dtype)


def _setup_adaln_modulate(ctx, inputs, output):
    x, shift, scale, _, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, scale, mean, rstd)
    ctx.shift_dtype = shift.dtype


def _backward_adaln_modulate(ctx, dh, _dmean, _drstd):
    dx, dshift, dscale = _adaln_modulate_grads(_OPS, ctx.saved_tensors, ctx.shift_dtype, dh)
    return dx, dshift, dscale, None, None


def _setup_gated_residual(ctx, inputs, output):
    x, y, gate = inputs
    ctx.save_for_backward(y, gate)
    ctx.x_dtype = x.dtype


def _backward_gated_residual(ctx, dout):
    return _gated_residual_grads(_OPS, ctx.saved_tensors, ctx.x_dtype, dout)


def _setup_gated_residual_adaln(ctx, inputs, output):
    _, y, gate, shift, scale, _, _ = inputs
    x_out, _, mean, rstd = output
    # x_out is also the next op's saved input, so keeping it costs no extra memory.
    ctx.save_for_backward(x_out, y, gate, scale, mean, rstd)
    ctx.shift_dtype = shift.dtype


def _backward_gated_residual_adaln(ctx, dx_out, dh, _dmean, _drstd):
    grads = _gated_residual_adaln_grads(_OPS, ctx.saved_tensors, ctx.shift_dtype, dx_out, dh)
    return (*grads, None, None)


_adaln_modulate_op.register_autograd(_backward_adaln_modulate, setup_context=_setup_adaln_modulate)
_gated_residual_op.register_autograd(_backward_gated_residual, setup_context=_setup_gated_residual)
_gated_residual_adaln_op.register_autograd(_backward_gated_residual_adaln, setup_context=_setup_gated_residual_adaln)

# ----------------------------------------------------------------------------------------------
# Eager path: autograd.Functions straight onto the launchers
# ----------------------------------------------------------------------------------------------


class _AdalnModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps, h_dtype):
        h, mean, rstd = K.adaln_modulate_fwd(x, shift, scale, eps, h_dtype)
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.shift_dtype = shift.dtype
        return h

    @staticmethod
    def backward(ctx, dh):
        dx, dshift, dscale = _adaln_modulate_grads(_LAUNCH, ctx.saved_tensors, ctx.shift_dtype, dh)
        return dx, dshift, dscale, None, None


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, gate):
        ctx.save_for_backward(y, gate)
        ctx.x_dtype = x.dtype
        return K.gated_residual_fwd(x, y, gate)

    @staticmethod
    def backward(ctx, dout):
        return _gated_residual_grads(_LAUNCH, ctx.saved_tensors, ctx.x_dtype, dout)


class _GatedResidualAdaln(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, gate, shift, scale, eps, h_dtype):
        x_out, h, mean, rstd = K.gated_residual_adaln_fwd(x, y, gate, shift, scale, eps, h_dtype)
        ctx.save_for_backward(x_out, y, gate, scale, mean, rstd)
        ctx.shift_dtype = shift.dtype
        return x_out, h

    @staticmethod
    def backward(ctx, dx_out, dh):
        grads = _gated_residual_adaln_grads(_LAUNCH, ctx.saved_tensors, ctx.shift_dtype, dx_out, dh)
        return (*grads, None, None)


# ----------------------------------------------------------------------------------------------
# Backend entry points (positional signatures of dit_fast.ops.torch_backend)
# ----------------------------------------------------------------------------------------------


def _check_h_dtype(h_dtype) -> None:
    if h_dtype is not None and not (isinstance(h_dtype, torch.dtype) and h_dtype.is_floating_point):
        raise TypeError(f"h_dtype must be None or a floating-point torch.dtype, got {h_dtype!r}")


def adaln_modulate(x, shift, scale, eps: float = 1e-6, h_dtype: Optional[torch.dtype] = None):
    """LayerNorm(x) (no affine) * (1 + scale) + shift, fused; h in h_dtype or x.dtype."""
    _check_h_dtype(h_dtype)
    if torch.compiler.is_compiling():
        return _adaln_modulate_op(x, shift, scale, float(eps), h_dtype)[0]
    return _AdalnModulate.apply(x, shift, scale, float(eps), h_dtype)


def gated_residual(x, y, gate):
    """x + gate * y in x.dtype, fused."""
    if torch.compiler.is_compiling():
        return _gated_residual_op(x, y, gate)
    return _GatedResidual.apply(x, y, gate)


def gated_residual_adaln(x, y, gate, shift, scale, eps: float = 1e-6, h_dtype: Optional[torch.dtype] = None):
    """(x_out, h): x_out = x + gate * y and h = adaln_modulate(x_out, shift, scale), in one pass."""
    _check_h_dtype(h_dtype)
    if torch.compiler.is_compiling():
        x_out, h, _, _ = _gated_residual_adaln_op(x, y, gate, shift, scale, float(eps), h_dtype)
        return x_out, h
    return _GatedResidualAdaln.apply(x, y, gate, shift, scale, float(eps), h_dtype)
