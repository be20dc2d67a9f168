"""Functional API of the fused DiT ops, dispatched per backend.

Every op takes ``backend="auto" | "triton" | "ext" | "torch"``; see dit_fast.backends for how
"auto" chooses and when a requested backend falls back. The torch backend's docstrings are the
reference semantics of every op (docs/DESIGN.md, "Op contract"). Inputs are checked here, once,
so each backend can assume well-formed arguments.
"""
from __future__ import annotations

import math

import torch

from ..backends import LIGHTNING_OPS, OPS, check_backend_name, module_for, resolve
from . import torch_backend

__all__ = [*OPS, *LIGHTNING_OPS, "adaln_projections", "timestep_embedding", "patchify", "unpatchify", "sampler_step",
           "sampler_step_"]

patchify = torch_backend.patchify
unpatchify = torch_backend.unpatchify
timestep_embedding = torch_backend.timestep_embedding


def _impl(backend: str, op: str, device: torch.device, d: int | None, *tensors, norm_modes: bool = False):
    """The backend function that runs `op` on these inputs (capability table: device, float64, D, and the
    adaLN norm modes: norm="rms", a norm gain or no shift)."""
    check_backend_name(backend)
    float64 = any(t is not None and t.dtype == torch.float64 for t in tensors)
    return getattr(module_for(resolve(backend, op, device.type, float64, d, norm_modes)), op)


def _check_norm(norm, weight, x: torch.Tensor, shift, name: str = "weight") -> bool:
    """Checks the adaLN norm arguments; returns whether the call uses a LightningDiT mode (norm="rms", a
    norm gain, or no shift)."""
    if norm not in ("layer", "rms"):
        raise ValueError(f"norm must be 'layer' (LayerNorm) or 'rms' (RMSNorm), got {norm!r}")
    if weight is not None:
        _check_float(name, weight)
        if tuple(weight.shape) != (x.shape[-1],):
            raise ValueError(f"{name} (the norm's gain) must have shape [D] = [{x.shape[-1]}] for x of shape "
                             f"{_shape(x)}, got {_shape(weight)}")
        if weight.device != x.device:
            raise ValueError(f"{name} must be on {x.device} like x, got {weight.device}")
    return norm != "layer" or weight is not None or shift is None


