"""The flat-index layout the two sampler-update kernels (sampler_step, flow_step) share.

Both run one program per BLOCK elements of the state x [n, C, H, W] and read the model's output
[B, C_out, H, W] (C_out >= C: learned-sigma channels after the first C; with CFG, B = 2n and the
unconditional half starts n rows in) at the same (c, h, w) of the same sample.
"""
from __future__ import annotations

import torch
import triton

BLOCK = 1024


def grid(x: torch.Tensor) -> tuple[int]:
    return (triton.cdiv(x.numel(), BLOCK),)


def layout(x: torch.Tensor, model_out: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(numel, chw, hw, out_row, uncond_offset), the kernels' index arguments in their order: x's element
    count, one sample's and one channel's element count, one model-output sample's element count, and the
    offset of the unconditional half in the model output."""
    n, C, H, W = x.shape
    out_row = model_out.shape[1] * H * W
    return x.numel(), C * H * W, H * W, out_row, n * out_row
