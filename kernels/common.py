"""Helpers shared by the Triton kernels: the CPU interpreter's two known differences from a GPU, and
the deterministic one-launch reduction of per-chunk partial sums (sum_partials).

Under TRITON_INTERPRET=1 (triton 3.9) a bfloat16 tl.dot returns garbage and a float32 -> bfloat16
cast truncates where GPUs round to nearest even. Kernels take an INTERPRET/ROUND_BF16 constexpr set
from interpreting(), so the compiled GPU code is unchanged.
"""
from __future__ import annotations

import os

import torch
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


# ----------------------------------------------------------------------------------------------
# Deterministic reduction of per-chunk partial sums (the modulation gradients of adaLN / final layer)
# ----------------------------------------------------------------------------------------------

_poison = False


def set_poison(on: bool) -> bool:
    """Test hook behind adaln.poison_outputs(): buffers from empty() start NaN-filled while on."""
    global _poison
    old, _poison = _poison, on
    return old


def empty(shape, dtype, device):
    t = torch.empty(shape, dtype=dtype, device=device)
    if _poison and t.is_floating_point():
        t.fill_(float("nan"))
    return t


@triton.jit
def _sum_partials_kernel(part_ptr, out0_ptr, out1_ptr, out2_ptr, out3_ptr, n_chunks, D,
                         K: tl.constexpr, BLOCK_D: tl.constexpr, ROUND_BF16: tl.constexpr):
    """out_k[b, :] = sum over c of part[b, c, k, :], c in increasing order (deterministic), k < K <= 4."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    base = part_ptr + b * n_chunks * K * D + cols
    acc0 = tl.load(base, mask=cmask, other=0.0)
    if K > 1:
        acc1 = tl.load(base + D, mask=cmask, other=0.0)
    if K > 2:
        acc2 = tl.load(base + 2 * D, mask=cmask, other=0.0)
    if K > 3:
        acc3 = tl.load(base + 3 * D, mask=cmask, other=0.0)
    for c in range(1, n_chunks):
        row = base + c * K * D
        acc0 += tl.load(row, mask=cmask, other=0.0)
        if K > 1:
            acc1 += tl.load(row + D, mask=cmask, other=0.0)
        if K > 2:
            acc2 += tl.load(row + 2 * D, mask=cmask, other=0.0)
        if K > 3:
            acc3 += tl.load(row + 3 * D, mask=cmask, other=0.0)
    tl.store(out0_ptr + b * D + cols, cast_for(acc0, out0_ptr, ROUND_BF16), mask=cmask)
    if K > 1:
        tl.store(out1_ptr + b * D + cols, cast_for(acc1, out1_ptr, ROUND_BF16), mask=cmask)
    if K > 2:
        tl.store(out2_ptr + b * D + cols, cast_for(acc2, out2_ptr, ROUND_BF16), mask=cmask)
    if K > 3:
        tl.store(out3_ptr + b * D + cols, cast_for(acc3, out3_ptr, ROUND_BF16), mask=cmask)


def sum_partials(part, dtypes):
    """[B, n_chunks, K, D] partial sums -> K tensors [B, D] (dtypes[k]): chunks added in a fixed order,
    all K in one launch."""
    B, n_chunks, K, D = part.shape
    if K != len(dtypes) or not 1 <= K <= 4:
        raise ValueError(f"sum_partials: part has K={K} sums, dtypes gives {len(dtypes)} (1 to 4 expected)")
    outs = [empty((B, D), dt, part.device) for dt in dtypes]
    block_d = min(triton.next_power_of_2(D), 1024)
    ptrs = outs + [outs[0]] * (4 - K)  # unused pointers are never touched (K is constexpr)
    _sum_partials_kernel[(B, triton.cdiv(D, block_d))](
        part, *ptrs, n_chunks, D, K=K, BLOCK_D=block_d, ROUND_BF16=interpreting(), num_warps=4,
    )
    return outs
