"""The torch backend's definitions of LightningDiT's MLP and attention-input ops, in plain PyTorch.

swiglu: the activation of the SwiGLU MLP on the packed `w12` projection (SwiGLUFFN: ab = [a | b],
hidden = silu(a) * b). qk_norm_rope: the attention's q/k preparation (per-head RMSNorm with a learned gain
over head_dim, eps 1e-6 in the published model, then EVA's 2D rotary embedding on interleaved pairs, the
same cos/sin [L, Dh] for every head), v untouched. The order is the published one:
qkv -> [B, H, L, Dh] -> q_norm / k_norm -> rope -> attention.

Math in float32 (float64 for float64 inputs) whatever the storage dtypes, one rounding to the input's dtype
at the end, as the Triton kernels do (the published model rounds the normalized q, k to their dtype before
the gain; that rounding is not part of these semantics).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dtypes import compute_dtype


def swiglu(ab, bias=None):
    """silu(a) * b for ab = [a | b] [..., 2H] (w12's output; bias [2H] is w12's bias, added here when the
    GEMM ran without it) -> [..., H] in ab's dtype."""
    ct = compute_dtype(ab, bias)
    x = ab.to(ct) if bias is None else ab.to(ct) + bias.to(ct)
    a, b = x.chunk(2, dim=-1)
    return (F.silu(a) * b).to(ab.dtype)


def rotate_half_interleaved(x):
    """(x[2i], x[2i+1]) -> (-x[2i+1], x[2i]) over the last dim: the rotation by 90 degrees of each pair."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def qk_norm_rope(qkv, num_heads: int, q_gain=None, k_gain=None, eps: float = 1e-6, cos=None, sin=None,
                 q_bias=None, k_bias=None, norm: str = "rms"):
    """(q, k, v), each [B, H, L, Dh], from the packed QKV projection qkv [B, L, 3*D] (D = num_heads * Dh).

    q and k: normalized over Dh with their gains [Dh] (when given; both or neither) and biases [Dh] (optional),
    by RMSNorm (norm="rms", LightningDiT with use_rmsnorm) or LayerNorm (norm="layer": its QK-norm without
    use_rmsnorm, nn.LayerNorm(head_dim), eps 1e-5), then rotated,
    x * cos + rotate_half_interleaved(x) * sin with cos, sin [L, Dh] (when given), in qkv's dtype, laid
    out as [B, L, H, Dh] (their transposes are contiguous). v: a view of qkv.
    """
    B, L, D3 = qkv.shape
    Dh = D3 // (3 * num_heads)
    ct = compute_dtype(qkv, q_gain, k_gain, cos, sin, q_bias, k_bias)
    q, k, v = qkv.reshape(B, L, 3, num_heads, Dh).unbind(2)

    def prepare(x, gain, bias):
        x = x.to(ct)
        if gain is not None and norm == "layer":
            x = F.layer_norm(x, (Dh,), gain.to(ct), None if bias is None else bias.to(ct), eps)
        elif gain is not None:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain.to(ct)
            x = x if bias is None else x + bias.to(ct)
        if cos is not None:
            x = x * cos.to(ct)[:, None, :] + rotate_half_interleaved(x) * sin.to(ct)[:, None, :]
        return x.to(qkv.dtype).contiguous().transpose(1, 2)

    return prepare(q, q_gain, q_bias), prepare(k, k_gain, k_bias), v.transpose(1, 2)


def rope_2d_tables(head_dim: int, grid: int, theta: float = 10000.0, dtype=torch.float32, device=None):
    """(cos, sin) [grid * grid, head_dim] of LightningDiT's 2D RoPE (EVA's VisionRotaryEmbeddingFast with
    dim = head_dim // 2 and pt_seq_len = grid), tokens row-major over the patch grid.

    Per axis head_dim // 4 frequencies theta^(-2i / (head_dim // 2)), each used by an interleaved pair of
    features; token (r, c)'s angles are r times them in the first half of head_dim and c times them in the
    second half. Computed in float32, as the published buffers are.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE splits head_dim into two axes of feature pairs: head_dim must be a multiple of 4, "
                         f"got {head_dim}")
    half = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, half, 2, device=device)[: half // 2].float() / half)
    # positions as the published code makes them, i / grid * grid in float32: not always exactly i (grid 24)
    positions = torch.arange(grid, device=device) / grid * grid
    per_axis = (positions[:, None] * freqs).repeat_interleave(2, dim=-1)
    rows = per_axis[:, None, :].expand(grid, grid, half)
    cols = per_axis[None, :, :].expand(grid, grid, half)
    angles = torch.cat((rows, cols), dim=-1).reshape(grid * grid, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)