def _shape(t) -> str:
    return str(list(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_tokens(name: str, x) -> None:
    _check_float(name, x)
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape [B, L, D], got {_shape(x)}")
    # One rule for every backend: a LayerNorm over zero features is undefined, so D = 0 is refused
    # (B = 0 or L = 0, an empty batch, is fine and gives empty outputs).
    if x.shape[-1] == 0:
        raise ValueError(f"{name} must have D >= 1 features (shape [B, L, D]), got {_shape(x)}")


def _check_h_dtype(h_dtype) -> None:
    if h_dtype is not None and not (isinstance(h_dtype, torch.dtype) and h_dtype.is_floating_point):
        raise TypeError(f"h_dtype must be None or a floating-point torch.dtype, got {h_dtype!r}")


def _check_eps(eps) -> None:
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")


def _check_like(name: str, t, ref_name: str, ref: torch.Tensor) -> None:
    _check_float(name, t)
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {_shape(ref)}, got {_shape(t)}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref.device} like {ref_name}, got {t.device}")


def _check_mod(name: str, t, x: torch.Tensor) -> None:
    _check_float(name, t)
    B, _, D = x.shape
    if t.shape != (B, D):
        raise ValueError(f"{name} must have shape [B, D] = {[B, D]} for x of shape {_shape(x)}, got {_shape(t)}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on {x.device} like x, got {t.device}")


def adaln_modulate(x, shift, scale, eps: float = 1e-6, *, h_dtype=None, norm: str = "layer", weight=None,
                   backend: str = "auto"):
    """norm(x) (float32 statistics) * weight * (1 + scale) + shift.

    x: [B, L, D]; shift (None: scale-only adaLN, LightningDiT's wo_shift), scale: [B, D]; norm "layer"
    (LayerNorm without affine) or "rms" (RMSNorm: x * rsqrt(mean(x^2) + eps) in float32, cast back to x's
    dtype, then the gain, as LightningDiT's RMSNorm); weight: the norm's gain [D] or None. Returns h [B, L, D]
    in h_dtype (default x.dtype).
    """
    _check_tokens("x", x)
    if shift is not None:
        _check_mod("shift", shift, x)
    _check_mod("scale", scale, x)
    _check_eps(eps)
    _check_h_dtype(h_dtype)
    modes = _check_norm(norm, weight, x, shift)
    impl = _impl(backend, "adaln_modulate", x.device, x.shape[-1], x, shift, scale, weight, norm_modes=modes)
    if not modes:  # the LayerNorm call every backend takes, in its original signature
        return impl(x, shift, scale, eps, h_dtype)
    return impl(x, shift, scale, eps, h_dtype, norm, weight)


def _check_bias(bias, x: torch.Tensor) -> None:
    if bias is None:
        return
    _check_float("bias", bias)
    if tuple(bias.shape) != (x.shape[-1],):
        raise ValueError(f"bias must have shape [D] = [{x.shape[-1]}] for x of shape {_shape(x)}, got {_shape(bias)}")
    if bias.device != x.device:
        raise ValueError(f"bias must be on {x.device} like x, got {bias.device}")


def gated_residual(x, y, gate, *, bias=None, backend: str = "auto"):
    """x + gate * (y + bias), with x, y: [B, L, D], gate: [B, D], bias: [D] or None; returns x.dtype.

    bias is the bias of the GEMM that made y: passing it here (and running the GEMM without it) lets the
    backward produce its gradient in the pass it already makes (Triton; other backends add it first).
    """
    _check_tokens("x", x)
    _check_like("y", y, "x", x)
    _check_mod("gate", gate, x)
    _check_bias(bias, x)
    return _impl(backend, "gated_residual", x.device, x.shape[-1], x, y, gate, bias)(x, y, gate, bias)


def gated_residual_adaln(
    x, y, gate, shift, scale, eps: float = 1e-6, *, h_dtype=None, bias=None, norm: str = "layer", weight=None,
    backend: str = "auto"
):
    """(x_out, h): x_out = x + gate * (y + bias) (x.dtype), h = adaln_modulate(x_out, shift, scale, norm=norm,
    weight=weight) (h_dtype or x.dtype); bias as in gated_residual; shift may be None (scale-only adaLN)."""
    _check_tokens("x", x)
    _check_like("y", y, "x", x)
    _check_mod("gate", gate, x)
    if shift is not None:
        _check_mod("shift", shift, x)
    _check_mod("scale", scale, x)
    _check_eps(eps)
    _check_h_dtype(h_dtype)
    _check_bias(bias, x)
    modes = _check_norm(norm, weight, x, shift)
    impl = _impl(backend, "gated_residual_adaln", x.device, x.shape[-1], x, y, gate, shift, scale, bias, weight,
                 norm_modes=modes)
    if not modes:
        return impl(x, y, gate, shift, scale, eps, h_dtype, bias)
    return impl(x, y, gate, shift, scale, eps, h_dtype, bias, norm, weight)


def _check_conv_dtypes(x, weight, bias) -> None:
    """The published patch embedding is an nn.Conv2d, which refuses mixed dtypes outside autocast: one rule
    for every backend (under autocast the GEMM runs in the autocast dtype, whatever x's and weight's)."""
    if torch.is_autocast_enabled(x.device.type):
        return
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(
                f"patch_embed: x is {x.dtype} but {name} is {t.dtype}; outside torch.autocast x, weight and bias "
                f"must share one dtype (as nn.Conv2d requires): cast them, or run under torch.autocast"
            )


def patch_embed(x, weight, bias, pos_embed, patch_size: int, *, backend: str = "auto"):
    """Patchify [N, C, H, W] + projection (Conv2d weight [D, C, p, p], bias [D]) + pos_embed [1, T, D] -> [N, T, D]."""
    _check_float("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must have shape [N, C, H, W], got {_shape(x)}")
    _check_float("weight", weight)
    p = patch_size
    D = weight.shape[0]
    N, C, H, W = x.shape
    if weight.dim() != 4 or weight.shape[1:] != (C, p, p):
        raise ValueError(f"weight must have shape [D, C, p, p] = [D, {C}, {p}, {p}], got {_shape(weight)}")
    if H % p or W % p:
        raise ValueError(f"x's spatial size must be a multiple of patch_size={p}, got {H}x{W}")
    T = (H // p) * (W // p)
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"bias must have shape [{D}], got {_shape(bias)}")
    if tuple(pos_embed.shape) != (1, T, D):
        raise ValueError(f"pos_embed must have shape [1, {T}, {D}] for x of shape {_shape(x)}, got {_shape(pos_embed)}")
    _check_conv_dtypes(x, weight, bias)
    return _impl(backend, "patch_embed", x.device, None, x, weight, bias, pos_embed)(x, weight, bias, pos_embed, p)


def final_layer(
    x, shift, scale, weight, bias, patch_size: int, out_channels: int, eps: float = 1e-6, *, norm: str = "layer",
    norm_weight=None, backend: str = "auto"
):
    """adaln_modulate + linear (weight [p*p*C, D], bias) + unpatchify: [N, T, D] -> [N, C, H, W]; norm and
    norm_weight (the norm's gain [D]) as adaln_modulate's norm and weight; shift may be None."""
    _check_tokens("x", x)
    if shift is not None:
        _check_mod("shift", shift, x)
    _check_mod("scale", scale, x)
    out_features = patch_size * patch_size * out_channels
    if tuple(weight.shape) != (out_features, x.shape[-1]):
        raise ValueError(
            f"weight must have shape [p*p*out_channels, D] = {[out_features, x.shape[-1]]}, got {_shape(weight)}"
        )
    L = x.shape[1]
    if math.isqrt(L) ** 2 != L:
        raise ValueError(f"x must have a square number of tokens L (a square patch grid), got L={L}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape [{out_features}], got {_shape(bias)}")
    _check_eps(eps)
    modes = _check_norm(norm, norm_weight, x, shift, "norm_weight")
    impl = _impl(backend, "final_layer", x.device, x.shape[-1], x, shift, scale, weight, bias, norm_weight,
                 norm_modes=modes)
    if not modes:
        return impl(x, shift, scale, weight, bias, patch_size, out_channels, eps)
    return impl(x, shift, scale, weight, bias, patch_size, out_channels, eps, norm, norm_weight)


def linear_gelu_tanh(x, weight, bias, *, backend: str = "auto"):
    """GELU(tanh)(x @ weight.T + bias): fc1 with its activation fused where a backend can."""
    _check_float("x", x)
    _check_float("weight", weight)
    if weight.dim() != 2 or x.dim() < 1 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"weight must have shape [out_features, {x.shape[-1] if x.dim() else '?'}] for x of shape "
            f"{_shape(x)}, got {_shape(weight)}"
        )
    if bias is not None:
        _check_float("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [{weight.shape[0]}], got {_shape(bias)}")
    return _impl(backend, "linear_gelu_tanh", x.device, None, x, weight, bias)(x, weight, bias)


# Every adaLN projection of a model as one GEMM (pure torch: no backend choice).
from .adaln_projections import adaln_projections  # noqa: E402

# LightningDiT's SwiGLU activation and q/k preparation (QK-norm + 2D RoPE): checked and dispatched there.
from .lightning_api import qk_norm_rope, swiglu  # noqa: E402, F401

# The sampler's fused per-step update (not a DiT block op: it has no backward and its own dispatch).
from .sampler_step import sampler_step, sampler_step_  # noqa: E402
