"""Final layer: adaLN modulate + linear (D -> P = p*p*C_out) + unpatchify, and its backward.

Forward: one program owns BM token rows of one image. It computes the row statistics (mean, then the
variance of x - mean, so large-mean rows lose nothing), then streams x again in BK-wide chunks,
normalizing, modulating and multiplying by W^T [D, P] (P is tiny, 32 for DiT-XL/2) with an fp32
accumulator. The epilogue adds the bias and stores each (token, feature) straight at its NCHW position,
so the token-major [B, L, P] output is never written. Re-reads of the row block hit L1/L2
(BM x D x 2 bytes = 37 KB for D = 1152).

Backward: d(out) [N, C, H, W] is gathered to token-major dY [B, L, P] by torch (P/D = 3% of x's bytes).
One kernel then recomputes the statistics and, per D chunk, h and dh = dY @ W (tensor-core dot, P small),
writing h (needed for d(weight)) and per-(image, row block) partial sums of dh and dh * xn (d(shift),
d(scale)), and finally dx = rstd * (dxn - mean(dxn) - xn * mean(dxn * xn)) with dxn = dh * (1 + scale).
d(weight) = dY^T @ h is a cuBLAS GEMM over the stored h (an [P, M] x [M, D] GEMM with a tiny output,
which cuBLAS reduces deterministically); the partial sums are reduced by torch in a fixed order, so every
reduction is deterministic (no atomics). Passes over [B, L, D] memory: read x, write dx, write + read h;
the h pass is skipped when weight needs no gradient.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import cast_for, dot_acc, interpreting


@triton.jit
def _row_stats(x_row_ptr, rmask, D, eps, BM: tl.constexpr, BK: tl.constexpr):
    """mean and 1/std of BM rows of length D (x_row_ptr: [BM] pointers to each row's start)."""
    s = tl.zeros((BM,), dtype=tl.float32)
    for k0 in range(0, D, BK):
        cols = k0 + tl.arange(0, BK)
        m = rmask[:, None] & (cols < D)[None, :]
        s += tl.sum(tl.load(x_row_ptr[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32), axis=1)
    mean = s / D
    v = tl.zeros((BM,), dtype=tl.float32)
    for k0 in range(0, D, BK):
        cols = k0 + tl.arange(0, BK)
        m = rmask[:, None] & (cols < D)[None, :]
        xv = tl.load(x_row_ptr[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
        xc = tl.where(m, xv - mean[:, None], 0.0)
        v += tl.sum(xc * xc, axis=1)
    rstd = 1.0 / tl.sqrt(v / D + eps)
    return mean, rstd


@triton.jit
def _final_layer_fwd_kernel(
    x_ptr, shift_ptr, scale_ptr, w_ptr, b_ptr, out_ptr,
    L, D, NF, Wg, C,
    sxb, sxl, ssb, scb,
    eps,
    HAS_BIAS: tl.constexpr, P: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < L
    x_row_ptr = x_ptr + b * sxb + rows.to(tl.int64) * sxl
    mean, rstd = _row_stats(x_row_ptr, rmask, D, eps, BM, BK)

    fs = tl.arange(0, BF)
    fmask = fs < NF
    acc = tl.zeros((BM, BF), dtype=tl.float32)
    for k0 in range(0, D, BK):
        cols = k0 + tl.arange(0, BK)
        cmask = cols < D
        m = rmask[:, None] & cmask[None, :]
        xv = tl.load(x_row_ptr[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
        sh = tl.load(shift_ptr + b * ssb + cols, mask=cmask, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + b * scb + cols, mask=cmask, other=0.0).to(tl.float32)
        h = (xv - mean[:, None]) * rstd[:, None] * (1.0 + sc[None, :]) + sh[None, :]
        h = cast_for(tl.where(m, h, 0.0), w_ptr, INTERPRET)
        wt = tl.load(w_ptr + fs[None, :] * D + cols[:, None], mask=cmask[:, None] & fmask[None, :], other=0.0)
        acc += dot_acc(h, wt, INTERPRET)

    if HAS_BIAS:
        acc += tl.load(b_ptr + fs, mask=fmask, other=0.0).to(tl.float32)[None, :]
    # feature f = (i * p + j) * C + c of token (gh, gw) lands at out[b, c, gh*p + i, gw*p + j]
    i = fs // (P * C)
    j = (fs // C) % P
    c = fs % C
    gh = rows // Wg
    gw = rows % Wg
    Wimg = Wg * P
    HW = (L // Wg) * P * Wimg
    row_off = (gh * P) * Wimg + gw * P
    f_off = c.to(tl.int64) * HW + i * Wimg + j
    ptrs = out_ptr + b * C * HW + row_off.to(tl.int64)[:, None] + f_off[None, :]
    tl.store(ptrs, cast_for(acc, out_ptr, INTERPRET), mask=rmask[:, None] & fmask[None, :])


@triton.jit
def _final_layer_bwd_kernel(
    x_ptr, shift_ptr, scale_ptr, w_ptr, dy_ptr,
    dx_ptr, h_ptr, dshift_part_ptr, dscale_part_ptr,
    L, D, NF, n_mblocks,
    sxb, sxl, ssb, scb,
    eps,
    STORE_H: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < L
    x_row_ptr = x_ptr + b * sxb + rows.to(tl.int64) * sxl
    tok = b * L + rows.to(tl.int64)  # row index in the contiguous [B*L, .] buffers
    mean, rstd = _row_stats(x_row_ptr, rmask, D, eps, BM, BK)

    fs = tl.arange(0, BF)
    fmask = fs < NF
    dy = tl.load(dy_ptr + tok[:, None] * NF + fs[None, :], mask=rmask[:, None] & fmask[None, :], other=0.0)
    dy = dy.to(w_ptr.dtype.element_ty)
    part = (b * n_mblocks + pid_m) * D

    s1 = tl.zeros((BM,), dtype=tl.float32)
    s2 = tl.zeros((BM,), dtype=tl.float32)
    for k0 in range(0, D, BK):
        cols = k0 + tl.arange(0, BK)
        cmask = cols < D
        m = rmask[:, None] & cmask[None, :]
        xv = tl.load(x_row_ptr[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + b * scb + cols, mask=cmask, other=0.0).to(tl.float32)
        xn = tl.where(m, (xv - mean[:, None]) * rstd[:, None], 0.0)
        if STORE_H:
            sh = tl.load(shift_ptr + b * ssb + cols, mask=cmask, other=0.0).to(tl.float32)
            h = xn * (1.0 + sc[None, :]) + sh[None, :]
            tl.store(h_ptr + tok[:, None] * D + cols[None, :], cast_for(h, h_ptr, INTERPRET), mask=m)
        w = tl.load(w_ptr + fs[:, None] * D + cols[None, :], mask=fmask[:, None] & cmask[None, :], other=0.0)
        dh = dot_acc(dy, w, INTERPRET)  # rows beyond L have dy = 0, so dh = 0 there
        tl.store(dshift_part_ptr + part + cols, tl.sum(dh, axis=0), mask=cmask)
        tl.store(dscale_part_ptr + part + cols, tl.sum(dh * xn, axis=0), mask=cmask)
        dxn = dh * (1.0 + sc[None, :])
        s1 += tl.sum(dxn, axis=1)
        s2 += tl.sum(dxn * xn, axis=1)

    s1 = s1 / D
    s2 = s2 / D
    for k0 in range(0, D, BK):
        cols = k0 + tl.arange(0, BK)
        cmask = cols < D
        m = rmask[:, None] & cmask[None, :]
        xv = tl.load(x_row_ptr[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + b * scb + cols, mask=cmask, other=0.0).to(tl.float32)
        xn = (xv - mean[:, None]) * rstd[:, None]
        w = tl.load(w_ptr + fs[:, None] * D + cols[None, :], mask=fmask[:, None] & cmask[None, :], other=0.0)
        dxn = dot_acc(dy, w, INTERPRET) * (1.0 + sc[None, :])
        dx = rstd[:, None] * (dxn - s1[:, None] - xn * s2[:, None])
        tl.store(dx_ptr + tok[:, None] * D + cols[None, :], cast_for(dx, dx_ptr, INTERPRET), mask=m)


def _blocks(B: int, L: int, D: int, NF: int, on_gpu: bool):
    BF = max(16, triton.next_power_of_2(NF))
    if on_gpu:
        # tl.dot needs >= 16 rows; small batches (B=2 sampling) take 16 to spread over more SMs.
        return (32 if B * L >= 32 * 512 else 16), 128, BF, 4
    return 16, min(512, max(16, triton.next_power_of_2(D))), BF, 4


def _x_rows(x):
    # The kernels address rows with strides but need each row contiguous.
    return x if x.stride(-1) == 1 else x.contiguous()


def final_layer_fwd(x, shift, scale, weight, bias, patch_size: int, out_channels: int, eps: float, out=None):
    """x [B, L, D] -> [B, out_channels, H, W] in weight's dtype (h is rounded to it before the GEMM)."""
    x = _x_rows(x)
    shift, scale = _x_rows(shift), _x_rows(scale)
    B, L, D = x.shape
    p, C = patch_size, out_channels
    NF = p * p * C
    Hg = Wg = math.isqrt(L)
    if Hg * Wg != L:
        raise ValueError(f"x must have a square number of tokens L (a square patch grid), got L={L}")
    shape = (B, C, Hg * p, Wg * p)
    if out is None:
        out = torch.empty(shape, device=x.device, dtype=weight.dtype)
    assert out.shape == shape and out.is_contiguous() and out.dtype == weight.dtype, "bad out buffer"
    if B == 0 or L == 0:
        return out
    weight = weight.contiguous()
    BM, BK, BF, warps = _blocks(B, L, D, NF, x.is_cuda)
    grid = (triton.cdiv(L, BM), B)
    _final_layer_fwd_kernel[grid](
        x, shift, scale, weight, bias.contiguous() if bias is not None else weight, out,
        L, D, NF, Wg, C,
        x.stride(0), x.stride(1), shift.stride(0), scale.stride(0),
        eps,
        HAS_BIAS=bias is not None, P=p, BM=BM, BK=BK, BF=BF, INTERPRET=interpreting(), num_warps=warps,
    )
    return out


def gather_tokens(dout, patch_size: int, out_channels: int):
    """[N, C, H, W] -> token-major [N, L, p*p*C] with features in (i, j, c) order (patchify of the output)."""
    N, C, H, W = dout.shape
    p = patch_size
    t = dout.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
    return t.reshape(N, (H // p) * (W // p), p * p * C)


def final_layer_bwd(dout, x, shift, scale, weight, patch_size: int, out_channels: int, eps: float,
                    need_weight: bool = True, dx_out=None):
    """(dx, dshift, dscale, dweight, dbias) of final_layer; dweight/dbias None when not need_weight.

    dx has x's dtype; dshift/dscale have shift's/scale's; dweight/dbias have weight's.
    """
    x = _x_rows(x)
    shift, scale = _x_rows(shift), _x_rows(scale)
    B, L, D = x.shape
    NF = patch_size * patch_size * out_channels
    weight = weight.contiguous()
    dy = gather_tokens(dout, patch_size, out_channels).contiguous()  # [B, L, NF]
    dx = dx_out if dx_out is not None else torch.empty_like(x, memory_format=torch.contiguous_format)
    assert dx.shape == x.shape and dx.is_contiguous() and dx.dtype == x.dtype, "bad dx buffer"
    BM, BK, BF, warps = _blocks(B, L, D, NF, x.is_cuda)
    n_mb = triton.cdiv(L, BM)
    dshift_part = torch.empty((B, n_mb, D), device=x.device, dtype=torch.float32)
    dscale_part = torch.empty_like(dshift_part)
    h = torch.empty((B, L, D), device=x.device, dtype=weight.dtype) if need_weight else dx
    if B and L:
        _final_layer_bwd_kernel[(n_mb, B)](
            x, shift, scale, weight, dy,
            dx, h, dshift_part, dscale_part,
            L, D, NF, n_mb,
            x.stride(0), x.stride(1), shift.stride(0), scale.stride(0),
            eps,
            STORE_H=need_weight, BM=BM, BK=BK, BF=BF, INTERPRET=interpreting(), num_warps=warps,
        )
    dshift = dshift_part.sum(1).to(shift.dtype)
    dscale = dscale_part.sum(1).to(scale.dtype)
    dweight = dbias = None
    if need_weight:
        dy2 = dy.reshape(B * L, NF).to(weight.dtype)
        dweight = dy2.t() @ h.reshape(B * L, D)
        dbias = dy2.sum(0, dtype=torch.float32).to(weight.dtype)
    return dx, dshift, dscale, dweight, dbias
