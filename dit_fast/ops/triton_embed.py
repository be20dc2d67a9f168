"""Triton patch_embed, final_layer and linear_gelu_tanh as registered torch ops with autograd.

Layering: kernels/{patch_embed,final_layer,gelu,gemm_gelu}.py hold the kernels and launchers. Here each op is a
`torch.library.custom_op` (schema + fake kernel + autograd) named dit_fast_triton::<op>_fwd, with
dit_fast_triton::<op>_bwd where the backward is a Triton kernel (AOTAutograd traces backward formulas
with fake tensors); patch_embed's backward is torch ops only and needs none. The three call paths of
each op (compiled, eager with grad, eager without) come from one spec (triton_op.py).

Dtypes (matching the "torch" backend): the GEMM runs in the activation dtype, which is the autocast
dtype when autocast is on for the tensors' device (as F.linear under autocast would cast), else x's
dtype; weight and bias are cast to it here, outside the op, so their gradients flow back through the
casts in their own dtypes. Accumulation and all elementwise math are float32.
- patch_embed: output dtype = promote(activation dtype, pos_embed dtype), like `F.linear(...) + pos_embed`.
  Outside autocast, dit_fast.ops.patch_embed refuses an x whose dtype differs from weight's or bias's, as
  nn.Conv2d does (one rule for every backend), so the casts here only act under autocast.
- final_layer: output in the activation dtype; shift/scale/x and the norm gain may be any float dtypes (read as
  float32).
- linear_gelu_tanh: output in the activation dtype. Default: cuBLAS GEMM without the bias, then one pass
  for bias + GELU; DIT_FAST_FC1_GEMM=triton: one Triton GEMM with the bias + GELU epilogue, reading the
  weight in its own dtype (no per-call cast in the forward).
These kernels accumulate in float32, so the capability table (dit_fast/backends.py) sends float64 inputs
to the torch backend.
"""
from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F

from ..backends import warn_once
from ..kernels import final_layer as _fl
from ..kernels import gelu as _gelu
from ..kernels import gemm_gelu as _gemm_gelu
from ..kernels import patch_embed as _pe
from . import bias_grad_op as BG
from . import differentiable_backward as DB
from . import gelu_epilogue
from .triton_op import TritonOp

__all__ = ["patch_embed", "final_layer", "linear_gelu_tanh"]


def _act_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


# ----------------------------------------------------------------------------------------- patch_embed


def _launch_patch_embed(x, weight, bias, pos_embed, patch_size):
    return _pe.patch_embed_fwd(x, _cast(weight, x.dtype), _cast(bias, x.dtype), pos_embed, patch_size)


@torch.library.custom_op("dit_fast_triton::patch_embed_fwd", mutates_args=())
def _patch_embed_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], pos_embed: torch.Tensor, patch_size: int
) -> torch.Tensor:
    return _launch_patch_embed(x, weight, bias, pos_embed, patch_size)


