"""What the adaLN-family forward ops save for their backward: the autograd setup shared by the ext and Triton
backends, whose registered forwards take the same inputs and return the same outputs (docs/DESIGN.md, "Op
contract"): adaln_modulate_fwd(x, shift?, scale, eps, h_dtype, rms, weight?) -> (h, mean, rstd),
gated_residual_fwd(x, y, gate, bias?) -> x_out, gated_residual_adaln_fwd(x, y, gate, bias?, shift?, scale, eps,
h_dtype, rms, weight?) -> (x_out, h, mean, rstd)."""
from __future__ import annotations


def save_norm_mode(ctx, shift, rms: bool, eps: float, h_dtype) -> None:
    """The norm's mode of the call: shift's dtype (None: scale-only adaLN, so no dshift), rms (and its name for
    the differentiable backward), eps and h_dtype."""
    ctx.shift_dtype = None if shift is None else shift.dtype
    ctx.rms, ctx.norm = rms, "rms" if rms else "layer"
    ctx.eps, ctx.h_dtype = eps, h_dtype


def setup_adaln_modulate(ctx, inputs, output) -> None:
    x, shift, scale, eps, h_dtype, rms, weight = inputs
    _h, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd, scale, weight)
    save_norm_mode(ctx, shift, rms, eps, h_dtype)


def setup_gated_residual(ctx, inputs, output) -> None:
    x, y, gate, bias = inputs
    ctx.save_for_backward(y, gate, bias)
    ctx.x_dtype = x.dtype


def setup_gated_residual_adaln(ctx, inputs, output) -> None:
    _x, y, gate, bias, shift, scale, eps, h_dtype, rms, weight = inputs
    x_out, _h, mean, rstd = output
    # x_out is also the next op's saved input, so keeping it costs no extra memory.
    ctx.save_for_backward(x_out, y, gate, bias, mean, rstd, scale, weight)
    save_norm_mode(ctx, shift, rms, eps, h_dtype)
