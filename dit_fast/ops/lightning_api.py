"""Functional API of LightningDiT's MLP activation (swiglu) and attention-input op (qk_norm_rope).

Part of dit_fast.ops (re-exported there): inputs are checked here, once, then the backend chosen by
dit_fast.backends runs (the torch backend's torch_lightning.py gives the semantics).
"""
from __future__ import annotations

import torch

from . import _check_eps, _check_float, _impl, _shape


def _check_vector(name: str, t, n: int, ref: torch.Tensor, what: str) -> None:
    _check_float(name, t)
    if tuple(t.shape) != (n,):
        raise ValueError(f"{name} must have shape [{what}] = [{n}], got {_shape(t)}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref.device} like the input, got {t.device}")


def swiglu(ab, *, bias=None, backend: str = "auto"):
    """silu(a) * b with ab = [a | b] [..., 2H], the packed output of SwiGLU's `w12` projection -> [..., H].

    bias [2H] or None: w12's bias, when the GEMM ran without it (its gradient then comes out of the
    backward pass over d(ab) on the Triton backend). Output and d(ab) in ab's dtype; math in float32.
    """
    _check_float("ab", ab)
    if ab.dim() < 1 or ab.shape[-1] % 2 or ab.shape[-1] == 0:
        raise ValueError(f"ab must have shape [..., 2H] with H >= 1 (a | b packed), got {_shape(ab)}")
    if bias is not None:
        _check_vector("bias", bias, ab.shape[-1], ab, "2H")
    return _impl(backend, "swiglu", ab.device, None, ab, bias)(ab, bias)


QK_NORMS = ("rms", "layer")


def qk_norm_rope(qkv, num_heads: int, q_gain=None, k_gain=None, eps: float = 1e-6, cos=None, sin=None, *,
                 q_bias=None, k_bias=None, norm: str = "rms", backend: str = "auto"):
    """(q, k, v), each [B, H, L, Dh], from the packed QKV projection qkv [B, L, 3*D] (D = num_heads * Dh).

    q and k: per-head RMSNorm (norm="rms") or LayerNorm (norm="layer") over Dh with learned gains q_gain, k_gain
    [Dh] (both or neither; eps as the norm's) and optional biases q_bias, k_bias [Dh] (LayerNorm's; both or
    neither), then the rotary embedding x * cos + rotate_half(x) * sin on interleaved pairs with cos, sin
    [L, Dh] (both or neither; LightningDiT's VisionRotaryEmbeddingFast buffers freqs_cos, freqs_sin), in
    qkv's dtype and laid out as [B, L, H, Dh] (the [B, H, L, Dh] results are transposed views, as SDPA takes;
    .transpose(1, 2) gives FlashAttention's layout). v is a view of qkv, never copied. cos and sin are fixed
    buffers: they must not require grad.
    """
    _check_float("qkv", qkv)
    if qkv.dim() != 3:
        raise ValueError(f"qkv must have shape [B, L, 3*D], got {_shape(qkv)}")
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"num_heads must be an int >= 1, got {num_heads!r}")
    B, L, D3 = qkv.shape
    if D3 == 0 or D3 % (3 * num_heads):
        raise ValueError(
            f"qkv's last dim must be 3 * num_heads * head_dim with head_dim >= 1, got {D3} for num_heads={num_heads}"
        )
    Dh = D3 // (3 * num_heads)
    if (q_gain is None) != (k_gain is None):
        raise ValueError("q_gain and k_gain must be given together (QK-norm on) or both be None (off), got one")
    if (q_bias is None) != (k_bias is None):
        raise ValueError("q_bias and k_bias must be given together or both be None, got one")
    if q_bias is not None and q_gain is None:
        raise ValueError("q_bias and k_bias are the QK-norms' biases: they need q_gain and k_gain (the norms) too")
    if norm not in QK_NORMS:
        raise ValueError(f"norm must be one of {QK_NORMS}, got {norm!r}")
    for name, g in (("q_gain", q_gain), ("k_gain", k_gain), ("q_bias", q_bias), ("k_bias", k_bias)):
        if g is not None:
            _check_vector(name, g, Dh, qkv, "head_dim")
    _check_eps(eps)
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must be given together (RoPE on) or both be None (off), got one")
    if cos is not None:
        if Dh % 2:
            raise ValueError(f"RoPE rotates pairs of features: head_dim must be even, got {Dh}")
        for name, t in (("cos", cos), ("sin", sin)):
            _check_float(name, t)
            if tuple(t.shape) != (L, Dh):
                raise ValueError(f"{name} must have shape [L, head_dim] = {[L, Dh]}, got {_shape(t)}")
            if t.device != qkv.device:
                raise ValueError(f"{name} must be on {qkv.device} like qkv, got {t.device}")
            if t.requires_grad:
                raise ValueError(f"{name} must not require grad (a fixed RoPE buffer; no gradient is computed for it)")
    impl = _impl(backend, "qk_norm_rope", qkv.device, None, qkv, q_gain, k_gain, cos, sin, q_bias, k_bias)
    return impl(qkv, num_heads, q_gain, k_gain, eps, cos, sin, q_bias, k_bias, norm)
