"""Backward passes as differentiable torch ops, for backwards that run with create_graph=True.

The kernels' backward passes (Triton, C++/CUDA) are first-order only: their outputs carry no autograd
history. A backward that runs with grad mode on (`torch.autograd.grad(..., create_graph=True)`, as a
gradient penalty does) must give gradients that can be differentiated again, so every backend's
autograd calls these instead in that case: the torch backend's forward (the reference semantics) is
re-run on the saved tensors under autograd and differentiated with create_graph=True. Second
derivatives are then exactly those of the torch backend. This path costs a recomputation, but runs
only when a graph of the backward is asked for; ordinary training never takes it.

Each function takes what the ops save for backward plus the incoming gradients (None = zero) and
returns the input gradients in the op's argument order (None for non-tensor arguments).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import torch_backend


def wanted() -> bool:
    """Whether a backward must build a graph (it runs under create_graph=True). Never while compiling:
    AOTAutograd traces backwards for first-order use only, and they must stay on the kernels."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _vjp(fn, inputs, grad_outputs):
    """Gradients of fn(*inputs) with respect to its tensor inputs, as a differentiable function of the
    inputs and of grad_outputs (None = zero).

    torch.func.vjp differentiates fn alone, at its own level: a nested torch.autograd.grad would also
    walk the inputs' histories (back into the very op whose backward this is, for a saved output).
    """
    slots = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor)]

    def on_tensors(*tensors):
        args = list(inputs)
        for i, t in zip(slots, tensors):
            args[i] = t
        out = fn(*args)
        return out if isinstance(out, tuple) else (out,)

    outs, pullback = torch.func.vjp(on_tensors, *(inputs[i] for i in slots))
    if all(g is None for g in grad_outputs):
        return tuple(None for _ in inputs)
    cot = tuple(torch.zeros_like(o) if g is None else g.to(o.dtype) for o, g in zip(outs, grad_outputs))
    grads = iter(pullback(cot))
    return tuple(next(grads) if isinstance(t, torch.Tensor) else None for t in inputs)


def _placeholder(like: torch.Tensor, dtype: torch.dtype, shape=None) -> torch.Tensor:
    """An input the gradients do not depend on (shift, x of x + gate*y): only its shape and dtype matter."""
    return like.new_zeros(like.shape if shape is None else shape, dtype=dtype)


def adaln_modulate(x, shift_dtype, scale, eps, h_dtype, dh, norm="layer", weight=None):
    """(dx, dshift, dscale, dweight) of h = adaln_modulate(x, shift, scale, eps, h_dtype, norm, weight);
    shift_dtype None: no shift (dshift None); dweight None without a weight."""
    shift = None if shift_dtype is None else _placeholder(scale, shift_dtype)
    return _vjp(lambda x, s, c, w: torch_backend.adaln_modulate(x, s, c, eps, h_dtype, norm, w),
                (x, shift, scale, weight), (dh,))


def gated_residual(x_dtype, y, gate, bias, dout):
    """(dx, dy, dgate, dbias) of x_out = gated_residual(x, y, gate, bias); dbias None without a bias."""
    x = _placeholder(y, x_dtype)
    return _vjp(torch_backend.gated_residual, (x, y, gate, bias), (dout,))


def gated_residual_adaln(x_out, y, gate, bias, shift_dtype, scale, eps, h_dtype, dx_out, dh, norm="layer",
                         weight=None):
    """(dx, dy, dgate, dbias, dshift, dscale, dweight) of (x_out, h) = gated_residual_adaln(x, y, gate, shift,
    scale, ..., bias, norm, weight), from the saved output x_out (h is a function of x_out; x_out's own history
    carries the rest)."""
    dxo_h, dshift, dscale, dweight = adaln_modulate(x_out, shift_dtype, scale, eps, h_dtype, dh, norm, weight)
    parts = [g for g in (dx_out, dxo_h) if g is not None]
    total = None if not parts else parts[0] if len(parts) == 1 else parts[0] + parts[1]
    dx, dy, dgate, dbias = gated_residual(x_out.dtype, y, gate, bias, total)
    return dx, dy, dgate, dbias, dshift, dscale, dweight


def final_layer(x, shift, scale, weight, bias, patch_size, out_channels, eps, dout, norm="layer", norm_weight=None):
    """Gradients of final_layer(x, shift, scale, weight, bias, patch_size, out_channels, eps, rms, norm_weight)
    over those 10 arguments (the Triton op's; shift and norm_weight may be None). h is made in weight's dtype (the
    activation dtype the kernels use), so no autocast is needed here."""

    def fn(x, shift, scale, weight, bias, norm_weight):
        h = torch_backend.adaln_modulate(x, shift, scale, eps, weight.dtype, norm, norm_weight)
        return torch_backend.unpatchify(F.linear(h, weight, bias), patch_size, out_channels)

    dx, dshift, dscale, dweight, dbias, dnorm_weight = _vjp(fn, (x, shift, scale, weight, bias, norm_weight), (dout,))
    return dx, dshift, dscale, dweight, dbias, None, None, None, None, dnorm_weight


def bias_gelu_tanh(pre, bias, dout):
    """(dpre, dbias) of GELU_tanh(pre + bias) (bias may be None): the Triton linear_gelu_tanh's second half."""
    def fn(pre, bias):
        return F.gelu(pre if bias is None else pre + bias, approximate="tanh")

    return _vjp(fn, (pre, bias), (dout,))
