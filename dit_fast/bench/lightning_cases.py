"""The per-op benchmark cases of LightningDiT's swiglu and qk_norm_rope, and Liger-Kernel's SwiGLU contender.

dit_fast/bench/kernels.py calls these from make_case, contender_status and op_fn. Shapes follow the published
models at hidden size D: SwiGLU's H = int(2/3 * 4 * D) (3072 at D = 1152), heads of 72 at D = 1152 and of 64
otherwise (LightningDiT-B, L, 1p0B, 1p6B); RoPE tables are the published 2D ones for a square token count.

Byte model notes. swiglu runs without w12's bias here, so that every contender computes the same thing (Liger's
kernel has no bias); the Triton op's fused bias gradient is measured by the tests, not timed. qk_norm_rope's
v is a view of qkv: the forward neither reads qkv's v third nor writes v, and the backward reads only the q and k
thirds of qkv; `untouched` takes those bytes out of the count.
"""
from __future__ import annotations

import math

import torch

LIGER_OPS = ("swiglu",)


# hidden size -> heads of the published LightningDiT configs (B, L, XL, 1p0B, 1p6B)
PUBLISHED_HEADS = {768: 12, 1024: 16, 1152: 16, 1536: 24, 1792: 28}


def head_dim_for(D: int) -> int:
    """The published models' head dim at hidden size D (72 at 1152, else 64); 64 for other D divisible by it."""
    if D in PUBLISHED_HEADS:
        return D // PUBLISHED_HEADS[D]
    if D % 64:
        raise ValueError(f"qk_norm_rope cases take a published hidden size {sorted(PUBLISHED_HEADS)} or a multiple "
                         f"of 64 (heads of 64), got D={D}")
    return 64


def make_lightning_case(op: str, B: int, L: int, D: int, lp: torch.dtype, res: torch.dtype, device):
    """The OpCase of swiglu or qk_norm_rope at B images, L tokens, hidden D; None for other ops."""
    from ..ops.torch_lightning import rope_2d_tables
    from .kernels import OpCase, _t

    label = f"B={B} L={L} D={D}"
    if op == "swiglu":  # backward: dout, ab -> d(ab)
        H = int(2 / 3 * 4 * D)
        args = [_t((B, L, 2 * H), lp, device, True), None]
        return OpCase(op, args, [0], label + f" H={H}", bwd_reads=(0,), notes="no bias (Liger has none)")
    if op == "qk_norm_rope":  # backward: dq, dk, dv, q and k thirds of qkv -> d(qkv), d(gains)
        Dh = head_dim_for(D)
        grid = math.isqrt(L)
        if torch.device(device).type != "meta" and grid * grid == L and Dh % 4 == 0:
            cos, sin = rope_2d_tables(Dh, grid, device=device)
        else:
            cos, sin = _t((L, Dh), torch.float32, device), _t((L, Dh), torch.float32, device)
        args = [_t((B, L, 3 * D), lp, device, True), D // Dh, _t((Dh,), res, device, True),
                _t((Dh,), res, device, True), 1e-6, cos, sin]
        third = B * L * D * torch.empty((), dtype=lp).element_size()
        return OpCase(op, args, [0, 2, 3], label + f" Dh={Dh}", bwd_reads=(0, 2, 3), untouched=(2 * third, third),
                      notes="v is a view of qkv")
    return None


def liger_status(device_type: str) -> tuple[bool, str]:
    if device_type != "cuda":
        return False, "Liger-Kernel's Triton kernels run on CUDA only"
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction  # noqa: F401
    except Exception as e:  # an optional contender: a broken install must not break the benchmarks
        return False, f"liger_kernel is not importable ({type(e).__name__}: {e}); pip install liger-kernel"
    return True, ""


def liger_fn(op: str):
    """Liger's silu(a) * b on the packed projection (its chunks, made contiguous by Liger), or None."""
    if op not in LIGER_OPS:
        return None
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    def swiglu(ab, bias):
        if bias is not None:
            raise ValueError("Liger's SwiGLU takes no bias")
        return LigerSiLUMulFunction.apply(*ab.chunk(2, dim=-1))

    return swiglu