@_patch_embed_fwd.register_fake
def _(x, weight, bias, pos_embed, patch_size):
    N, _, H, W = x.shape
    T = (H // patch_size) * (W // patch_size)
    return x.new_empty((N, T, weight.shape[0]), dtype=torch.promote_types(x.dtype, pos_embed.dtype))


def _patch_embed_setup(ctx, inputs, output):
    x, weight, bias, pos_embed, patch_size = inputs
    ctx.save_for_backward(x, weight)
    ctx.patch_size = patch_size
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.pos_dtype = pos_embed.dtype


def _patch_embed_backward(ctx, _kernels, dout):
    # torch ops only (see kernels/patch_embed.py): traced as is when compiling, differentiable as is.
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


_PATCH_EMBED = TritonOp(
    _patch_embed_fwd, _launch_patch_embed, _patch_embed_setup, _patch_embed_backward,
    lambda ctx, dout: _patch_embed_backward(ctx, None, dout), eager_kernels=None, compiled_kernels=None,
)


def patch_embed(x, weight, bias, pos_embed, patch_size):
    """Patchify + projection + bias + pos_embed; see kernels/patch_embed.py and the module notes on dtypes."""
    act = _act_dtype(x)
    return _PATCH_EMBED(_cast(x, act), _cast(weight, act), _cast(bias, act), pos_embed, patch_size)


# ----------------------------------------------------------------------------------------- final_layer


def _launch_final_layer(x, shift, scale, weight, bias, patch_size, out_channels, eps, rms=False, norm_weight=None):
    return _fl.final_layer_fwd(x, shift, scale, weight, _cast(bias, weight.dtype), patch_size, out_channels, eps,
                               rms=rms, norm_weight=norm_weight)


@torch.library.custom_op("dit_fast_triton::final_layer_fwd", mutates_args=())
def _final_layer_fwd(
    x: torch.Tensor,
    shift: Optional[torch.Tensor],
    scale: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    patch_size: int,
    out_channels: int,
    eps: float,
    rms: bool = False,
    norm_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    return _launch_final_layer(x, shift, scale, weight, bias, patch_size, out_channels, eps, rms, norm_weight)


@_final_layer_fwd.register_fake
def _(x, shift, scale, weight, bias, patch_size, out_channels, eps, rms=False, norm_weight=None):
    B, L, _ = x.shape
    side = int(L**0.5 + 0.5) * patch_size
    return x.new_empty((B, out_channels, side, side), dtype=weight.dtype)


def _launch_final_layer_bwd(dout, x, shift, scale, weight, patch_size, out_channels, eps, need_weight, rms=False,
                            norm_weight=None):
    grads = _fl.final_layer_bwd(dout, x, shift, scale, weight, patch_size, out_channels, eps, need_weight,
                                rms=rms, norm_weight=norm_weight)
    # an op returns tensors: empty ones stand for "not computed" (no shift, no gain, weight's not needed)
    return tuple(x.new_empty(0) if g is None else g for g in grads)


@torch.library.custom_op("dit_fast_triton::final_layer_bwd", mutates_args=())
def _final_layer_bwd(
    dout: torch.Tensor,
    x: torch.Tensor,
    shift: Optional[torch.Tensor],
    scale: torch.Tensor,
    weight: torch.Tensor,
    patch_size: int,
    out_channels: int,
    eps: float,
    need_weight: bool,
    rms: bool = False,
    norm_weight: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_final_layer_bwd(dout, x, shift, scale, weight, patch_size, out_channels, eps, need_weight, rms,
                                   norm_weight)


@_final_layer_bwd.register_fake
def _(dout, x, shift, scale, weight, patch_size, out_channels, eps, need_weight, rms=False, norm_weight=None):
    def like(t, present=True):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if present else x.new_empty(0)

    return (
        like(x),
        like(shift, shift is not None),
        like(scale),
        like(weight, need_weight),
        weight.new_empty(weight.shape[0]) if need_weight else x.new_empty(0),
        like(norm_weight, norm_weight is not None),
    )


def _final_layer_setup(ctx, inputs, output):
    x, shift, scale, weight, bias, patch_size, out_channels, eps, rms, norm_weight = inputs  # defaults filled in
    ctx.save_for_backward(x, shift, scale, weight, bias, norm_weight)
    ctx.args = (patch_size, out_channels, eps)
    ctx.rms = rms
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _final_layer_backward(ctx, kernels, dout):
    x, shift, scale, weight, _, norm_weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_w = bool(need[3] or need[4])
    dx, dshift, dscale, dw, db, dnw = kernels.final_layer_bwd(dout.contiguous(), x, shift, scale, weight, *ctx.args,
                                                              need_w, ctx.rms, norm_weight)
    if need_w and ctx.bias_dtype is not None:
        db = db.to(ctx.bias_dtype)
    grads = (dx, dshift, dscale, dw, db, None, None, None, None, dnw)
    return tuple(g if wanted else None for g, wanted in zip(grads, need))


def _final_layer_graph_backward(ctx, dout):
    x, shift, scale, weight, bias, norm_weight = ctx.saved_tensors
    return DB.final_layer(x, shift, scale, weight, bias, *ctx.args, dout, "rms" if ctx.rms else "layer", norm_weight)


_FINAL_LAYER = TritonOp(
    _final_layer_fwd, _launch_final_layer, _final_layer_setup, _final_layer_backward, _final_layer_graph_backward,
    eager_kernels=SimpleNamespace(final_layer_bwd=_launch_final_layer_bwd),
    compiled_kernels=SimpleNamespace(final_layer_bwd=_final_layer_bwd),
)


def final_layer(x, shift, scale, weight, bias, patch_size, out_channels, eps=1e-6, norm="layer", norm_weight=None):
    """adaLN modulate + linear + unpatchify in one kernel; see kernels/final_layer.py and the module notes on
    dtypes. LightningDiT's modes (norm="rms", the norm's gain norm_weight, shift None) are that kernel's flags."""
    act = _act_dtype(x)
    return _FINAL_LAYER(x, shift, scale, _cast(weight, act), _cast(bias, act), patch_size, out_channels, eps,
                        norm == "rms", norm_weight)


# ------------------------------------------------------------------------------------ linear_gelu_tanh
# fc1 = F.linear(x, weight) without its bias, then one Triton pass adds the bias and applies GELU-tanh
# (forward), or turns d(out) into d(pre) and sums d(bias) (backward). The GEMM is F.linear itself, so
# under autocast the weight is cast by autocast, through its weight cache (reused by an activation
# checkpoint's recompute), exactly as the torch backend's F.linear casts it; the bias is read in its own
# dtype by the kernel, never cast. The GEMM output is saved for the backward (eager PyTorch saves its
# pre-activation too); without grad GELU runs in place on it, or, on a GPU whose cuBLASLt GELU epilogue
# was checked to be the tanh form, in the GEMM's epilogue (gelu_epilogue.py).


def _launch_bias_gelu(pre, bias):
    return _gelu.gelu_tanh_fwd(pre, bias=bias)


def _launch_bias_gelu_no_grad(pre, bias):
    # pre is always the GEMM output made by linear_gelu_tanh below: nobody else holds it
    return _gelu.gelu_tanh_fwd(pre, out=pre, bias=bias)


@torch.library.custom_op("dit_fast_triton::bias_gelu_tanh_fwd", mutates_args=())
def _bias_gelu_fwd(pre: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _launch_bias_gelu(pre, bias)


@_bias_gelu_fwd.register_fake
def _(pre, bias):
    return torch.empty_like(pre, memory_format=torch.contiguous_format)


def _gelu_tanh_bwd(dout, pre, bias, need_bias_grad):
    return _gelu.gelu_tanh_bwd(dout, pre, need_bias_grad, bias=bias)


_launch_bias_gelu_bwd, _bias_gelu_bwd = BG.backward_op("bias_gelu_tanh_bwd", _gelu_tanh_bwd)


def _bias_gelu_backward(ctx, kernels, dout):
    return BG.backward(ctx, kernels.bias_gelu_tanh_bwd, dout)  # d(bias) from the same pass over d(pre)


def _bias_gelu_graph_backward(ctx, dout):
    pre, bias = ctx.saved_tensors
    return DB.bias_gelu_tanh(pre, bias, dout)


_BIAS_GELU = TritonOp(
    _bias_gelu_fwd, _launch_bias_gelu, BG.save_inputs, _bias_gelu_backward, _bias_gelu_graph_backward,
    eager_kernels=SimpleNamespace(bias_gelu_tanh_bwd=_launch_bias_gelu_bwd),
    compiled_kernels=SimpleNamespace(bias_gelu_tanh_bwd=_bias_gelu_bwd),
    launch_no_grad=_launch_bias_gelu_no_grad,
)


# Opt-in (DIT_FAST_FC1_GEMM=triton): fc1 as one Triton GEMM whose epilogue adds the bias and applies
# GELU (kernels/gemm_gelu.py), storing the bias-free pre-activation only when a gradient is needed, so
# that the backward above (bias_gelu_tanh_bwd, then the two GEMMs) serves both paths. The weight is read
# in its own dtype (float32 under autocast) and cast per tile inside the kernel: no cast of it per call in
# the forward. The backward casts it for d(x) = d(pre) @ W, as autocast's F.linear would have, and gives
# d(weight) in the weight's dtype from a GEMM in the activation dtype, as autocast's F.linear does.

FC1_GEMM_VAR = "DIT_FAST_FC1_GEMM"
FC1_GEMM_CHOICES = ("cublas", "triton")


def fc1_gemm_choice() -> str:
    """DIT_FAST_FC1_GEMM, read at every call: "cublas" (the default: F.linear + the Triton GELU pass) or
    "triton" (the GEMM-epilogue kernel)."""
    value = os.environ.get(FC1_GEMM_VAR, "").strip().lower() or "cublas"
    if value not in FC1_GEMM_CHOICES:
        raise ValueError(f"{FC1_GEMM_VAR} must be one of {FC1_GEMM_CHOICES}, got {os.environ[FC1_GEMM_VAR]!r}")
    return value


def _gemm_refusal(device_type, x_dtype, w_dtype, b_dtype, x_dim, w_dim, same_device) -> str:
    """Why the Triton GEMM cannot run fc1 for these inputs ("" if it can)."""
    if device_type != "cuda" and not (device_type == "cpu" and _gemm_gelu.interpreting()):
        return f"Triton does not run {device_type} tensors here"
    dtypes = {"x": x_dtype, "weight": w_dtype, "bias": b_dtype}
    for name, dtype in dtypes.items():
        if dtype is not None and dtype not in _gemm_gelu.SUPPORTED_DTYPES:
            return f"{name} is {dtype} (it takes float16, bfloat16 and float32)"
    if x_dim < 2 or w_dim != 2:
        return f"it takes x with 2+ dims and a 2-D weight, got {x_dim}-D x and a {w_dim}-D weight"
    if not same_device:
        return "x, weight and bias are not on one device"
    return ""


def _use_triton_gemm(device_type, x_dtype, w_dtype, b_dtype, x_dim, w_dim, same_device) -> bool:
    """Whether fc1 runs as the Triton GEMM: asked for, and the inputs are supported; when asked for but
    not supported, the reason is warned once (never a silent fallback)."""
    if fc1_gemm_choice() != "triton":
        return False
    why = _gemm_refusal(device_type, x_dtype, w_dtype, b_dtype, x_dim, w_dim, same_device)
    if why:
        warn_once(("fc1_gemm", why), f"dit_fast: {FC1_GEMM_VAR}=triton, but fc1 runs as F.linear + the Triton GELU "
                                     f"pass: {why}")
    return not why


# torch.compile runs it once while tracing (its arguments are constants there) and keeps the answer, as
# for backends.resolve: no graph break for the warning, and like DIT_FAST_BACKEND the variable is read
# when a function is compiled, not at each call of the compiled function.
_use_triton_gemm._dynamo_marked_constant = True


@torch.library.custom_op("dit_fast_triton::linear_bias_gelu_tanh_fwd", mutates_args=())
def _linear_bias_gelu_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], need_pre: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _gemm_gelu.linear_bias_gelu_fwd(x, weight, bias, need_pre)


@_linear_bias_gelu_fwd.register_fake
def _(x, weight, bias, need_pre):
    out = x.new_empty((*x.shape[:-1], weight.shape[0]))
    return out, torch.empty_like(out) if need_pre else x.new_empty(0)


def _linear_bias_gelu_setup(ctx, inputs, output):
    x, weight, bias, _ = inputs
    ctx.save_for_backward(x, weight, bias, output[1])


def _linear_weight_grads(ctx, x, weight, dpre):
    """(d(x), d(weight)) of pre = x @ W^T from d(pre), in the activation dtype (x's), as the GEMMs of
    autocast's F.linear run; d(weight) comes back in the weight's dtype."""
    need_x, need_w = ctx.needs_input_grad[:2]
    dpre2 = dpre.reshape(-1, dpre.shape[-1])
    dx = (dpre2 @ _cast(weight, dpre.dtype)).view(x.shape) if need_x else None
    dw = (dpre2.t() @ x.reshape(-1, x.shape[-1])).to(weight.dtype) if need_w else None
    return dx, dw


def _linear_bias_gelu_backward(ctx, kernels, dout):
    x, weight, bias, pre = ctx.saved_tensors
    need_b = bool(ctx.needs_input_grad[2] and bias is not None)
    dpre, db = kernels.bias_gelu_tanh_bwd(dout, pre, bias, need_b)
    dx, dw = _linear_weight_grads(ctx, x, weight, dpre)
    return dx, dw, db.to(bias.dtype) if need_b else None, None


def _linear_bias_gelu_graph_backward(ctx, dout):
    # pre is recomputed with autograd history, so that d(pre)'s dependence on x and W enters second derivatives
    x, weight, bias, _ = ctx.saved_tensors
    pre = F.linear(x, _cast(weight, x.dtype))
    dpre, db = DB.bias_gelu_tanh(pre, bias, dout)
    dx, dw = _linear_weight_grads(ctx, x, weight, dpre)
    return dx, dw, db if ctx.needs_input_grad[2] else None, None


_LINEAR_BIAS_GELU = TritonOp(
    _linear_bias_gelu_fwd, _gemm_gelu.linear_bias_gelu_fwd, _linear_bias_gelu_setup, _linear_bias_gelu_backward,
    _linear_bias_gelu_graph_backward,
    eager_kernels=SimpleNamespace(bias_gelu_tanh_bwd=_launch_bias_gelu_bwd),
    compiled_kernels=SimpleNamespace(bias_gelu_tanh_bwd=_bias_gelu_bwd),
)


def _needs_grad(x, weight, bias) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or _requires_grad(bias))


def linear_gelu_tanh(x, weight, bias):
    """GELU_tanh(x @ weight.T + bias); see the notes above on the forward and dtypes."""
    act = _act_dtype(x)
    same_device = weight.device == x.device and (bias is None or bias.device == x.device)
    if _use_triton_gemm(x.device.type, act, weight.dtype, None if bias is None else bias.dtype, x.dim(),
                        weight.dim(), same_device):
        x = _cast(x, act)
        return _LINEAR_BIAS_GELU(x, weight, bias, _needs_grad(x, weight, bias))
    autocasting = x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type)
    if not _needs_grad(x, weight, bias):
        out = gelu_epilogue.linear_gelu_tanh(x, weight, bias, act)
        if out is not None:
            return out
    pre = F.linear(x, weight) if autocasting else F.linear(x, _cast(weight, x.dtype))
    return _BIAS_GELU(pre, bias)


def _requires_grad(t: Optional[torch.Tensor]) -> bool:
    return t is not None and t.requires_grad
