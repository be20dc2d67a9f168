"""Triton patch_embed, final_layer and linear_gelu_tanh as registered torch ops with autograd.

Layering: kernels/{patch_embed,final_layer,gelu}.py hold the kernels and launchers. Here each op is a
`torch.library.custom_op` (schema + fake kernel + `register_autograd`), so torch.compile sees an opaque
op with known shapes; backward kernels that are Triton are ops too, because AOTAutograd traces the
backward formula with fake tensors. In eager mode the public functions skip the dispatcher and call the
same launchers through a torch.autograd.Function (less per-call overhead); while compiling they call the
registered ops.

Dtypes (matching the "torch" backend): the GEMM runs in the activation dtype, which is the autocast
dtype when autocast is on for the tensors' device (as F.linear under autocast would cast), else x's
dtype; weight and bias are cast to it here, outside the op, so their gradients flow back through the
casts in their own dtypes. Accumulation and all elementwise math are float32.
- patch_embed: output dtype = promote(activation dtype, pos_embed dtype), like `F.linear(...) + pos_embed`.
- final_layer: output in the activation dtype; shift/scale/x may be any float dtypes (read as float32).
- linear_gelu_tanh: output in the activation dtype.
float64 inputs go to the torch backend (the kernels accumulate in float32), with a one-time warning.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..kernels import final_layer as _fl
from ..kernels import gelu as _gelu
from ..kernels import patch_embed as _pe
from .. import backends as _backends
from . import torch_backend as _torch

__all__ = ["patch_embed", "final_layer", "linear_gelu_tanh"]


def _act_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _float64_fallback(op: str, *tensors) -> bool:
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        _backends.warn_once(
            ("triton", op, "float64"),
            f"dit_fast: the triton backend's {op} accumulates in float32; float64 inputs run the torch backend",
        )
        return True
    return False


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------------------- patch_embed


@torch.library.custom_op("dit_fast::patch_embed", mutates_args=())
def _patch_embed_op(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], pos_embed: torch.Tensor, patch_size: int
) -> torch.Tensor:
    return _pe.patch_embed_fwd(x, _cast(weight, x.dtype), _cast(bias, x.dtype), pos_embed, patch_size)


@_patch_embed_op.register_fake
def _(x, weight, bias, pos_embed, patch_size):
    N, _, H, W = x.shape
    T = (H // patch_size) * (W // patch_size)
    return x.new_empty((N, T, weight.shape[0]), dtype=torch.promote_types(x.dtype, pos_embed.dtype))


def _patch_embed_backward(ctx, dout):
    # torch ops only (see kernels/patch_embed.py), so AOTAutograd traces it as is: no backward op needed.
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b, need_pos = ctx.needs_input_grad[:4]
    dx, dw, db, dpos = _pe.patch_embed_bwd(dout, x, weight, ctx.patch_size, need_x, need_w, need_b, need_pos)
    return (
        dx,
        dw,
        None if db is None else db.to(ctx.bias_dtype),
        None if dpos is None else dpos.to(ctx.pos_dtype),
        None,
    )


def _patch_embed_setup(ctx, inputs, output):
    x, weight, bias, pos_embed, patch_size = inputs
    ctx.save_for_backward(x, weight)
    ctx.patch_size = patch_size
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.pos_dtype = pos_embed.dtype


_patch_embed_op.register_autograd(_patch_embed_backward, setup_context=_patch_embed_setup)


class _PatchEmbedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, pos_embed, patch_size):
        _patch_embed_setup(ctx, (x, weight, bias, pos_embed, patch_size), None)
        return _pe.patch_embed_fwd(x, weight, bias, pos_embed, patch_size)

    @staticmethod
    def backward(ctx, dout):
        return _patch_embed_backward(ctx, dout)


def patch_embed(x, weight, bias, pos_embed, patch_size):
    """Patchify + projection + bias + pos_embed; see kernels/patch_embed.py and the module notes on dtypes."""
    if _float64_fallback("patch_embed", x, weight, bias, pos_embed):
        return _torch.patch_embed(x, weight, bias, pos_embed, patch_size)
    act = _act_dtype(x)
    x, weight, bias = _cast(x, act), _cast(weight, act), _cast(bias, act)
    if _compiling():
        return _patch_embed_op(x, weight, bias, pos_embed, patch_size)
    if _needs_grad(x, weight, bias, pos_embed):
        return _PatchEmbedFn.apply(x, weight, bias, pos_embed, patch_size)
    return _pe.patch_embed_fwd(x, weight, bias, pos_embed, patch_size)


# ----------------------------------------------------------------------------------------- final_layer


@torch.library.custom_op("dit_fast::final_layer", mutates_args=())
def _final_layer_op(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    patch_size: int,
    out_channels: int,
    eps: float,
) -> torch.Tensor:
    return _fl.final_layer_fwd(x, shift, scale, weight, _cast(bias, weight.dtype), patch_size, out_channels, eps)


def _final_layer_out_shape(x, patch_size, out_channels):
    B, L, _ = x.shape
    side = int(L**0.5 + 0.5) * patch_size
    return (B, out_channels, side, side)


@_final_layer_op.register_fake
def _(x, shift, scale, weight, bias, patch_size, out_channels, eps):
    return x.new_empty(_final_layer_out_shape(x, patch_size, out_channels), dtype=weight.dtype)


@torch.library.custom_op("dit_fast::final_layer_backward", mutates_args=())
def _final_layer_bwd_op(
    dout: torch.Tensor,
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    patch_size: int,
    out_channels: int,
    eps: float,
    need_weight: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dshift, dscale, dw, db = _fl.final_layer_bwd(
        dout, x, shift, scale, weight, patch_size, out_channels, eps, need_weight
    )
    if dw is None:  # an op returns tensors: empty ones stand for "not computed"
        dw, db = weight.new_empty(0), weight.new_empty(0)
    return dx, dshift, dscale, dw, db


@_final_layer_bwd_op.register_fake
def _(dout, x, shift, scale, weight, patch_size, out_channels, eps, need_weight):
    if need_weight:
        dw, db = torch.empty_like(weight), weight.new_empty(weight.shape[0])
    else:
        dw, db = weight.new_empty(0), weight.new_empty(0)
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(shift, memory_format=torch.contiguous_format),
        torch.empty_like(scale, memory_format=torch.contiguous_format),
        dw,
        db,
    )


def _final_layer_setup(ctx, inputs, output):
    x, shift, scale, weight, bias, patch_size, out_channels, eps = inputs
    ctx.save_for_backward(x, shift, scale, weight)
    ctx.args = (patch_size, out_channels, eps)
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _final_layer_grads(ctx, dout, bwd):
    x, shift, scale, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_w = bool(need[3] or need[4])
    dx, dshift, dscale, dw, db = bwd(dout.contiguous(), x, shift, scale, weight, *ctx.args, need_w)
    if not need_w:
        dw = db = None
    elif db is not None and ctx.bias_dtype is not None:
        db = db.to(ctx.bias_dtype)
    return (
        dx if need[0] else None,
        dshift if need[1] else None,
        dscale if need[2] else None,
        dw if need[3] else None,
        db if need[4] else None,
        None,
        None,
        None,
    )


_final_layer_op.register_autograd(
    lambda ctx, dout: _final_layer_grads(ctx, dout, _final_layer_bwd_op), setup_context=_final_layer_setup
)


class _FinalLayerFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, weight, bias, patch_size, out_channels, eps):
        _final_layer_setup(ctx, (x, shift, scale, weight, bias, patch_size, out_channels, eps), None)
        return _fl.final_layer_fwd(x, shift, scale, weight, bias, patch_size, out_channels, eps)

    @staticmethod
    def backward(ctx, dout):
        return _final_layer_grads(ctx, dout, _fl.final_layer_bwd)


def final_layer(x, shift, scale, weight, bias, patch_size, out_channels, eps=1e-6):
    """adaLN modulate + linear + unpatchify; see kernels/final_layer.py and the module notes on dtypes."""
    if _float64_fallback("final_layer", x, shift, scale, weight, bias):
        return _torch.final_layer(x, shift, scale, weight, bias, patch_size, out_channels, eps)
    act = _act_dtype(x)
    weight, bias = _cast(weight, act), _cast(bias, act)
    if _compiling():
        return _final_layer_op(x, shift, scale, weight, bias, patch_size, out_channels, eps)
    if _needs_grad(x, shift, scale, weight, bias):
        return _FinalLayerFn.apply(x, shift, scale, weight, bias, patch_size, out_channels, eps)
    return _fl.final_layer_fwd(x, shift, scale, weight, bias, patch_size, out_channels, eps)


# ------------------------------------------------------------------------------------ linear_gelu_tanh
# Forward: cuBLAS GEMM + bias (F.linear) writes the pre-activation, one Triton pass applies GELU-tanh.
# torch._addmm_activation's cuBLASLt GELU epilogue would save that pass, but it is the erf GELU on the CPU
# and unverified on the GPU, so it is not used. The pre-activation is kept for the backward (as eager
# PyTorch keeps it): the registered op returns it as a second output; without grad it is overwritten in place.


@torch.library.custom_op("dit_fast::linear_gelu_tanh", mutates_args=())
def _linear_gelu_op(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    pre = F.linear(x, _cast(weight, x.dtype), _cast(bias, x.dtype))
    return _gelu.gelu_tanh_fwd(pre), pre


@_linear_gelu_op.register_fake
def _(x, weight, bias):
    out = x.new_empty((*x.shape[:-1], weight.shape[0]))
    return out, torch.empty_like(out)


@torch.library.custom_op("dit_fast::gelu_tanh_backward", mutates_args=())
def _gelu_bwd_op(dout: torch.Tensor, pre: torch.Tensor, need_bias_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    dpre, dbias = _gelu.gelu_tanh_bwd(dout, pre, need_bias_grad)
    return dpre, dbias if dbias is not None else pre.new_empty(0, dtype=torch.float32)


@_gelu_bwd_op.register_fake
def _(dout, pre, need_bias_grad):
    n = pre.shape[-1] if need_bias_grad else 0
    return torch.empty_like(pre, memory_format=torch.contiguous_format), pre.new_empty(n, dtype=torch.float32)


def _save_linear_gelu(ctx, x, weight, bias, pre):
    ctx.save_for_backward(x, weight, pre)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _linear_gelu_setup(ctx, inputs, output):
    _save_linear_gelu(ctx, *inputs, output[1])
    ctx.mark_non_differentiable(output[1])  # pre is returned only to be saved; no zeros grad to add


def _linear_gelu_grads(ctx, dout, gelu_bwd):
    x, weight, pre = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = bool(need_b and ctx.has_bias)
    dpre, db = gelu_bwd(dout, pre, need_b)  # d(bias) comes out of the same pass over d(pre)
    d2 = dpre.reshape(-1, dpre.shape[-1])
    dx = (dpre @ weight.to(dpre.dtype)).to(x.dtype) if need_x else None
    dw = (d2.t() @ x.reshape(-1, x.shape[-1]).to(dpre.dtype)).to(weight.dtype) if need_w else None
    return dx, dw, db.to(ctx.bias_dtype) if need_b else None


_linear_gelu_op.register_autograd(
    lambda ctx, dout, dpre: _linear_gelu_grads(ctx, dout, _gelu_bwd_op), setup_context=_linear_gelu_setup
)


class _LinearGeluFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        pre = F.linear(x, weight, bias)
        out = _gelu.gelu_tanh_fwd(pre)
        _save_linear_gelu(ctx, x, weight, bias, pre)
        return out

    @staticmethod
    def backward(ctx, dout):
        return _linear_gelu_grads(ctx, dout, _gelu.gelu_tanh_bwd)


def linear_gelu_tanh(x, weight, bias):
    """GELU_tanh(x @ weight.T + bias); see the notes above on the forward and dtypes."""
    if _float64_fallback("linear_gelu_tanh", x, weight, bias):
        return _torch.linear_gelu_tanh(x, weight, bias)
    act = _act_dtype(x)
    x, weight, bias = _cast(x, act), _cast(weight, act), _cast(bias, act)
    if _compiling():
        return _linear_gelu_op(x, weight, bias)[0]
    if _needs_grad(x, weight, bias):
        return _LinearGeluFn.apply(x, weight, bias)
    pre = F.linear(x, weight, bias)
    return _gelu.gelu_tanh_fwd(pre, out=pre)
