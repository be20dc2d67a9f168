"""Helpers for parity checks (tests and the parity benchmark)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


@torch.no_grad()
def randomize_weights_(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every trainable parameter random values of a sensible scale, in place.

    The published init zeroes the adaLN projections and the final layer, so a fresh model outputs
    exactly zero and any comparison of two fresh models passes trivially. Matrices get std
    1/sqrt(fan_in) (activations stay O(1) through depth), vectors and tables std 0.1 / 1.
    pos_embed (fixed, requires_grad=False) is left alone.
    """
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("embedding_table.weight"):
            std = 1.0
        elif p.dim() >= 2:
            std = 1.0 / math.sqrt(p[0].numel())
        else:
            std = 0.1
        device = generator.device if generator is not None else p.device
        p.copy_(torch.randn(p.shape, generator=generator, device=device) * std)
    return model
