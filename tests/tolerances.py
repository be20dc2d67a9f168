"""The tolerance rules of docs/DESIGN.md section 6, in one place.

Relative error = ||out - ref|| / ||ref|| against a float64 reference. float32 (and float64): at
most 1e-5. bfloat16/float16: at most twice the error of PyTorch's own eager computation at the
same precision against the same reference, plus a tiny absolute slack for near-exact cases.
"""
from __future__ import annotations

import torch

FP32_RTOL = 1e-5
LOWP_FACTOR = 2.0
LOWP_SLACK = 1e-6
LOWP = (torch.bfloat16, torch.float16)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def bound_for(dtype: torch.dtype, eager_lowp: torch.Tensor | None, ref: torch.Tensor) -> float:
    if dtype in LOWP:
        if eager_lowp is None:
            raise ValueError("low-precision checks need PyTorch's eager result at that precision")
        return LOWP_FACTOR * rel_err(eager_lowp, ref) + LOWP_SLACK
    return FP32_RTOL


def assert_close(out, ref, dtype, eager_lowp=None, name: str = "out") -> float:
    """Check `out` against the float64 `ref` by the rules above; returns the relative error."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output (an element left unwritten?)"
    err = rel_err(out, ref)
    bound = bound_for(dtype, eager_lowp, ref)
    assert err <= bound, f"{name} ({dtype}): relative error {err:.3e} > bound {bound:.3e}"
    return err


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so that any element a kernel forgets to write fails the check."""
    return t.fill_(float("nan"))


MODEL_GRAD_RTOL = 1e-4  # parameter gradients of a whole model in fp32 (many more roundings than its output)


def assert_same_grads(fast: torch.nn.Module, ref: torch.nn.Module, rtol: float = MODEL_GRAD_RTOL) -> None:
    """Every parameter gradient of `fast` equals `ref`'s (the same parameter order: same module tree)."""
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        if q.grad is not None:
            err = rel_err(p.grad, q.grad)
            assert err < rtol, f"grad of {name}: relative error {err:.2e}"
