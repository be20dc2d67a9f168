"""Helpers shared by the Triton kernels: the CPU interpreter's two known differences from a GPU, the
programs of the column-summing elementwise backwards (column_chunk, row_tile, chunk_grid: gelu, swiglu), and
the deterministic one-launch reduction of per-chunk partial sums (sum_partials).

Under TRITON_INTERPRET=1 (triton 3.9) a bfloat16 tl.dot returns garbage and a float32 -> bfloat16
cast truncates where GPUs round to nearest even. Kernels take an INTERPRET/ROUND_BF16 constexpr set
from interpreting(), so the compiled GPU code is unchanged.
"""
from __future__ import annotations

import functools
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


@triton.jit
def inv_std(var, eps):
    """1 / sqrt(var + eps) of a row, NaN where var overflowed (inf: the row's squares exceed the compute
    dtype's range, |x| >~ 1e19 in float32). 1 / sqrt(inf) = 0 would turn such a row into exactly `shift`,
    a finite constant that hides a diverging activation from every non-finite guard; NaN propagates."""
    rstd = 1.0 / tl.sqrt(var + eps)
    return tl.where(rstd > 0.0, rstd, float("nan"))


@triton.jit
def column_chunk(N, rows_per_prog, BN: tl.constexpr):
    """The program of a column-summing backward over an [M, N] tensor (grid: column blocks x row chunks):
    its chunk index, its BN columns with their mask, and the chunk's first row (int64)."""
    pid_c = tl.program_id(1)
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    return pid_c, cols, cols < N, pid_c.to(tl.int64) * rows_per_prog


@triton.jit
def row_tile(row0, M, cmask, BM: tl.constexpr):
    """Rows row0 .. row0 + BM and the mask of their [BM, BN] tile (rows < M, columns in cmask)."""
    rows = row0 + tl.arange(0, BM)
    return rows, (rows < M)[:, None] & cmask[None, :]


