"""Final layer: adaLN modulate + linear (D -> NF = p*p*C_out) + unpatchify, and its backward.

Row statistics are ONE pass over x: each BK-wide column chunk of a row block is centred on the row's
pivot (its first element, so x - pivot is exact for rows far from zero), reduced to a chunk mean and
sum of squared deviations in registers, and merged into the running ones (Chan et al.'s pairwise
update). `mu` below is the mean of x - pivot; xn = ((x - pivot) - mu) * rstd keeps float32 accuracy at
mean 1e4, std 1.

Forward: program (f-tile, row block, image) owns BM token rows and BF output features (NF is tiled:
NF = 512 at patch 8 does not fit one tile in shared memory). Pass 1: statistics. Pass 2: stream x
again in BK chunks, normalize, modulate, round h to the weight's dtype and multiply by W^T [BK, BF]
with a float32 accumulator. The epilogue adds the bias and stores each (token, feature) at its NCHW
position, so the token-major [B, L, NF] output never exists. Two reads of x (the second from L1/L2:
BM x D x 4 B = 72 KB at BM=16, D=1152, fp32 x under autocast); with several f-tiles each re-reads x,
but NF > 128 happens only at patch 8, where L is 16x smaller than at patch 2.

Backward: d(out) [N, C, H, W] is gathered to token-major dY [B, L, NF] by torch (NF/D = 3% of x's bytes).
dh = dY @ W runs over NF in BF-wide feature chunks (one chunk, loaded once, when NF <= BF).
Pass 1 (read x once): statistics, and the row sums of dxn = dh * (1 + scale) and of dxn * (x - pivot);
mean(dxn * xn) follows algebraically: rstd * (mean(dxn * (x - pivot)) - mu * mean(dxn)).
Pass 2 (read x again): xn, h (stored when d(weight) is needed), per-(image, row block) partial sums of
dh and dh * xn (d(shift), d(scale)), and dx = rstd * (dxn - mean(dxn) - xn * mean(dxn * xn)).
d(weight) = dY^T @ h is a cuBLAS GEMM over the stored h (deterministic); the partial sums are added in
a fixed order by one launch (common.sum_partials). No atomics anywhere: bitwise reproducible.
Passes over [B, L, D] memory: read x twice, write dx, write + read h (h skipped without d(weight)).

Norm modes (constexpr flags, all off for DiT's final layer, whose code they leave as it was), as the torch
backend defines them (dit_fast/ops/torch_backend.py, adaln_modulate):
- RMS: RMSNorm as LightningDiT writes it. No centring: the statistic is the mean of squares of x itself (no
  pivot, mu = 0), n = x * rstd in float32, rounded to x's dtype (type_as(x)) before the gain. Backward: the
  rounding passes gradients through unchanged (autograd's cast), so dx = rstd * (dxn - xhat * mean(dxn * xhat))
  with the unrounded xhat = x * rstd, mean(dxn * xhat) = rstd * mean(dxn * x); d(scale), d(gain) and h use
  the rounded n, as the forward does.
- HAS_NORM_WEIGHT: the norm's gain g [D]: h = n * g * (1 + scale) (+ shift); dxn = dh * (1 + scale) * g.
  d(gain) = sum over rows of dh * n * (1 + scale): its per-(image, row block) partials are the same row sums
  as d(scale)'s (dh * n), times (1 + scale) where d(scale)'s are times g; common.sum_partials adds them over
  row blocks and images in a fixed order in the same launch.
- SHIFT (on by default): off for scale-only adaLN (LightningDiT's wo_shift): nothing added, no d(shift).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import cast_for, dot_acc, interpreting, inv_std, sum_partials

# Output features per tile (the dot's N): larger tiles need > 227 KB of shared memory at fp32.
_MAX_BF = 128


@triton.jit
def _row_pivot(x_row_ptr, rmask):
    """Each row's first element, in float32: the centre that keeps x - pivot exact for large-mean rows."""
    return tl.load(x_row_ptr, mask=rmask, other=0.0).to(tl.float32)


