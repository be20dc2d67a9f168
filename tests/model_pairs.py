"""A fast model against its reference twin through one training step, as the family tests check it."""
from __future__ import annotations

import torch

from tolerances import FP32_RTOL, assert_same_grads, rel_err


def assert_same_step(fast: torch.nn.Module, ref: torch.nn.Module, x, t, y, seed: int) -> None:
    """fast(x, t, y) equals ref(x, t, y), each run from the global generator seeded `seed` (any random draw
    inside alike), and so do the parameter gradients of the mean square of the output."""
    torch.manual_seed(seed)
    a = fast(x, t, y)
    torch.manual_seed(seed)
    b = ref(x, t, y)
    assert rel_err(a, b) < FP32_RTOL
    a.square().mean().backward()
    b.square().mean().backward()
    assert_same_grads(fast, ref)
