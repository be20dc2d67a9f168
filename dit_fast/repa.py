"""REPA-style representation alignment on the fused path (Yu et al., "Representation Alignment for
Generation: Training Diffusion Transformers Is Easier Than You Think").

The recipe: the tokens after block ``encoder_depth`` (1-based: REPA's default 8 for SiT-XL/2) go
through a projector MLP (Linear, SiLU, Linear, SiLU, Linear; 2048 hidden units) and are aligned to a
frozen encoder's patch features by the negative cosine similarity, averaged over tokens, images and
encoders, added to the diffusion loss with a weight (REPA: 0.5).

The features are read by a forward hook that only reads: the block keeps its fused path (the carried
next norm included, see docs/DESIGN.md section 8), so REPA training costs the projector and the loss,
nothing in the backbone.

    features = BlockFeatures(model, encoder_depth=8)
    projector = build_projector(1152, 2048, 768)
    loss = transport.training_losses(model, x, dict(y=y))["loss"].mean()
    loss = loss + 0.5 * alignment_loss([projector(features.pop())], [dino_tokens])
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BlockFeatures", "build_projector", "alignment_loss"]


def build_projector(hidden_size: int, projector_dim: int = 2048, z_dim: int = 768) -> nn.Sequential:
    """REPA's projector: Linear(hidden, p), SiLU, Linear(p, p), SiLU, Linear(p, z_dim), per token."""
    for name, v in (("hidden_size", hidden_size), ("projector_dim", projector_dim), ("z_dim", z_dim)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


class BlockFeatures:
    """The output tokens [N, T, D] of block ``encoder_depth`` (1-based) of every forward, read by a
    forward hook that returns nothing (so the fused path stays on). ``pop()`` hands back the last
    forward's features and forgets them; ``remove()`` unregisters the hook."""

    def __init__(self, model: nn.Module, encoder_depth: int):
        blocks = getattr(model, "blocks", None)
        if blocks is None:
            raise TypeError(f"model must have .blocks (a DiT/SiT), got {type(model).__name__}")
        if isinstance(encoder_depth, bool) or not isinstance(encoder_depth, int) or not 1 <= encoder_depth <= len(
            blocks
        ):
            raise ValueError(f"encoder_depth must be an int in [1, {len(blocks)}] (1-based block index), "
                             f"got {encoder_depth!r}")
        self._value = None
        self._handle = blocks[encoder_depth - 1].register_forward_hook(self._read)

    def _read(self, module, args, output):
        self._value = output  # no return value: the block's output goes on unchanged

    def pop(self) -> torch.Tensor:
        if self._value is None:
            raise RuntimeError("no features: run the model's forward first (or they were popped already)")
        value, self._value = self._value, None
        return value

    def remove(self) -> None:
        self._handle.remove()
        self._value = None


def alignment_loss(projected: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """REPA's loss: -cos(projected, target) per token, averaged over tokens, images and encoders.

    projected[i], targets[i]: [N, T, z_dim_i] (the projector's output and encoder i's patch features)."""
    if len(projected) != len(targets) or not projected:
        raise ValueError(f"projected and targets must be non-empty lists of the same length, got "
                         f"{len(projected)} and {len(targets)}")
    total = 0.0
    for i, (z_tilde, z) in enumerate(zip(projected, targets)):
        if z_tilde.shape != z.shape or z.dim() != 3:
            raise ValueError(f"projected[{i}] and targets[{i}] must both be [N, T, z_dim], got "
                             f"{list(z_tilde.shape)} and {list(z.shape)}")
        cos = (F.normalize(z_tilde, dim=-1) * F.normalize(z, dim=-1)).sum(dim=-1)  # [N, T]
        total = total - cos.mean()
    return total / len(projected)
