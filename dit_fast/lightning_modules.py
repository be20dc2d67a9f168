"""The modules LightningDiT's block adds to DiT's (Yao et al., "Reconstruction vs. Generation: Taming
Optimization Dilemma in Latent Diffusion Models"; official code hustvl/LightningDiT, MIT): RMSNorm with a
learned gain, EVA's 2D rotary embedding (VisionRotaryEmbeddingFast), and the SwiGLU MLP.

Written from the published facts (attribute and buffer names, shapes, formulas, the float32 order of the
norm); shared by the reference (dit_fast.reference) and the fast engine (dit_fast.models), whose fused
kernels stand in for them only while they are exactly these classes (dit_fast.stock).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["RMSNorm", "VisionRotaryEmbeddingFast", "rotate_half", "SwiGLUFFN", "swiglu_hidden_size"]


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps), computed in float32 and cast back to x's dtype, then times the gain."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Interleaved pairs: (x[2i], x[2i+1]) -> (-x[2i+1], x[2i])."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


class VisionRotaryEmbeddingFast(nn.Module):
    """EVA's 2D rotary embedding as LightningDiT builds it: ``dim`` = head_dim / 2 channels per axis, with
    dim / 2 frequencies theta^(-2i/dim) each repeated for an interleaved pair; token (r, c) of the
    pt_seq_len x pt_seq_len grid gets the row's angles on the first half of the head dim and the column's on
    the second. Buffers freqs_cos, freqs_sin [L, head_dim] (in the state_dict); forward(t) rotates
    t [..., L, head_dim]."""

    def __init__(self, dim: int, pt_seq_len: int = 16, ft_seq_len: int | None = None, theta: float = 10000):
        super().__init__()
        ft_seq_len = pt_seq_len if ft_seq_len is None else ft_seq_len
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        pos = torch.arange(ft_seq_len) / ft_seq_len * pt_seq_len
        angles = (pos[:, None] * freqs[None, :]).repeat_interleave(2, dim=-1)  # [S, dim]
        n = angles.shape[0]
        grid = torch.cat([angles[:, None, :].expand(n, n, -1), angles[None, :, :].expand(n, n, -1)], dim=-1)
        self.register_buffer("freqs_cos", grid.cos().reshape(n * n, -1))
        self.register_buffer("freqs_sin", grid.sin().reshape(n * n, -1))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.freqs_cos + rotate_half(t) * self.freqs_sin


def swiglu_hidden_size(hidden_size: int, mlp_ratio: float) -> int:
    """LightningDiT's SwiGLU width: int(2/3 * int(hidden_size * mlp_ratio)) (3072 at D = 1152)."""
    return int(2 / 3 * int(hidden_size * mlp_ratio))


class SwiGLUFFN(nn.Module):
    """w3(silu(x1) * x2) with x1 | x2 = w12(x): one packed projection to 2 * hidden_features."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None, bias: bool = True):
        super().__init__()
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, out_features or in_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)
