"""LightningDiT's modes of the adaLN-family ops as rows of their own in `dit-fast kernels`, and the default op
list per model family.

A variant is named `<op>:rms` (norm="rms" with the norm's learned gain, the shift kept) or `<op>:rms-noshift`
(shift=None: LightningDiT's scale-only adaLN, wo_shift); final_layer has no scale-only form in the published
model (its adaLN always has 2 chunks). The variant's case is the op's DiT case with the extra positional
arguments of the backends' signatures (norm, gain; shift None), the gain (a Parameter of the residual dtype)
differentiated and read back by the backward as the published module's is. final_layer:rms runs at
LightningDiT-XL/1's output size: patch 1, 32 channels.
"""
from __future__ import annotations

import torch

from ..backends import OPS, capability

# variant -> (op, keeps the shift)
NORM_VARIANTS = {
    "adaln_modulate:rms": ("adaln_modulate", True),
    "adaln_modulate:rms-noshift": ("adaln_modulate", False),
    "gated_residual_adaln:rms": ("gated_residual_adaln", True),
    "gated_residual_adaln:rms-noshift": ("gated_residual_adaln", False),
    "final_layer:rms": ("final_layer", True),
}
# where each op's shift, and its norm mode / gain, sit among the backends' positional arguments
_SHIFT_AT = {"adaln_modulate": 1, "gated_residual_adaln": 3, "final_layer": 1}
_PAD_TO = {"adaln_modulate": 5, "gated_residual_adaln": 8, "final_layer": 8}  # arguments before `norm`
_DEFAULTS = {"gated_residual_adaln": [None], "final_layer": []}  # bias=None between h_dtype and norm
LIGHTNING_CHANNELS, LIGHTNING_PATCH = 32, 1


def base_op(op: str) -> str:
    """The dit_fast.ops op a benchmark op name runs (a variant's op, or the name itself)."""
    return NORM_VARIANTS[op][0] if op in NORM_VARIANTS else op


def runs_variant(family: str, op: str, device_type: str) -> bool:
    """Whether a kernel family has the variant's norm modes on this device type (capability table)."""
    if op not in NORM_VARIANTS or family == "torch":
        return True
    row = capability(family, base_op(op), device_type)
    return row is not None and row.norm_modes


def variant_case(op: str, B: int, L: int, D: int, dtype: torch.dtype, device, residual_dtype: torch.dtype):
    """The OpCase of a NORM_VARIANTS op: the op's case with norm="rms", a gain and (noshift) shift None."""
    from dataclasses import replace

    from .kernels import _t, make_case

    name, keep_shift = NORM_VARIANTS[op]
    extra = dict(patch=LIGHTNING_PATCH, channels=LIGHTNING_CHANNELS // 2) if name == "final_layer" else {}
    case = make_case(name, B, L, D, dtype, device, residual_dtype=residual_dtype, **extra)
    args = list(case.args)
    args += _DEFAULTS.get(name, [])
    assert len(args) == _PAD_TO[name], (name, len(args))
    gain_at = len(args) + 1
    args += ["rms", _t((D,), residual_dtype, device, True, 0.5) + 1.0]
    args[gain_at] = args[gain_at].detach().requires_grad_(True)
    grad_inputs = [*case.grad_inputs, gain_at]
    if not keep_shift:
        shift_at = _SHIFT_AT[name]
        args[shift_at] = None
        grad_inputs.remove(shift_at)
    label = case.label + ("" if name != "final_layer" else f" p={LIGHTNING_PATCH} C={LIGHTNING_CHANNELS}")
    return replace(case, op=op, args=args, grad_inputs=grad_inputs, bwd_reads=(*case.bwd_reads, gain_at),
                   label=label + (" rms" if keep_shift else " rms, no shift"))


def default_ops(shape) -> list[str]:
    """The ops `dit-fast kernels` times by default for a model shape: DiT's and SiT's fused ops; for LightningDiT
    the ops its blocks run (the adaLN ops' RMSNorm modes with and without shift, SwiGLU, QK-norm + RoPE) and the
    gated residual."""
    if getattr(shape, "family", "DiT") != "LightningDiT":
        return list(OPS)
    return ["adaln_modulate:rms", "adaln_modulate:rms-noshift", "gated_residual", "gated_residual_adaln:rms",
            "gated_residual_adaln:rms-noshift", "final_layer:rms", "swiglu", "qk_norm_rope"]
