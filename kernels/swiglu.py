"""SwiGLU on the packed projection, forward and backward, as Triton kernels.

LightningDiT's MLP runs one GEMM `w12` whose output packs two [H] projections, ab = [a | b] ([..., 2H]),
then hidden = silu(a) * b. The forward reads ab once and writes hidden [..., H]; the backward reads
d(hidden) and ab once and writes the packed gradient d(ab) [..., 2H] in one pass:
    d(a) = g * b * silu'(a),  silu'(a) = s (1 + a (1 - s)),  s = sigmoid(a)
    d(b) = g * silu(a)
With `bias` (w12's bias [2H], the GEMM then run without it) the kernels add it to ab as they read it and
the backward also sums d(ab) over the rows (the bias gradient) in the same pass, as per-chunk partial sums
added in a fixed order (deterministic, no atomics). Math in float32 whatever the storage dtypes (the bias
is read as it is stored), one rounding on store.

ab may have any row stride (a slice of a wider tensor) as long as its last dim is contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cast_for, chunk_grid, column_chunk, empty, interpreting, n_sm, row_tile


@triton.jit
def _silu_parts(a):
    # sigmoid through exp(-a): for a -> -inf exp overflows to inf and s -> 0, a * s -> -0 (no NaN)
    s = 1.0 / (1.0 + tl.exp(-a))
    return s, a * s


@triton.jit
def _swiglu_fwd_kernel(
    ab_ptr, bias_ptr, out_ptr, M, H, stride_ab,
    HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, INTERPRET: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    cmask = cols < H
    m = (rows < M)[:, None] & cmask[None, :]
    a_offs = rows[:, None] * stride_ab + cols[None, :]
    a = tl.load(ab_ptr + a_offs, mask=m, other=0.0).to(tl.float32)
    b = tl.load(ab_ptr + a_offs + H, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        a += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        b += tl.load(bias_ptr + H + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    _, silu = _silu_parts(a)
    out = cast_for(silu * b, out_ptr, INTERPRET)
    tl.store(out_ptr + rows[:, None] * H + cols[None, :], out, mask=m)


@triton.jit
def _swiglu_bwd_kernel(
    dout_ptr, ab_ptr, bias_ptr, dab_ptr, part_ptr, M, H, stride_ab, stride_dout, rows_per_prog,
    HAS_BIAS: tl.constexpr, HAS_DBIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, INTERPRET: tl.constexpr,
):
    """One program: BN columns of each half over a chunk of rows_per_prog rows. With HAS_DBIAS it writes
    the chunk's column sums of d(ab) (as stored) to part[chunk, 0:2H]."""
    pid_c, cols, cmask, row0 = column_chunk(H, rows_per_prog, BN)
    if HAS_BIAS:
        bias_a = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        bias_b = tl.load(bias_ptr + H + cols, mask=cmask, other=0.0).to(tl.float32)
    acc_a = tl.zeros((BN,), dtype=tl.float32)
    acc_b = tl.zeros((BN,), dtype=tl.float32)
    for r in range(0, rows_per_prog, BM):
        rows, m = row_tile(row0 + r, M, cmask, BM)
        a_offs = rows[:, None] * stride_ab + cols[None, :]
        a = tl.load(ab_ptr + a_offs, mask=m, other=0.0).to(tl.float32)
        b = tl.load(ab_ptr + a_offs + H, mask=m, other=0.0).to(tl.float32)
        if HAS_BIAS:
            a += bias_a[None, :]
            b += bias_b[None, :]
        g = tl.load(dout_ptr + rows[:, None] * stride_dout + cols[None, :], mask=m, other=0.0).to(tl.float32)
        s, silu = _silu_parts(a)
        da = cast_for(g * b * (s * (1.0 + a * (1.0 - s))), dab_ptr, INTERPRET)
        db = cast_for(g * silu, dab_ptr, INTERPRET)
        d_offs = rows[:, None] * (2 * H) + cols[None, :]
        tl.store(dab_ptr + d_offs, da, mask=m)
        tl.store(dab_ptr + d_offs + H, db, mask=m)
        if HAS_DBIAS:
            acc_a += tl.sum(tl.where(m, da.to(tl.float32), 0.0), axis=0)
            acc_b += tl.sum(tl.where(m, db.to(tl.float32), 0.0), axis=0)
    if HAS_DBIAS:
        tl.store(part_ptr + pid_c * (2 * H) + cols, acc_a, mask=cmask)
        tl.store(part_ptr + pid_c * (2 * H) + H + cols, acc_b, mask=cmask)


