"""Helpers shared by the Triton kernels: the CPU interpreter's two known differences from a GPU.

Under TRITON_INTERPRET=1 (triton 3.9) a bfloat16 tl.dot returns garbage and a float32 -> bfloat16
cast truncates where GPUs round to nearest even. Kernels take an INTERPRET/ROUND_BF16 constexpr set
from interpreting(), so the compiled GPU code is unchanged.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def dot_acc(a, b, INTERPRET: tl.constexpr):
    """a @ b with a float32 result and exact float32 products ("ieee": no TF32 for float32 operands).
    The interpreter (triton 3.9) returns garbage for bfloat16 dots; products of bf16/fp16 values are exact
    in float32, so feeding it float32 gives the same result."""
    if INTERPRET:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision="ieee")
    return c


@triton.jit
def cast_for(v, ptr, INTERPRET: tl.constexpr):
    """float32 v cast to ptr's element type. The interpreter truncates float32 -> bfloat16 where GPUs
    round to nearest even; under it the rounding is done by hand first so both agree."""
    if INTERPRET:
        if ptr.dtype.element_ty == tl.bfloat16:
            bits = v.to(tl.float32).to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            v = bits.to(tl.float32, bitcast=True)
    return v.to(ptr.dtype.element_ty)
