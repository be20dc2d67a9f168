"""The "torch" backend: every fused op written as plain PyTorch.

These are the semantics the Triton and C++/CUDA kernels must reproduce, the fallback where no
kernel runs, and the baseline of the benchmarks. Math is done in float32 (or float64 for float64
inputs) whatever the input dtypes, the way the fused kernels do it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dtypes import compute_dtype
from .torch_lightning import qk_norm_rope, swiglu  # noqa: F401  (LightningDiT's ops, defined there)

NORMS = ("layer", "rms")


def _normalized(x, eps: float, norm: str, ct: torch.dtype):
    """The normalized rows of x in ct: LayerNorm without affine, or RMSNorm as LightningDiT writes it
    (x * rsqrt(mean(x^2) + eps) in float32, cast back to x's dtype before the gain is applied)."""
    if norm == "rms":
        xc = x.to(ct)
        rstd = torch.rsqrt(xc.square().mean(-1, keepdim=True) + eps)
        xn = (xc * rstd).to(x.dtype).to(ct)
    else:
        xn, _mean, rstd = torch.native_layer_norm(x.to(ct), x.shape[-1:], None, None, eps)
    # A row whose squares overflow (|x| >~ 1e19 in float32) gets rstd = 1 / sqrt(inf) = 0 and would come
    # out as exactly `shift`, a finite constant that hides a diverging activation from non-finite guards:
    # NaN instead (forward and, through the factor, backward), as every backend does.
    return xn * torch.where(rstd > 0, 1.0, float("nan")).to(ct)


def adaln_modulate(x, shift, scale, eps: float = 1e-6, h_dtype: torch.dtype | None = None, norm: str = "layer",
                   weight=None):
    """norm(x) * weight * (1 + scale) + shift over the last dim.

    x: [B, L, D]; shift (None: scale-only adaLN, LightningDiT's wo_shift), scale: [B, D]; norm "layer"
    (LayerNorm without affine) or "rms" (RMSNorm, see _normalized); weight: the norm's gain [D] or None.
    Math in float32 (float64 for float64 inputs); output dtype: h_dtype, else x.dtype.
    """
    ct = compute_dtype(x, scale, *(t for t in (shift, weight) if t is not None))
    xn = _normalized(x, eps, norm, ct)
    if weight is not None:
        xn = xn * weight.to(ct)
    h = xn * (1 + scale.to(ct).unsqueeze(1))
    if shift is not None:
        h = h + shift.to(ct).unsqueeze(1)
    return h.to(h_dtype or x.dtype)


def gated_residual(x, y, gate, bias=None):
    """x + gate * (y + bias). x, y: [B, L, D]; gate: [B, D]; bias: [D] or None. Output dtype: x.dtype.

    bias is the bias of the GEMM that made y (attn.proj, mlp.fc2), added here instead of in the GEMM so
    that its gradient comes out of this op's backward pass over the output gradient (no separate
    reduction). y + bias is not rounded: the sum is taken in the compute dtype.
    """
    ct = compute_dtype(x, y, gate, *(() if bias is None else (bias,)))
    y = y.to(ct) if bias is None else y.to(ct) + bias.to(ct)
    return (x.to(ct) + gate.to(ct).unsqueeze(1) * y).to(x.dtype)


def gated_residual_adaln(x, y, gate, shift, scale, eps: float = 1e-6, h_dtype: torch.dtype | None = None,
                         bias=None, norm: str = "layer", weight=None):
    """(x_out, h) with x_out = gated_residual(x, y, gate, bias) and h = adaln_modulate(x_out, shift, scale,
    norm=norm, weight=weight).

    h is normalized from x_out as stored (rounded to x.dtype), as the unfused model would.
    """
    x_out = gated_residual(x, y, gate, bias)
    return x_out, adaln_modulate(x_out, shift, scale, eps, h_dtype, norm, weight)


def patchify(x, patch_size: int):
    """[N, C, H, W] -> [N, T, C*p*p], tokens row-major over the patch grid, features in (c, i, j) order,
    i.e. the order of a Conv2d weight [D, C, p, p] flattened."""
    N, C, H, W = x.shape
    p = patch_size
    x = x.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(N, (H // p) * (W // p), C * p * p)


def patch_embed(x, weight, bias, pos_embed, patch_size: int):
    """Patchify + linear projection + bias + pos_embed: [N, C, H, W] -> [N, T, D].

    weight [D, C, p, p] and bias [D] are the Conv2d parameters of the published model; pos_embed
    [1, T, D]. Same function as Conv2d(stride=p) + flatten + transpose + pos_embed, as one GEMM.
    """
    D = weight.shape[0]
    out = F.linear(patchify(x, patch_size), weight.reshape(D, -1), bias)
    return out + pos_embed


def unpatchify(x, patch_size: int, out_channels: int):
    """[N, T, p*p*C] (features in (i, j, c) order) -> [N, C, H, W]."""
    N, T, _ = x.shape
    p, c = patch_size, out_channels
    h = w = math.isqrt(T)
    x = x.reshape(N, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(N, c, h * p, w * p)


def final_layer(x, shift, scale, weight, bias, patch_size: int, out_channels: int, eps: float = 1e-6,
                norm: str = "layer", norm_weight=None):
    """adaln_modulate + linear + unpatchify: [N, T, D] -> [N, out_channels, H, W].

    weight [p*p*out_channels, D], bias [p*p*out_channels]; norm and norm_weight (the norm's gain) as in
    adaln_modulate; shift may be None. Output dtype follows F.linear (and so autocast).
    """
    h = adaln_modulate(x, shift, scale, eps, None, norm, norm_weight)
    return unpatchify(F.linear(h, weight, bias), patch_size, out_channels)


def linear_gelu_tanh(x, weight, bias):
    """GELU(tanh approximation) of x @ weight.T + bias: the MLP's fc1 and its activation."""
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


def timestep_embedding(t, dim: int = 256, max_period: float = 10000.0):
    from ..reference import timestep_embedding as ref

    return ref(t, dim, max_period)