def _rows(t: torch.Tensor, width: int, name: str) -> tuple[torch.Tensor, int]:
    """t [..., width] as a 2-D [M, width] view with a unit last stride (a copy only when none exists)."""
    if t.shape[-1] != width:
        raise ValueError(f"{name} must have last dim {width}, got shape {list(t.shape)}")
    t2 = t.reshape(-1, width) if t.dim() != 2 else t
    if t2.shape[0] and width and (t2.stride(-1) != 1 or (t2.shape[0] > 1 and t2.stride(0) < width)):
        t2 = t2.contiguous()
    return t2, (t2.stride(0) if t2.shape[0] > 1 else width)


def _check_bias(bias: torch.Tensor | None, H: int, ab: torch.Tensor) -> torch.Tensor:
    if bias is None:
        return ab  # a stand-in pointer, never read (HAS_BIAS=False)
    if tuple(bias.shape) != (2 * H,):
        raise ValueError(f"bias must have shape [2H] = [{2 * H}], got {list(bias.shape)}")
    return bias.contiguous()


def _fwd_tiles(H: int, device: torch.device) -> tuple[int, int, int]:
    BN = min(512, max(16, triton.next_power_of_2(H)))
    if device.type == "cuda":
        return max(1, 2048 // BN), BN, 4
    return max(1, 8192 // BN), BN, 4  # interpreter: few large programs


def swiglu_fwd(ab: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu(a) * b for ab = [a | b] [..., 2H] (plus bias [2H] when given) -> [..., H] in ab's dtype."""
    if ab.shape[-1] % 2:
        raise ValueError(f"ab must have an even last dim 2H, got shape {list(ab.shape)}")
    H = ab.shape[-1] // 2
    ab2, stride = _rows(ab, 2 * H, "ab")
    M = ab2.shape[0]
    out = empty((*ab.shape[:-1], H), ab.dtype, ab.device)
    if M == 0 or H == 0:
        return out
    BM, BN, warps = _fwd_tiles(H, ab.device)
    _swiglu_fwd_kernel[(triton.cdiv(M, BM), triton.cdiv(H, BN))](
        ab2, _check_bias(bias, H, ab2), out, M, H, stride,
        HAS_BIAS=bias is not None, BM=BM, BN=BN, INTERPRET=interpreting(), num_warps=warps,
    )
    return out


def _bwd_tiles(M: int, H: int, device: torch.device):
    BN = min(256, max(16, triton.next_power_of_2(H)))
    if device.type == "cuda":
        BM, warps, target = 16, 4, 4 * n_sm(device)
    else:  # interpreter: few large programs
        BM, warps, target = 32, 4, 4
    return (BM, BN, warps, *chunk_grid(M, H, BM, BN, target))


def swiglu_bwd(dout: torch.Tensor, ab: torch.Tensor, bias: torch.Tensor | None = None, need_bias_grad: bool = False):
    """(d(ab), d(bias)) of swiglu_fwd: d(ab) [..., 2H] in ab's dtype; d(bias) [2H] float32 (the column sums
    of d(ab) as stored) when need_bias_grad, else None."""
    if ab.shape[-1] % 2:
        raise ValueError(f"ab must have an even last dim 2H, got shape {list(ab.shape)}")
    H = ab.shape[-1] // 2
    if tuple(dout.shape) != (*ab.shape[:-1], H):
        raise ValueError(f"dout must have shape {[*ab.shape[:-1], H]}, got {list(dout.shape)}")
    ab2, stride_ab = _rows(ab, 2 * H, "ab")
    dout2, stride_dout = _rows(dout, H, "dout")
    M = ab2.shape[0]
    dab = empty(ab.shape, ab.dtype, ab.device)
    if M == 0 or H == 0:
        return dab, (torch.zeros(2 * H, device=ab.device, dtype=torch.float32) if need_bias_grad else None)
    BM, BN, warps, n_col, n_chunks, rows_per_prog = _bwd_tiles(M, H, ab.device)
    part = empty((n_chunks, 2 * H), torch.float32, ab.device) if need_bias_grad else dab
    _swiglu_bwd_kernel[(n_col, n_chunks)](
        dout2, ab2, _check_bias(bias, H, ab2), dab, part, M, H, stride_ab, stride_dout, rows_per_prog,
        HAS_BIAS=bias is not None, HAS_DBIAS=need_bias_grad, BM=BM, BN=BN, INTERPRET=interpreting(),
        num_warps=warps,
    )
    return dab, (part.sum(0) if need_bias_grad else None)
