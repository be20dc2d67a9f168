"""The compute dtype of every op on every backend, defined once.

Math runs in float32 whatever the input dtypes (bf16/fp16/fp32), in float64 when any input is float64;
row statistics saved for backward (mean, rstd) have this dtype too.
"""
from __future__ import annotations

import torch


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any (non-None) tensor is float64, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
