"""What the two fused sampler-update ops (sampler_step, flow_step) share: their backend choice and the
checks of the inputs both take (the state x, the noise, the per-step table and the step counter).

Neither op has a backward or an extension kernel, so their dispatch is not the DiT ops' (dit_fast.backends):
"triton" (CUDA; CPU tensors only under TRITON_INTERPRET=1), "torch" (anywhere), "auto" (Triton on CUDA
when it imports, else torch).
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch import Tensor

from ..backends import warn_once

STEP_BACKENDS = ("auto", "triton", "torch")


def resolve_backend(op: str, backend: str, device_type: str, import_kernels: Callable[[], object]) -> str:
    """"triton" or "torch" for `op` on `device_type`; a Triton path that cannot run warns once and runs torch.

    Call it from the op's entry point itself: the warning names the entry point's caller (stacklevel)."""
    if backend not in STEP_BACKENDS:
        raise ValueError(f"backend must be one of {STEP_BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("DIT_FAST_BACKEND", "auto") or "auto"
        if backend == "ext":  # the extension has no sampler kernel: the global choice cannot apply
            backend = "auto"
    if backend == "torch" or (backend == "auto" and device_type != "cuda"):
        return "torch"
    why = None
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        why = "Triton runs CPU tensors only under TRITON_INTERPRET=1"
    elif device_type not in ("cpu", "cuda"):
        why = f"Triton does not run {device_type} tensors"
    else:
        try:
            import_kernels()
        except Exception as e:  # an optional dependency missing must not break sampling
            why = f"importing the Triton kernel failed: {type(e).__name__}: {e}"
    if why is None:
        return "triton"
    warn_once((op, backend, device_type), f"dit_fast: {op} cannot use Triton ({why}); using 'torch'")
    return "torch"


def shape_of(t) -> list[int] | str:
    """What an error message shows of an argument: a tensor's shape, else the type's name."""
    return list(t.shape) if isinstance(t, Tensor) else type(t).__name__


def check_inputs(x, named: tuple[tuple[str, object], ...]) -> None:
    """Every (name, value) of `named` (x first) is a tensor on x's device; x, the sampler's state, is a
    float32/float64 [n, C, H, W] tensor."""
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on {x.device} like x, got {t.device}")
    if x.dim() != 4 or x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"x must be a float32/float64 tensor [n, C, H, W], got {x.dtype} {shape_of(x)}")


def check_noise_table_step(x: Tensor, noise: Tensor, table: Tensor, step: Tensor, num_cols: int,
                           rows: str) -> None:
    """noise [>= n, C, H, W] and table [rows, num_cols] of x's dtype, step a one-element integer tensor;
    `rows` names the table's first dimension in the message."""
    n, C, H, W = x.shape
    if noise.dim() != 4 or noise.shape[0] < n or list(noise.shape[1:]) != [C, H, W] or noise.dtype != x.dtype:
        raise ValueError(f"noise must be a {x.dtype} tensor [>= {n}, {C}, {H}, {W}], got {noise.dtype} "
                         f"{shape_of(noise)}")
    if table.dim() != 2 or table.shape[1] != num_cols or table.dtype != x.dtype:
        raise ValueError(f"table must be a {x.dtype} tensor [{rows}, {num_cols}], got {table.dtype} "
                         f"{shape_of(table)}")
    if step.numel() != 1 or step.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"step must be a one-element int32/int64 tensor, got {step.dtype} {shape_of(step)}")


def check_contiguous(*named: tuple[str, Tensor]) -> None:
    for name, t in named:
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is updated in place)")
