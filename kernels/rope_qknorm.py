"""QKV preparation for LightningDiT's attention: per-head QK-norm and 2D RoPE on q and k, in one pass over
the QKV GEMM's output, forward and backward, as Triton kernels.

qkv [B, L, 3*D] holds q | k | v, each [H, Dh] per token (D = H * Dh). For q and k, per token and head:
    n   = xhat * gain (+ bias),  xhat = x * rsqrt(mean(x^2) + eps)     (NORM, "rms": RMSNorm; else n = x)
                                 xhat = (x - mean(x)) * rsqrt(var(x) + eps)   ("layer": LayerNorm)
    out = n * cos[l] + rotate_half(n) * sin[l]               (ROPE; else out = n)
rotate_half acts on interleaved pairs (EVA's VisionRotaryEmbeddingFast): rotate_half(n)[2i] = -n[2i+1],
rotate_half(n)[2i+1] = n[2i], i.e. rotate_half(n)[d] = sign(d) * n[d ^ 1] with sign -1 for even d, +1 for
odd d. The partner element n[d ^ 1] is read by a second load at the xor-ed offsets (the same cache lines).
cos and sin [L, Dh] are shared by every head and every sample.

Backward, with go the gradient of out:
    dn[d] = go[d] cos[d] - sign(d) go[d ^ 1] sin[d ^ 1]                (the transpose of the rotation)
    d(gain)[d] = sum over tokens and heads of dn[d] xhat[d],  d(bias)[d] = the same sum of dn[d]
    dx = rstd (dn * gain - xhat * mean(dn * gain * xhat) [- mean(dn * gain) for "layer"])
rstd is recomputed from x (which the backward reads anyway) instead of being saved. The backward writes the
whole packed d(qkv) [B, L, 3*D]: the q and k thirds from the formulas above, the v third copied from d(v)
(or zeros without one), so the QKV GEMM's backward gets one tensor with no further pass. d(gain), d(bias) come as
per-program partial sums added in a fixed order (deterministic, no atomics).

Math in float32 whatever the storage dtypes (gains, cos and sin are read as they are stored), one rounding
on store. q and k are written as [B, L, H, Dh] (contiguous): `.transpose(1, 2)` gives the [B, H, L, Dh]
views SDPA takes, and FlashAttention takes [B, L, H, Dh] as is.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cast_for, empty, interpreting, n_sm


@triton.jit
def _load_rows(ptr, base, h, d, Dh, m):
    return tl.load(ptr + base + h[:, None] * Dh + d[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _normalize(x, m, Dh, eps, LAYER: tl.constexpr):
    """(x centered (LAYER) or x, the row mean (LAYER only), rstd) per row of a [BH, BD] tile."""
    if LAYER:
        mean = tl.sum(x, axis=1) / Dh
        x = tl.where(m, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / Dh + eps)
    if not LAYER:
        mean = rstd  # a placeholder: RMSNorm has no mean, and nothing reads it without LAYER
    return x, mean, rstd


@triton.jit
def _affine(xhat, w_ptr, b_ptr, offs, dmask, HAS_BIAS: tl.constexpr):
    n = xhat * tl.load(w_ptr + offs, mask=dmask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        n += tl.load(b_ptr + offs, mask=dmask, other=0.0).to(tl.float32)[None, :]
    return n


@triton.jit
def _head_tile(H, Dh, BH: tl.constexpr, BD: tl.constexpr):
    """A token's [BH, BD] tile of heads x head dims: head and dim indices, each dim's pair partner d ^ 1, the
    dims' mask and the tile's (heads < H, dims < Dh)."""
    h = tl.arange(0, BH)
    d = tl.arange(0, BD)
    dp = d ^ 1
    dmask = d < Dh
    return h, d, dp, dmask, (h < H)[:, None] & dmask[None, :]


@triton.jit
def _token(t, T, L, stride_b, stride_l, hm, d, dp, dmask, cos_ptr, sin_ptr, Dh, ROPE: tl.constexpr,
           TRANSPOSE: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr):
    """Token t's tile mask (off past the T tokens), batch element b, position pos (its cos/sin row) and
    offset in qkv (of its q third), and the rotation's coefficients at pos: cos[d] and the signed sine that
    multiplies the partner element, sign(d) sin[d] (sign -1 for even d), or with TRANSPOSE (the backward)
    -sign(d) sin[dp] (dp = d ^ 1); zeros without ROPE (never read)."""
    m = hm & ((tl.zeros((BH, BD), dtype=tl.int64) + t) < T)  # a tensor mask (the interpreter wants one)
    b = t // L
    pos = t - b * L
    base = b * stride_b + pos * stride_l
    cos = tl.zeros((BD,), dtype=tl.float32)
    sin_signed = cos
    if ROPE:
        lm = dmask & ((tl.zeros((BD,), dtype=tl.int64) + t) < T)
        cos = tl.load(cos_ptr + pos * Dh + d, mask=lm, other=0.0).to(tl.float32)
        if TRANSPOSE:
            sinp = tl.load(sin_ptr + pos * Dh + dp, mask=lm, other=0.0).to(tl.float32)
            sin_signed = tl.where((d & 1) == 0, sinp, -sinp)
        else:
            sin = tl.load(sin_ptr + pos * Dh + d, mask=lm, other=0.0).to(tl.float32)
            sin_signed = tl.where((d & 1) == 0, -sin, sin)
    return m, b, pos, base, cos, sin_signed


@triton.jit
def _fwd_part(x_ptr, base, out_ptr, out_base, gain_ptr, bias_ptr, cos, sin_signed, h, d, dp, dmask, m, Dh, eps,
              NORM: tl.constexpr, LAYER: tl.constexpr, HAS_BIAS: tl.constexpr, ROPE: tl.constexpr,
              INTERPRET: tl.constexpr):
    x = _load_rows(x_ptr, base, h, d, Dh, m)
    if NORM:
        xc, mean, rstd = _normalize(x, m, Dh, eps, LAYER)
        n = _affine(xc * rstd[:, None], gain_ptr, bias_ptr, d, dmask, HAS_BIAS)
    else:
        n = x
    if ROPE:
        xp = _load_rows(x_ptr, base, h, dp, Dh, m)
        if NORM:
            if LAYER:
                xp -= mean[:, None]
            xp = _affine(xp * rstd[:, None], gain_ptr, bias_ptr, dp, dmask, HAS_BIAS)
        n = n * cos[None, :] + xp * sin_signed[None, :]
    tl.store(out_ptr + out_base + h[:, None] * Dh + d[None, :], cast_for(n, out_ptr, INTERPRET), mask=m)


@triton.jit
def _qk_norm_rope_fwd_kernel(
    qkv_ptr, q_gain_ptr, k_gain_ptr, q_bias_ptr, k_bias_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr,
    T, L, H, Dh, stride_b, stride_l, eps, tokens_per_prog,
    NORM: tl.constexpr, LAYER: tl.constexpr, HAS_BIAS: tl.constexpr, ROPE: tl.constexpr,
    BH: tl.constexpr, BD: tl.constexpr, INTERPRET: tl.constexpr,
):
    h, d, dp, dmask, hm = _head_tile(H, Dh, BH, BD)
    D = H * Dh
    t0 = tl.program_id(0).to(tl.int64) * tokens_per_prog
    for i in range(0, tokens_per_prog):
        t = t0 + i
        m, b, pos, base, cos, sin_signed = _token(t, T, L, stride_b, stride_l, hm, d, dp, dmask, cos_ptr, sin_ptr, Dh,
                                                  ROPE, False, BH, BD)
        _fwd_part(qkv_ptr, base, q_ptr, t * D, q_gain_ptr, q_bias_ptr, cos, sin_signed, h, d, dp, dmask, m, Dh, eps,
                  NORM, LAYER, HAS_BIAS, ROPE, INTERPRET)
        _fwd_part(qkv_ptr, base + D, k_ptr, t * D, k_gain_ptr, k_bias_ptr, cos, sin_signed, h, d, dp, dmask, m, Dh,
                  eps, NORM, LAYER, HAS_BIAS, ROPE, INTERPRET)


@triton.jit
def _bwd_part(go_ptr, go_base, go_sh, x_ptr, x_base, dx_ptr, dx_base, gain_ptr, cos, sinp_signed,
              gain_acc, bias_acc, h, d, dp, dmask, m, Dh, eps,
              NORM: tl.constexpr, LAYER: tl.constexpr, ROPE: tl.constexpr, INTERPRET: tl.constexpr):
    go_offs = go_ptr + go_base + h[:, None] * go_sh
    dn = tl.load(go_offs + d[None, :], mask=m, other=0.0).to(tl.float32)
    if ROPE:
        gop = tl.load(go_offs + dp[None, :], mask=m, other=0.0).to(tl.float32)
        dn = dn * cos[None, :] + gop * sinp_signed[None, :]
    if NORM:
        xc, mean, rstd = _normalize(_load_rows(x_ptr, x_base, h, d, Dh, m), m, Dh, eps, LAYER)
        # padding rows (heads >= H, tokens >= T) are all zeros: with eps = 0 their rstd is inf and 0 * inf NaN,
        # which must not reach the column sums
        xhat = tl.where(m, xc * rstd[:, None], 0.0)
        gain_acc += tl.sum(dn * xhat, axis=0)
        bias_acc += tl.sum(dn, axis=0)
        dxhat = dn * tl.load(gain_ptr + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        proj = xhat * (tl.sum(dxhat * xhat, axis=1) / Dh)[:, None]
        if LAYER:
            proj += (tl.sum(dxhat, axis=1) / Dh)[:, None]
        dx = rstd[:, None] * (dxhat - proj)
    else:
        dx = dn
    tl.store(dx_ptr + dx_base + h[:, None] * Dh + d[None, :], cast_for(dx, dx_ptr, INTERPRET), mask=m)
    return gain_acc, bias_acc


@triton.jit
def _qk_norm_rope_bwd_kernel(
    dq_ptr, dk_ptr, dv_ptr, qkv_ptr, q_gain_ptr, k_gain_ptr, cos_ptr, sin_ptr, dqkv_ptr, part_ptr,
    T, L, H, Dh, stride_b, stride_l, dq_sb, dq_sl, dq_sh, dk_sb, dk_sl, dk_sh, dv_sb, dv_sl, dv_sh,
    eps, tokens_per_prog,
    NORM: tl.constexpr, LAYER: tl.constexpr, ROPE: tl.constexpr, HAS_DV: tl.constexpr, N_PART: tl.constexpr,
    BH: tl.constexpr, BD: tl.constexpr, INTERPRET: tl.constexpr,
):
    """N_PART: 0 (no parameter gradients), 2 (the gains', part[prog] = [dq_gain, dk_gain]) or 4 (and the
    biases', [dq_gain, dk_gain, dq_bias, dk_bias]); per-program partial sums over its tokens."""
    h, d, dp, dmask, hm = _head_tile(H, Dh, BH, BD)
    D = H * Dh
    acc_qg = tl.zeros((BD,), dtype=tl.float32)
    acc_kg = acc_qg
    acc_qb = acc_qg
    acc_kb = acc_qg
    pid = tl.program_id(0)
    t0 = pid.to(tl.int64) * tokens_per_prog
    for i in range(0, tokens_per_prog):
        t = t0 + i
        m, b, pos, x_base, cos, sinp_signed = _token(t, T, L, stride_b, stride_l, hm, d, dp, dmask, cos_ptr, sin_ptr,
                                                     Dh, ROPE, True, BH, BD)
        acc_qg, acc_qb = _bwd_part(dq_ptr, b * dq_sb + pos * dq_sl, dq_sh, qkv_ptr, x_base, dqkv_ptr, t * 3 * D,
                                   q_gain_ptr, cos, sinp_signed, acc_qg, acc_qb, h, d, dp, dmask, m, Dh, eps,
                                   NORM, LAYER, ROPE, INTERPRET)
        acc_kg, acc_kb = _bwd_part(dk_ptr, b * dk_sb + pos * dk_sl, dk_sh, qkv_ptr, x_base + D, dqkv_ptr,
                                   t * 3 * D + D, k_gain_ptr, cos, sinp_signed, acc_kg, acc_kb, h, d, dp, dmask, m,
                                   Dh, eps, NORM, LAYER, ROPE, INTERPRET)
        if HAS_DV:
            dv = tl.load(dv_ptr + b * dv_sb + pos * dv_sl + h[:, None] * dv_sh + d[None, :], mask=m, other=0.0)
        else:
            dv = tl.zeros((BH, BD), dtype=tl.float32)
        v_offs = t * 3 * D + 2 * D + h[:, None] * Dh + d[None, :]
        tl.store(dqkv_ptr + v_offs, dv.to(dqkv_ptr.dtype.element_ty), mask=m)
    if N_PART > 0:
        row = part_ptr + pid * N_PART * Dh + d
        tl.store(row, acc_qg, mask=dmask)
        tl.store(row + Dh, acc_kg, mask=dmask)
    if N_PART > 2:
        tl.store(row + 2 * Dh, acc_qb, mask=dmask)
        tl.store(row + 3 * Dh, acc_kb, mask=dmask)


def _tiles(T: int, H: int, Dh: int, device: torch.device, backward: bool):
    BH, BD = triton.next_power_of_2(H), triton.next_power_of_2(Dh)
    # The backward's token loop keeps many [BH, BD] tiles live (64-bit pointers included): 8 elements per thread
    # keep it clear of spills on sm_90 (scripts/check_triton_compile.py, 16 heads of 72: 4 warps spilled up to
    # 160 B; 8 warps: no spill, up to 255 registers; 16 warps: capped at 128 registers, an 8 B spill).
    # Small backward tiles (DiT-S: 8 x 64) take 2 warps, 8 elements per thread as well: with 4, ptxas on sm_80
    # put 8 B on the stack for the bf16 variant without RoPE (the compile check fails a spill on a hot path).
    warps = min(16, max(2 if backward else 4, BH * BD // (256 if backward else 512)))
    if device.type == "cuda":
        # forward: one token per program; backward: a few programs per SM (each writes d(gain) partials)
        n_prog = min(T, 4 * n_sm(device)) if backward else T
    else:
        n_prog = min(T, 4)  # interpreter: few large programs
    per_prog = triton.cdiv(T, n_prog)
    return BH, BD, warps, triton.cdiv(T, per_prog), per_prog


def _qkv_strides(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, int, int, int]:
    if qkv.dim() != 3 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"qkv must have shape [B, L, 3 * num_heads * head_dim], got {list(qkv.shape)}")
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    return qkv, qkv.shape[-1] // (3 * num_heads), qkv.stride(0), qkv.stride(1)


NORMS = ("rms", "layer")


def _flags(q_gain, k_gain, cos, sin, q_bias, k_bias, norm: str, Dh: int):
    """(NORM, LAYER, HAS_BIAS, ROPE) of a call, its optional arguments checked for consistency."""
    has_norm = q_gain is not None
    rope = cos is not None
    has_bias = q_bias is not None
    if (k_gain is not None) != has_norm or (sin is not None) != rope or (k_bias is not None) != has_bias:
        raise ValueError("q_gain and k_gain come together (both or neither), and so do cos and sin, q_bias and k_bias")
    if has_bias and not has_norm:
        raise ValueError("q_bias and k_bias are the norms' biases: they need the gains (the norms) too")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if rope and Dh % 2:
        raise ValueError(f"RoPE rotates pairs: head_dim must be even, got {Dh}")
    return has_norm, has_norm and norm == "layer", has_bias, rope


def _contig(t: torch.Tensor | None, stand_in: torch.Tensor) -> torch.Tensor:
    return stand_in if t is None else t.contiguous()  # stand-in pointers are never read (flags off)


def qk_norm_rope_fwd(qkv, num_heads: int, q_gain=None, k_gain=None, eps: float = 1e-6, cos=None, sin=None,
                     q_bias=None, k_bias=None, norm: str = "rms"):
    """(q, k), each [B, L, H, Dh] contiguous in qkv's dtype; see the module notes. gains, biases: [Dh] or None;
    cos, sin: [L, Dh] or None; norm: "rms" or "layer" (LayerNorm with an affine gain and bias)."""
    qkv, Dh, sb, sl = _qkv_strides(qkv, num_heads)
    has_norm, layer, has_bias, rope = _flags(q_gain, k_gain, cos, sin, q_bias, k_bias, norm, Dh)
    B, L, _ = qkv.shape
    H, T = num_heads, B * L
    q = empty((B, L, H, Dh), qkv.dtype, qkv.device)
    k = empty((B, L, H, Dh), qkv.dtype, qkv.device)
    if T == 0:
        return q, k
    BH, BD, warps, n_prog, per_prog = _tiles(T, H, Dh, qkv.device, backward=False)
    _qk_norm_rope_fwd_kernel[(n_prog,)](
        qkv, _contig(q_gain, qkv), _contig(k_gain, qkv), _contig(q_bias, qkv), _contig(k_bias, qkv),
        _contig(cos, qkv), _contig(sin, qkv), q, k, T, L, H, Dh, sb, sl, float(eps), per_prog,
        NORM=has_norm, LAYER=layer, HAS_BIAS=has_bias, ROPE=rope, BH=BH, BD=BD, INTERPRET=interpreting(),
        num_warps=warps,
    )
    return q, k


def _grad_strides(g: torch.Tensor | None, shape, name: str) -> tuple[torch.Tensor | None, tuple[int, int, int]]:
    """g as a [B, L, H, Dh] tensor with a unit last stride, and its (b, l, h) strides."""
    if g is None:
        return None, (0, 0, 0)
    if tuple(g.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape [B, L, H, Dh] = {list(shape)}, got {list(g.shape)}")
    if g.stride(-1) != 1:
        g = g.contiguous()
    return g, (g.stride(0), g.stride(1), g.stride(2))


def qk_norm_rope_bwd(dq, dk, dv, qkv, num_heads: int, q_gain=None, k_gain=None, eps: float = 1e-6, cos=None,
                     sin=None, q_bias=None, k_bias=None, norm: str = "rms", need_param_grad: bool = False):
    """(d(qkv) [B, L, 3*D] in qkv's dtype, d(norm parameters) float32 or None).

    dq, dk, dv: gradients of q, k, v as [B, L, H, Dh] tensors of any strides with a unit last stride
    (dq or dk None: zero; dv None: the v third of d(qkv) is zeros). The parameter gradients, only when
    need_param_grad and the gains are given: [2, Dh] (d(q_gain), d(k_gain)), or [4, Dh] with the biases
    (d(q_gain), d(k_gain), d(q_bias), d(k_bias)). The biases' values are not read (only whether they exist)."""
    qkv, Dh, sb, sl = _qkv_strides(qkv, num_heads)
    has_norm, layer, has_bias, rope = _flags(q_gain, k_gain, cos, sin, q_bias, k_bias, norm, Dh)
    B, L, _ = qkv.shape
    H, T = num_heads, B * L
    shape = (B, L, H, Dh)
    dq = torch.zeros(shape, dtype=qkv.dtype, device=qkv.device) if dq is None else dq
    dk = torch.zeros(shape, dtype=qkv.dtype, device=qkv.device) if dk is None else dk
    dq, dq_s = _grad_strides(dq, shape, "dq")
    dk, dk_s = _grad_strides(dk, shape, "dk")
    dv, dv_s = _grad_strides(dv, shape, "dv")
    n_part = (4 if has_bias else 2) if need_param_grad and has_norm else 0
    dqkv = empty((B, L, 3 * H * Dh), qkv.dtype, qkv.device)
    if T == 0:
        return dqkv, (torch.zeros(n_part, Dh, device=qkv.device, dtype=torch.float32) if n_part else None)
    BH, BD, warps, n_prog, per_prog = _tiles(T, H, Dh, qkv.device, backward=True)
    part = empty((n_prog, n_part, Dh), torch.float32, qkv.device) if n_part else dqkv
    _qk_norm_rope_bwd_kernel[(n_prog,)](
        dq, dk, dv if dv is not None else dq, qkv, _contig(q_gain, qkv), _contig(k_gain, qkv),
        _contig(cos, qkv), _contig(sin, qkv), dqkv, part,
        T, L, H, Dh, sb, sl, *dq_s, *dk_s, *dv_s, float(eps), per_prog,
        NORM=has_norm, LAYER=layer, ROPE=rope, HAS_DV=dv is not None, N_PART=n_part,
        BH=BH, BD=BD, INTERPRET=interpreting(), num_warps=warps,
    )
    return dqkv, (part.sum(0) if n_part else None)