def chunk_grid(M: int, N: int, BM: int, BN: int, programs: int) -> tuple[int, int, int]:
    """(column blocks, row chunks, rows per chunk) of a column_chunk backward over an [M, N] tensor: about
    `programs` programs in all, each chunk a multiple of BM rows, the chunks evened out."""
    n_col = triton.cdiv(N, BN)
    n_chunks = max(1, min(triton.cdiv(M, BM), triton.cdiv(programs, n_col)))
    rows_per_prog = triton.cdiv(triton.cdiv(M, n_chunks), BM) * BM
    return n_col, triton.cdiv(M, rows_per_prog), rows_per_prog


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def n_sm(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached); 4 elsewhere (the interpreter's stand-in)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


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
def _chunk_sums(base, n_chunks, K: tl.constexpr, k: tl.constexpr, D, mask, BLOCK_B: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """sum over c of part[b, c, k, cols] for a [BLOCK_B, BLOCK_D] tile, c in increasing order."""
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=base.dtype.element_ty)
    for c in range(n_chunks):
        acc += tl.load(base + (c * K + k) * D, mask=mask, other=0.0)
    return acc


@triton.jit
def _store_sums(out_ptr, acc, total, b, cols, D, mask, TOTAL: tl.constexpr, ROUND_BF16: tl.constexpr):
    """Per-sample sums go out now; a TOTAL slot adds the tile's column sums to its running total."""
    if TOTAL:
        total += tl.sum(acc, axis=0)
    else:
        tl.store(out_ptr + b[:, None] * D + cols[None, :], cast_for(acc, out_ptr, ROUND_BF16), mask=mask)
    return total


@triton.jit
def _slot_sums(out_ptr, total, base, n_chunks, b, cols, D, mask, K: tl.constexpr, k: tl.constexpr,
               TOTAL: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, ROUND_BF16: tl.constexpr):
    """Sum k (when k < K) of a [BLOCK_B, BLOCK_D] tile: stored per sample, or added to its running total."""
    if K > k:
        acc = _chunk_sums(base, n_chunks, K, k, D, mask, BLOCK_B, BLOCK_D)
        total = _store_sums(out_ptr, acc, total, b, cols, D, mask, TOTAL, ROUND_BF16)
    return total


@triton.jit
def _store_total(out_ptr, total, cols, cmask, TOTAL: tl.constexpr, ROUND_BF16: tl.constexpr):
    """A TOTAL slot's sum over every sample goes out once all tiles are added."""
    if TOTAL:
        tl.store(out_ptr + cols, cast_for(total, out_ptr, ROUND_BF16), mask=cmask)


@triton.jit
def _sum_partials_kernel(part_ptr, out0_ptr, out1_ptr, out2_ptr, out3_ptr, out4_ptr, B, n_chunks, D,
                         rows_per_program, K: tl.constexpr, TOTAL0: tl.constexpr, TOTAL1: tl.constexpr,
                         TOTAL2: tl.constexpr, TOTAL3: tl.constexpr, TOTAL4: tl.constexpr, BLOCK_B: tl.constexpr,
                         BLOCK_D: tl.constexpr, ROUND_BF16: tl.constexpr):
    """out_k[b, :] = sum over c of part[b, c, k, :] (c in increasing order), or, for a TOTAL slot,
    out_k[:] = that summed over b too, b in increasing tiles (a TOTAL launch has one program row over
    all of B). Fixed orders throughout: deterministic, no atomics. k < K <= 5."""
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    first = tl.program_id(0) * rows_per_program
    last = tl.minimum(first + rows_per_program, B)
    total0 = tl.zeros([BLOCK_D], dtype=part_ptr.dtype.element_ty)
    total1 = total0
    total2 = total0
    total3 = total0
    total4 = total0
    for b0 in range(first, last, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        mask = (b < last)[:, None] & cmask[None, :]
        base = part_ptr + b[:, None].to(tl.int64) * n_chunks * K * D + cols[None, :]
        total0 = _slot_sums(out0_ptr, total0, base, n_chunks, b, cols, D, mask, K, 0, TOTAL0, BLOCK_B, BLOCK_D,
                            ROUND_BF16)
        total1 = _slot_sums(out1_ptr, total1, base, n_chunks, b, cols, D, mask, K, 1, TOTAL1, BLOCK_B, BLOCK_D,
                            ROUND_BF16)
        total2 = _slot_sums(out2_ptr, total2, base, n_chunks, b, cols, D, mask, K, 2, TOTAL2, BLOCK_B, BLOCK_D,
                            ROUND_BF16)
        total3 = _slot_sums(out3_ptr, total3, base, n_chunks, b, cols, D, mask, K, 3, TOTAL3, BLOCK_B, BLOCK_D,
                            ROUND_BF16)
        total4 = _slot_sums(out4_ptr, total4, base, n_chunks, b, cols, D, mask, K, 4, TOTAL4, BLOCK_B, BLOCK_D,
                            ROUND_BF16)
    _store_total(out0_ptr, total0, cols, cmask, TOTAL0, ROUND_BF16)
    _store_total(out1_ptr, total1, cols, cmask, TOTAL1, ROUND_BF16)
    _store_total(out2_ptr, total2, cols, cmask, TOTAL2, ROUND_BF16)
    _store_total(out3_ptr, total3, cols, cmask, TOTAL3, ROUND_BF16)
    _store_total(out4_ptr, total4, cols, cmask, TOTAL4, ROUND_BF16)


# Elements per sum_partials tile. With a TOTAL slot one program row walks all of B, so its tiles are
# narrow (32 columns: one 128-byte line per row in float32) and tall, for enough programs over D.
_SUM_TILE = 2048
_TOTAL_BLOCK_D = 32


def sum_partials(part, dtypes, totals=()):
    """[B, n_chunks, K, D] partial sums -> K tensors (dtypes[k]): [B, D] with chunks added in a fixed
    order, or [D] (also summed over B, in a fixed order) where totals[k] is true; all K in one launch.

    A total is what a bias gradient needs (a sum over every row): it comes out of the same launch
    instead of a second reduction over [B, D].
    """
    B, n_chunks, K, D = part.shape
    if K != len(dtypes) or not 1 <= K <= 5:
        raise ValueError(f"sum_partials: part has K={K} sums, dtypes gives {len(dtypes)} (1 to 5 expected)")
    totals = tuple(bool(t) for t in totals) + (False,) * (K - len(totals))
    if len(totals) != K:
        raise ValueError(f"sum_partials: totals has {len(totals)} flags for K={K} sums")
    outs = [empty((D,) if tot else (B, D), dt, part.device) for dt, tot in zip(dtypes, totals)]
    if B == 0 or D == 0:
        return [o.zero_() for o in outs]
    if any(totals):
        block_d = min(triton.next_power_of_2(D), _TOTAL_BLOCK_D)
        block_b = min(_SUM_TILE // block_d, triton.next_power_of_2(B))
        rows_per_program = B
    else:
        block_d = min(triton.next_power_of_2(D), 1024)
        block_b = min(max(1, _SUM_TILE // block_d), triton.next_power_of_2(B))
        rows_per_program = block_b
    ptrs = outs + [outs[0]] * (5 - K)  # unused pointers are never touched (K is constexpr)
    flags = totals + (False,) * (5 - K)
    _sum_partials_kernel[(triton.cdiv(B, rows_per_program), triton.cdiv(D, block_d))](
        part, *ptrs, B, n_chunks, D, rows_per_program, K=K,
        TOTAL0=flags[0], TOTAL1=flags[1], TOTAL2=flags[2], TOTAL3=flags[3], TOTAL4=flags[4],
        BLOCK_B=block_b, BLOCK_D=block_d, ROUND_BF16=interpreting(), num_warps=4,
    )
    return outs
