"""The "triton" backend: the Triton kernels of kernels/ as registered torch ops with autograd.

Triton compiles for CUDA tensors; CPU tensors run only under the Triton interpreter
(TRITON_INTERPRET=1, set before triton is imported), a correctness tool for tests.
"""
from __future__ import annotations

import os

import torch

# The backend's ops (dit_fast.backends looks them up on this module by name).
from .triton_adaln import adaln_modulate, gated_residual, gated_residual_adaln  # noqa: F401
from .triton_embed import final_layer, linear_gelu_tanh, patch_embed  # noqa: F401
from .triton_qk_norm_rope import qk_norm_rope  # noqa: F401
from .triton_swiglu import swiglu  # noqa: F401


def available(device_type: str) -> tuple[bool, str]:
    """(usable, reason) for tensors on `device_type` (importing this module already needed triton)."""
    if device_type == "cuda":
        if torch.cuda.is_available():
            return True, "Triton on CUDA"
        return False, "CUDA is not available"
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return True, "Triton interpreter (TRITON_INTERPRET=1): slow, for tests"
        return False, "Triton runs CPU tensors only under TRITON_INTERPRET=1"
    return False, f"Triton does not run {device_type} tensors"