@triton.jit
def _chan_merge(mean, m2, n, xc, m, n_c):
    """Merge a chunk (xc = x - pivot, masked to 0 outside m; n_c valid columns) into the running
    (mean, m2) of n columns; the chunk's own statistics come from registers, two-pass."""
    c_mean = tl.sum(xc, axis=1) / n_c
    d = tl.where(m, xc - c_mean[:, None], 0.0)
    c_m2 = tl.sum(d * d, axis=1)
    n_new = n + n_c
    delta = c_mean - mean
    mean = mean + delta * (n_c / n_new)
    m2 = m2 + c_m2 + delta * delta * (n * n_c / n_new)
    return mean, m2


@triton.jit
def _row_start(x_row_ptr, rmask, RMS: tl.constexpr, BM: tl.constexpr):
    """The rows' pivot (LayerNorm), or zeros (RMS: nothing is centred, the pivot is never read)."""
    if RMS:
        pivot = tl.zeros((BM,), dtype=tl.float32)
    else:
        pivot = _row_pivot(x_row_ptr, rmask)
    return pivot


@triton.jit
def _row_stats(x_row_ptr, pivot, rmask, D, eps, BM: tl.constexpr, BK: tl.constexpr, RMS: tl.constexpr):
    """(mu, rstd) of BM rows of length D in one pass: mu = mean of x - pivot; with RMS, mu = 0 and rstd from
    the mean of squares of x."""
    mean = tl.zeros((BM,), dtype=tl.float32)
    m2 = tl.zeros((BM,), dtype=tl.float32)
    for k0 in range(0, D, BK):
        cols = k0 + tl.arange(0, BK)
        m = rmask[:, None] & (cols < D)[None, :]
        xv = tl.load(x_row_ptr[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
        if RMS:
            m2 += tl.sum(xv * xv, axis=1)  # masked elements loaded as 0
        else:
            xc = tl.where(m, xv - pivot[:, None], 0.0)
            mean, m2 = _chan_merge(mean, m2, k0 * 1.0, xc, m, tl.minimum(D - k0, BK).to(tl.float32))
    return mean, inv_std(m2 / D, eps)  # NaN, not 0, where the squares overflowed


@triton.jit
def _standardized(xv, pivot, mu, rstd, RMS: tl.constexpr):
    """xhat of one [BM, BK] chunk in float32: (x - pivot - mu) * rstd, or x * rstd with RMS."""
    if RMS:
        xhat = xv * rstd[:, None]
    else:
        xhat = ((xv - pivot[:, None]) - mu[:, None]) * rstd[:, None]
    return xhat


@triton.jit
def _norm_out(xhat, x_ptr, RMS: tl.constexpr, INTERPRET: tl.constexpr):
    """n, what the gain and the modulation multiply: xhat, or with RMS xhat rounded to x's dtype (LightningDiT's
    RMSNorm: normalized in float32, then type_as(x))."""
    n = xhat
    if RMS:
        n = cast_for(xhat, x_ptr, INTERPRET).to(tl.float32)
    return n


@triton.jit
def _modulated(n, g, sc, sh, HAS_NORM_WEIGHT: tl.constexpr, SHIFT: tl.constexpr):
    """h = n * g * (1 + scale) + shift (the gain and the shift only where present), in the torch backend's order."""
    if HAS_NORM_WEIGHT:
        n = n * g[None, :]
    h = n * (1.0 + sc[None, :])
    if SHIFT:
        h = h + sh[None, :]
    return h


@triton.jit
def _load_vec(base_ptr, cols, cmask):
    """A [BK] chunk of a per-column vector (shift, scale, gain) in float32."""
    return tl.load(base_ptr + cols, mask=cmask, other=0.0).to(tl.float32)


@triton.jit
def _final_layer_fwd_kernel(
    x_ptr, shift_ptr, scale_ptr, g_ptr, w_ptr, b_ptr, out_ptr,
    L, D, NF, Wg, C,
    sxb, sxl, ssb, scb,
    eps,
    HAS_BIAS: tl.constexpr, P: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr, INTERPRET: tl.constexpr,
    RMS: tl.constexpr = False, HAS_NORM_WEIGHT: tl.constexpr = False, SHIFT: tl.constexpr = True,
):
    pid_f = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < L
    x_row_ptr = x_ptr + b * sxb + rows.to(tl.int64) * sxl
    pivot = _row_start(x_row_ptr, rmask, RMS, BM)
    mu, rstd = _row_stats(x_row_ptr, pivot, rmask, D, eps, BM, BK, RMS)

    fs = pid_f * BF + tl.arange(0, BF)
    fmask = fs < NF
    acc = tl.zeros((BM, BF), dtype=tl.float32)
    for k0 in range(0, D, BK):
        cols = k0 + tl.arange(0, BK)
        cmask = cols < D
        m = rmask[:, None] & cmask[None, :]
        xv = tl.load(x_row_ptr[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
        wt = tl.load(w_ptr + fs[None, :] * D + cols[:, None], mask=cmask[:, None] & fmask[None, :], other=0.0)
        sh = rstd  # stands in without SHIFT (never read)
        if SHIFT:
            sh = _load_vec(shift_ptr + b * ssb, cols, cmask)
        sc = _load_vec(scale_ptr + b * scb, cols, cmask)
        g = rstd  # likewise without HAS_NORM_WEIGHT
        if HAS_NORM_WEIGHT:
            g = _load_vec(g_ptr, cols, cmask)
        n = _norm_out(_standardized(xv, pivot, mu, rstd, RMS), x_ptr, RMS, INTERPRET)
        h = cast_for(tl.where(m, _modulated(n, g, sc, sh, HAS_NORM_WEIGHT, SHIFT), 0.0), w_ptr, INTERPRET)
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
def _dh_tile(dy_ptr, tok, rmask, dy_once, w_ptr, cols, cmask, NF, D,
             BM: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr, N_FT: tl.constexpr, INTERPRET: tl.constexpr):
    """dh[BM, BK] = dY[rows, :] @ W[:, cols], over NF in BF-wide feature chunks (dy_once: the whole dY
    tile, preloaded, when N_FT == 1). Rows beyond L have dY = 0, so dh = 0 there."""
    if N_FT == 1:
        fs = tl.arange(0, BF)
        w = tl.load(w_ptr + fs[:, None] * D + cols[None, :], mask=(fs < NF)[:, None] & cmask[None, :], other=0.0)
        dh = dot_acc(dy_once, w, INTERPRET)
    else:
        dh = tl.zeros((BM, BK), dtype=tl.float32)
        for f0 in range(0, NF, BF):
            fs = f0 + tl.arange(0, BF)
            fmask = fs < NF
            dy = tl.load(dy_ptr + tok[:, None] * NF + fs[None, :], mask=rmask[:, None] & fmask[None, :], other=0.0)
            w = tl.load(w_ptr + fs[:, None] * D + cols[None, :], mask=fmask[:, None] & cmask[None, :], other=0.0)
            dh += dot_acc(dy.to(w_ptr.dtype.element_ty), w, INTERPRET)
    return dh


@triton.jit
def _bwd_chunk(x_row_ptr, scale_ptr, b, scb, dy_ptr, tok, rmask, dy_once, w_ptr, k0, NF, D,
               BM: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr, N_FT: tl.constexpr, INTERPRET: tl.constexpr):
    """What both backward passes read for the column chunk at k0: (cols, cmask, m, x, scale, dh)."""
    cols = k0 + tl.arange(0, BK)
    cmask = cols < D
    m = rmask[:, None] & cmask[None, :]
    xv = tl.load(x_row_ptr[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
    sc = tl.load(scale_ptr + b * scb + cols, mask=cmask, other=0.0).to(tl.float32)
    dh = _dh_tile(dy_ptr, tok, rmask, dy_once, w_ptr, cols, cmask, NF, D, BM, BK, BF, N_FT, INTERPRET)
    return cols, cmask, m, xv, sc, dh


@triton.jit
def _store_partials(base, D, cols, cmask, dh, n, sc, g, HAS_NORM_WEIGHT: tl.constexpr, SHIFT: tl.constexpr):
    """One column chunk of this row block's partial sums, slot after slot: d(shift) = sum dh (SHIFT), d(scale)
    = g * sum dh * n, d(gain) = (1 + scale) * sum dh * n (HAS_NORM_WEIGHT; g = 1 without)."""
    if SHIFT:
        tl.store(base + cols, tl.sum(dh, axis=0), mask=cmask)
        base = base + D
    if HAS_NORM_WEIGHT:
        s_dhn = tl.sum(dh * n, axis=0)
        tl.store(base + cols, s_dhn * g, mask=cmask)
        tl.store(base + D + cols, s_dhn * (1.0 + sc), mask=cmask)
    else:
        tl.store(base + cols, tl.sum(dh * n, axis=0), mask=cmask)


@triton.jit
def _final_layer_bwd_kernel(
    x_ptr, shift_ptr, scale_ptr, g_ptr, w_ptr, dy_ptr,
    dx_ptr, h_ptr, part_ptr,
    L, D, NF, n_mblocks,
    sxb, sxl, ssb, scb,
    eps,
    STORE_H: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr, N_FT: tl.constexpr, INTERPRET: tl.constexpr,
    RMS: tl.constexpr = False, HAS_NORM_WEIGHT: tl.constexpr = False, SHIFT: tl.constexpr = True,
    K: tl.constexpr = 2,  # partial sums per column: d(shift) (SHIFT), d(scale), d(gain) (HAS_NORM_WEIGHT)
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < L
    x_row_ptr = x_ptr + b * sxb + rows.to(tl.int64) * sxl
    tok = b * L + rows.to(tl.int64)  # row index in the contiguous [B*L, .] buffers
    pivot = _row_start(x_row_ptr, rmask, RMS, BM)
    fs0 = tl.arange(0, BF)
    dy_once = tl.load(dy_ptr + tok[:, None] * NF + fs0[None, :], mask=rmask[:, None] & (fs0 < NF)[None, :],
                      other=0.0).to(w_ptr.dtype.element_ty)

    # Pass 1: statistics and the row sums of dx's formula, from one read of x.
    mean = tl.zeros((BM,), dtype=tl.float32)
    m2 = tl.zeros((BM,), dtype=tl.float32)
    t1 = tl.zeros((BM,), dtype=tl.float32)
    t2 = tl.zeros((BM,), dtype=tl.float32)
    for k0 in range(0, D, BK):
        cols, cmask, m, xv, sc, dh = _bwd_chunk(x_row_ptr, scale_ptr, b, scb, dy_ptr, tok, rmask, dy_once, w_ptr,
                                                k0, NF, D, BM, BK, BF, N_FT, INTERPRET)
        if RMS:
            m2 += tl.sum(xv * xv, axis=1)
            xc = xv  # not centred (masked elements loaded as 0)
        else:
            xc = tl.where(m, xv - pivot[:, None], 0.0)
            mean, m2 = _chan_merge(mean, m2, k0 * 1.0, xc, m, tl.minimum(D - k0, BK).to(tl.float32))
        dxn = dh * (1.0 + sc[None, :])
        if HAS_NORM_WEIGHT:
            dxn = dxn * _load_vec(g_ptr, cols, cmask)[None, :]
        if not RMS:
            t1 += tl.sum(dxn, axis=1)
        t2 += tl.sum(dxn * xc, axis=1)
    mu = mean
    rstd = inv_std(m2 / D, eps)
    s1 = t1 / D
    if RMS:
        s2 = rstd * (t2 / D)  # mean(dxn * xhat), nothing centred
    else:
        s2 = rstd * (t2 / D - mu * s1)  # mean(dxn * xn)

    # Pass 2: h, the partial sums of d(shift), d(scale) and d(gain), dx.
    part = (b * n_mblocks + pid_m) * K * D
    for k0 in range(0, D, BK):
        cols, cmask, m, xv, sc, dh = _bwd_chunk(x_row_ptr, scale_ptr, b, scb, dy_ptr, tok, rmask, dy_once, w_ptr,
                                                k0, NF, D, BM, BK, BF, N_FT, INTERPRET)
        xn = tl.where(m, _standardized(xv, pivot, mu, rstd, RMS), 0.0)
        n = _norm_out(xn, x_ptr, RMS, INTERPRET)  # the forward's n (xn unrounded is dx's xhat)
        g = rstd  # stands in without HAS_NORM_WEIGHT (never read)
        if HAS_NORM_WEIGHT:
            g = _load_vec(g_ptr, cols, cmask)
        if STORE_H:
            sh = rstd  # likewise without SHIFT
            if SHIFT:
                sh = _load_vec(shift_ptr + b * ssb, cols, cmask)
            h = _modulated(n, g, sc, sh, HAS_NORM_WEIGHT, SHIFT)
            tl.store(h_ptr + tok[:, None] * D + cols[None, :], cast_for(h, h_ptr, INTERPRET), mask=m)
        _store_partials(part_ptr + part, D, cols, cmask, dh, n, sc, g, HAS_NORM_WEIGHT, SHIFT)
        dxn = dh * (1.0 + sc[None, :])
        if HAS_NORM_WEIGHT:
            dxn = dxn * g[None, :]
        if RMS:
            dx = rstd[:, None] * (dxn - xn * s2[:, None])
        else:
            dx = rstd[:, None] * (dxn - s1[:, None] - xn * s2[:, None])
        tl.store(dx_ptr + tok[:, None] * D + cols[None, :], cast_for(dx, dx_ptr, INTERPRET), mask=m)


def _blocks(B: int, L: int, D: int, NF: int, x_bytes: int, on_gpu: bool):
    """(BM, BK, BF, num_warps). BF: output features per tile (forward) / per dh chunk (backward).
    BK is 64 columns (32 with 32 rows and BF > 64) whatever x's dtype (x_bytes, kept for callers), so the live
    [BM, BK] float32 tiles stay in registers with both Triton versions checked (see below)."""
    BF = max(16, min(triton.next_power_of_2(NF), _MAX_BF))
    if on_gpu:
        # tl.dot needs >= 16 rows; small batches (B=2 sampling) take 16 to spread over more SMs.
        BM = 32 if B * L >= 32 * 512 else 16
        # [BM, BK] float32 tiles live at once in the backward: 64 x 32 rows (128 x 32 spills). 128 x 16 rows
        # (bf16 x) fits Triton 3.9 (126 registers) but spills with Triton 3.6 (the GPU machine's: 128 registers
        # + 8 B of stack, benchmarks/results/*-triton-compile-versions.md), so tiles are chosen by the worse of
        # the two: 64 columns.
        BK = 64
        if BM == 32 and BF > 64:
            BK = 32
        return BM, BK, BF, 4
    return 16, min(512, max(16, triton.next_power_of_2(D))), BF, 4


def _x_rows(x):
    # The kernels address rows with strides but need each row contiguous.
    return x if x.stride(-1) == 1 else x.contiguous()


def _modes(shift, norm_weight, rms: bool) -> dict:
    """The kernels' norm-mode constexprs (all at their defaults for DiT's final layer)."""
    return {"RMS": bool(rms), "HAS_NORM_WEIGHT": norm_weight is not None, "SHIFT": shift is not None}


def final_layer_fwd(x, shift, scale, weight, bias, patch_size: int, out_channels: int, eps: float, out=None,
                    rms: bool = False, norm_weight=None):
    """x [B, L, D] -> [B, out_channels, H, W] in weight's dtype (h is rounded to it before the GEMM).

    rms: RMSNorm (LightningDiT's) instead of LayerNorm; norm_weight: the norm's gain [D] or None; shift None:
    scale-only adaLN (see the module notes)."""
    modes = _modes(shift, norm_weight, rms)
    x = _x_rows(x)
    scale = _x_rows(scale)
    shift = scale if shift is None else _x_rows(shift)  # a stand-in pointer without SHIFT, never read
    B, L, D = x.shape
    p, C = patch_size, out_channels
    NF = p * p * C
    Hg = Wg = math.isqrt(L)
    if Hg * Wg != L:
        raise ValueError(f"x must have a square number of tokens L (a square patch grid), got L={L}")
    shape = (B, C, Hg * p, Wg * p)
    if out is None:
        out = torch.empty(shape, device=x.device, dtype=weight.dtype)
    if out.shape != shape or not out.is_contiguous() or out.dtype != weight.dtype:
        raise ValueError(f"out must be a contiguous {tuple(shape)} tensor of dtype {weight.dtype}, "
                         f"got {tuple(out.shape)} {out.dtype} (contiguous={out.is_contiguous()})")
    if B == 0 or L == 0:
        return out
    weight = weight.contiguous()
    BM, BK, BF, warps = _blocks(B, L, D, NF, x.element_size(), x.is_cuda)
    grid = (triton.cdiv(NF, BF), triton.cdiv(L, BM), B)
    _final_layer_fwd_kernel[grid](
        x, shift, scale, _gain(norm_weight, scale), weight, bias.contiguous() if bias is not None else weight, out,
        L, D, NF, Wg, C,
        x.stride(0), x.stride(1), shift.stride(0), scale.stride(0),
        eps,
        HAS_BIAS=bias is not None, P=p, BM=BM, BK=BK, BF=BF, INTERPRET=interpreting(), num_warps=warps,
        **modes,
    )
    return out


def _gain(norm_weight, stand_in):
    """The gain's pointer: norm_weight, contiguous, or a stand-in the kernel never reads."""
    return stand_in if norm_weight is None else norm_weight.contiguous()


def gather_tokens(dout, patch_size: int, out_channels: int):
    """[N, C, H, W] -> token-major [N, L, p*p*C] with features in (i, j, c) order (patchify of the output)."""
    N, C, H, W = dout.shape
    p = patch_size
    t = dout.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
    return t.reshape(N, (H // p) * (W // p), p * p * C)


def final_layer_bwd(dout, x, shift, scale, weight, patch_size: int, out_channels: int, eps: float,
                    need_weight: bool = True, dx_out=None, rms: bool = False, norm_weight=None):
    """(dx, dshift, dscale, dweight, dbias, dnorm_weight) of final_layer; dweight/dbias None when not
    need_weight, dshift None without a shift, dnorm_weight None without a gain (rms, norm_weight, shift as in
    final_layer_fwd).

    dx has x's dtype; dshift/dscale have shift's/scale's; dweight/dbias have weight's; dnorm_weight norm_weight's.
    """
    modes = _modes(shift, norm_weight, rms)
    x = _x_rows(x)
    scale = _x_rows(scale)
    has_shift = shift is not None
    shift = _x_rows(shift) if has_shift else scale  # a stand-in pointer without SHIFT, never read
    B, L, D = x.shape
    NF = patch_size * patch_size * out_channels
    weight = weight.contiguous()
    dy = gather_tokens(dout, patch_size, out_channels).contiguous()  # [B, L, NF]
    dx = dx_out if dx_out is not None else torch.empty_like(x, memory_format=torch.contiguous_format)
    if dx.shape != x.shape or not dx.is_contiguous() or dx.dtype != x.dtype:
        raise ValueError(f"dx_out must be a contiguous {tuple(x.shape)} tensor of dtype {x.dtype}, "
                         f"got {tuple(dx.shape)} {dx.dtype} (contiguous={dx.is_contiguous()})")
    BM, BK, BF, warps = _blocks(B, L, D, NF, x.element_size(), x.is_cuda)
    n_mb = triton.cdiv(L, BM)
    # partial sums per (image, row block): [d(shift)], d(scale), [d(gain)]; d(gain) is also summed over images
    dtypes = ((shift.dtype,) if has_shift else ()) + (scale.dtype,)
    if norm_weight is not None:
        dtypes += (norm_weight.dtype,)
    totals = (False,) * (len(dtypes) - 1) + (norm_weight is not None,)
    part = torch.empty((B, n_mb, len(dtypes), D), device=x.device, dtype=torch.float32)
    h = torch.empty((B, L, D), device=x.device, dtype=weight.dtype) if need_weight else dx
    if B and L:
        _final_layer_bwd_kernel[(n_mb, B)](
            x, shift, scale, _gain(norm_weight, scale), weight, dy,
            dx, h, part,
            L, D, NF, n_mb,
            x.stride(0), x.stride(1), shift.stride(0), scale.stride(0),
            eps,
            STORE_H=need_weight, BM=BM, BK=BK, BF=BF, N_FT=triton.cdiv(NF, BF), INTERPRET=interpreting(),
            K=len(dtypes), num_warps=warps, **modes,
        )
        sums = sum_partials(part, dtypes, totals)
    else:
        sums = [torch.zeros((D,) if tot else (B, D), device=x.device, dtype=dt) for dt, tot in zip(dtypes, totals)]
    dshift = sums.pop(0) if has_shift else None
    dscale = sums.pop(0)
    dnorm_weight = sums.pop(0) if norm_weight is not None else None
    dweight = dbias = None
    if need_weight:
        dy2 = dy.reshape(B * L, NF).to(weight.dtype)
        dweight = dy2.t() @ h.reshape(B * L, D)
        dbias = dy2.sum(0, dtype=torch.float32).to(weight.dtype)
    return dx, dshift, dscale, dweight, dbias, dnorm_weight
