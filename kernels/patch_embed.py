"""Patch embedding: patchify + GEMM + bias + pos_embed in one Triton kernel, and its backward.

Forward: out[n*T + t, d] = sum_k patches[n, t, k] * W[d, k] + bias[d] + pos[t, d], with
patches[n, t, (c, i, j)] = x[n, c, gh*p + i, gw*p + j] (t = gh * Wg + gw). The GEMM's A operand is
gathered straight from the NCHW image, so the patchified copy never exists; bias and pos_embed are
added in the epilogue in float32 and the result is rounded once. K = C*p*p is small (16 for DiT-XL/2):
the kernel is bound by writing out [M, D], so one K step and wide D tiles are enough.

Backward (torch, on a patchified copy): the patchified copy is [M, K] with K << D (16 vs 1152), ~1.4% of
d(out)'s bytes, so materializing it costs nothing measurable, and cuBLAS's deterministic GEMMs then give
d(weight) and, through a ones column appended to the patches, d(bias) in the same pass over d(out).
d(x) = d(out) @ W (a [M, D] x [D, K] GEMM) is unpatchified back to NCHW by a permute copy of K-sized rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cast_for, dot_acc, interpreting


@triton.jit
def _patch_embed_fwd_kernel(
    x_ptr, w_ptr, b_ptr, pos_ptr, out_ptr,
    M, T, D, K, Wg,
    sxn, sxc, sxh, sxw,
    swd, swk,
    spt, spd,
    HAS_BIAS: tl.constexpr, P: tl.constexpr,
    BM: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    cols = pid_d * BD + tl.arange(0, BD)
    rmask = rows < M
    dmask = cols < D
    n = rows // T
    t = rows % T
    gh = t // Wg
    gw = t % Wg
    row_base = n * sxn + (gh * P) * sxh + (gw * P) * sxw  # int64: top-left pixel of each row's patch

    acc = tl.zeros((BM, BD), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < K
        c = ks // (P * P)
        i = (ks // P) % P
        j = ks % P
        k_off = c * sxc + i * sxh + j * sxw
        a = tl.load(x_ptr + row_base[:, None] + k_off[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * swd + ks[:, None] * swk, mask=kmask[:, None] & dmask[None, :], other=0.0)
        acc += dot_acc(a, w, INTERPRET)

    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=dmask, other=0.0).to(tl.float32)[None, :]
    omask = rmask[:, None] & dmask[None, :]
    acc += tl.load(pos_ptr + t[:, None] * spt + cols[None, :] * spd, mask=omask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], cast_for(acc, out_ptr, INTERPRET), mask=omask)


def _blocks(M: int, D: int, K: int, on_gpu: bool):
    BK = 16 if K <= 16 else 32
    if on_gpu:
        return 64, 128, BK, 4
    # Interpreter: few, large programs are what make it fast.
    return 64, min(256, max(16, triton.next_power_of_2(D))), BK, 4


def patch_embed_fwd(x, weight, bias, pos_embed, patch_size: int, out_dtype=None, out=None):
    """x [N, C, H, W], weight [D, C, p, p] (or [D, C*p*p]), bias [D] or None, pos_embed [1, T, D].

    Returns [N, T, D] in out_dtype (default: x's dtype promoted with pos_embed's). weight and bias are used
    in x's dtype (the caller casts them, see dit_fast.ops.triton_embed).
    """
    N, C, H, W = x.shape
    p = patch_size
    D = weight.shape[0]
    K = C * p * p
    Hg, Wg = H // p, W // p
    T = Hg * Wg
    M = N * T
    w2d = weight.reshape(D, K)
    if out_dtype is None:
        out_dtype = torch.promote_types(x.dtype, pos_embed.dtype)
    if out is None:
        out = torch.empty((N, T, D), device=x.device, dtype=out_dtype)
    assert out.shape == (N, T, D) and out.is_contiguous() and out.dtype == out_dtype, "bad out buffer"
    if M == 0 or D == 0:
        return out
    pos = pos_embed.reshape(T, D)
    BM, BD, BK, warps = _blocks(M, D, K, x.is_cuda)
    grid = (triton.cdiv(M, BM), triton.cdiv(D, BD))
    _patch_embed_fwd_kernel[grid](
        x, w2d, bias.contiguous() if bias is not None else w2d, pos, out,
        M, T, D, K, Wg,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        w2d.stride(0), w2d.stride(1),
        pos.stride(0), pos.stride(1),
        HAS_BIAS=bias is not None, P=p, BM=BM, BD=BD, BK=BK, INTERPRET=interpreting(), num_warps=warps,
    )
    return out


def _patchify(x, p: int):
    N, C, H, W = x.shape
    return x.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(N * (H // p) * (W // p), C * p * p)


def _unpatchify_input(patches, shape, p: int):
    """Inverse of _patchify: [M, C*p*p] -> [N, C, H, W]."""
    N, C, H, W = shape
    return patches.reshape(N, H // p, W // p, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(N, C, H, W)


def patch_embed_bwd(dout, x, weight, patch_size: int, need_x: bool, need_weight: bool, need_bias: bool, need_pos: bool):
    """(dx, dweight, dbias, dpos) for out = patch_embed(x, weight, bias, pos_embed); None where not needed.

    Gradients come back in the dtypes of x / weight / weight / dout (the caller casts where those differ).
    """
    N, C, H, W = x.shape
    p = patch_size
    D = weight.shape[0]
    K = C * p * p
    g = dout.reshape(-1, D)
    if g.dtype != x.dtype:  # out was promoted by pos_embed's dtype; the GEMM ran in x's dtype
        g = g.to(x.dtype)
    dx = dweight = dbias = dpos = None
    if need_weight or need_bias:
        # Patches padded to a multiple of 8 columns (16-byte rows for cuBLAS); column K holds ones so the
        # same GEMM's column K is sum over rows of d(out) = d(bias).
        kpad = (K + 1 + 7) // 8 * 8
        aug = torch.zeros((g.shape[0], kpad), device=x.device, dtype=x.dtype)
        aug[:, :K] = _patchify(x, p)
        aug[:, K] = 1
        dw_aug = g.t() @ aug  # [D, kpad]
        if need_weight:
            dweight = dw_aug[:, :K].reshape(weight.shape).to(weight.dtype)
        if need_bias:
            dbias = dw_aug[:, K].contiguous()
    if need_x:
        dx = _unpatchify_input(g @ weight.reshape(D, K).to(g.dtype), x.shape, p)
    if need_pos:
        dpos = dout.sum(0, keepdim=True, dtype=torch.float32)
    return dx, dweight, dbias, dpos
