"""Fused adaLN kernels: LayerNorm (no affine) + modulate, gated residual, and both in one pass.

Shapes: x, y, h, x_out: [B, L, D] with unit stride along D (any strides over B and L; the
launchers copy a tensor only when its last dim is not contiguous); shift, scale, gate: [B, D]
with unit stride along D (chunks of the model's [B, 6D] modulation tensor run without copies).
Math is done in float32 (float64 when any input is float64) whatever the input dtypes; each
output is stored in its own dtype (h: h_dtype or x.dtype, x_out: x.dtype, grads: their input's).

Row statistics are two-pass with a refinement (see _centre), accurate for rows far from zero;
the backward recomputes that refinement from the saved mean, so saved float32 means lose nothing.

Forward kernels give each program a [BLOCK_R, BLOCK_D] tile: BLOCK_R rows of one batch element,
BLOCK_D = next_power_of_2(D) columns, masked. Several rows per program keep small D efficient.

Backward kernels must reduce over L for dshift/dscale/dgate ([B, D] each). They do it
DETERMINISTICALLY, without atomics: each program walks a fixed chunk of rows of one batch
element, accumulates in registers, and writes its partial sums to a [B, n_chunks, D] buffer
in the compute dtype; _sum_chunks_kernel then adds the chunks in a fixed order and casts.
Two backward runs therefore give bitwise identical results (on any grid size the launcher picks
for a given shape and GPU).

Launchers allocate every buffer through _empty(); inside `poison_outputs()` those buffers start
NaN-filled, so tests can prove every element is written.

The Triton interpreter (TRITON_INTERPRET=1, CPU tensors) truncates float32 -> bfloat16 where
GPUs round to nearest even; the launchers then pass ROUND_BF16 so results match (common.cast_for).
"""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from .common import cast_for, interpreting

# Elements per program tile: 8 per thread at 8 warps, one 16-byte load per bf16 tensor.
_TILE_ELEMS = 2048
# Backward: rows per program at most (longer chunks shrink the partial-sum buffers but cut
# parallelism) and programs wanted per SM.
_MAX_CHUNK_ROWS = 64
_PROGRAMS_PER_SM = 8

_poison = False


@contextlib.contextmanager
def poison_outputs():
    """Test hook: buffers allocated by the launchers inside this block are NaN-filled first."""
    global _poison
    old, _poison = _poison, True
    try:
        yield
    finally:
        _poison = old


def _empty(shape, dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if _poison and t.is_floating_point():
        t.fill_(float("nan"))
    return t


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _tl(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """The kernels index rows by strides but need unit stride along D."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _tile(D: int, L: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps) for rows of D elements."""
    block_d = triton.next_power_of_2(D)
    block_r = max(1, min(_TILE_ELEMS // block_d, triton.next_power_of_2(L)))
    num_warps = min(max(block_r * block_d // 256, 1), 8)
    return block_r, block_d, num_warps


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _chunking(B: int, L: int, block_r: int, device: torch.device) -> tuple[int, int]:
    """(rows per program, chunks per batch element) for the backward kernels; rows is a multiple of block_r."""
    n_sm = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else 4
    want = triton.cdiv(B * L, _PROGRAMS_PER_SM * n_sm)
    rows = min(max(want, block_r), max(_MAX_CHUNK_ROWS, block_r))
    rows = triton.cdiv(rows, block_r) * block_r
    n_chunks = triton.cdiv(L, rows)
    rows = triton.cdiv(triton.cdiv(L, n_chunks), block_r) * block_r  # even out the last chunk
    return rows, n_chunks


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(base_ptr, rows64, row_stride, cols, mask, COMPUTE: tl.constexpr):
    """A [BLOCK_R, BLOCK_D] tile of rows of a [B, L, D] tensor (base_ptr: its batch element), in COMPUTE."""
    return tl.load(base_ptr + rows64[:, None] * row_stride + cols[None, :], mask=mask, other=0.0).to(COMPUTE)


@triton.jit
def _load_vec(base_ptr, cols, cmask, COMPUTE: tl.constexpr):
    """One batch element's [D] modulation vector (shift, scale or gate), in COMPUTE."""
    return tl.load(base_ptr + cols, mask=cmask, other=0.0).to(COMPUTE)


@triton.jit
def _store_rows(ptr, row_idx, D, cols, v, mask, ROUND_BF16: tl.constexpr):
    """Store a tile into rows row_idx of a contiguous [B*L, D] output, rounded to its dtype."""
    tl.store(ptr + row_idx[:, None] * D + cols[None, :], cast_for(v, ptr, ROUND_BF16), mask=mask)


@triton.jit
def _centre(v, mask, mean, D):
    """v - mean, refined by the mean of the residual: one rounded mean of rows far from zero
    (mean 1e4, std 1) is off by ~1e-4 std in float32, the refined centring by ~1e-7."""
    vc = tl.where(mask, v - mean[:, None], 0.0)
    correction = tl.sum(vc, axis=1) / D
    return tl.where(mask, vc - correction[:, None], 0.0), correction


@triton.jit
def _layer_norm_modulate(v, mask, shift, scale, D, eps):
    """Rows of v (masked elements 0) -> (h, mean, rstd); statistics in v's dtype."""
    mean = tl.sum(v, axis=1) / D
    vc, correction = _centre(v, mask, mean, D)
    var = tl.sum(vc * vc, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    h = vc * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
    return h, mean + correction, rstd


@triton.jit
def _normalized(v, mask, mean, rstd, D):
    """xhat from the saved (rounded) mean and rstd, centred as precisely as in the forward."""
    vc, _ = _centre(v, mask, mean, D)
    return vc * rstd[:, None]


@triton.jit
def _layer_norm_modulate_bwd(dh, xhat, rstd, scale, D):
    """dx of h = xhat * (1 + scale) + shift through the normalization, given dh (masked elements 0)."""
    g = dh * (1.0 + scale[None, :])
    mean_g = tl.sum(g, axis=1) / D
    mean_gx = tl.sum(g * xhat, axis=1) / D
    return rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])


@triton.jit
def _adaln_modulate_fwd_kernel(
    x_ptr, shift_ptr, scale_ptr, h_ptr, mean_ptr, rstd_ptr,
    L, D, n_blocks,
    x_sb, x_sl, shift_sb, scale_sb,
    eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // n_blocks).to(tl.int64)
    rows = (pid % n_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < L
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)

    x = _load_rows(x_ptr + b * x_sb, rows64, x_sl, cols, mask, COMPUTE)
    shift = _load_vec(shift_ptr + b * shift_sb, cols, cmask, COMPUTE)
    scale = _load_vec(scale_ptr + b * scale_sb, cols, cmask, COMPUTE)
    h, mean, rstd = _layer_norm_modulate(x, mask, shift, scale, D, eps)

    row_idx = b * L + rows64  # h, mean, rstd are contiguous
    _store_rows(h_ptr, row_idx, D, cols, h, mask, ROUND_BF16)
    tl.store(mean_ptr + row_idx, mean, mask=rmask)
    tl.store(rstd_ptr + row_idx, rstd, mask=rmask)


@triton.jit
def _adaln_modulate_bwd_kernel(
    dh_ptr, x_ptr, scale_ptr, mean_ptr, rstd_ptr, dx_ptr, dshift_part_ptr, dscale_part_ptr,
    L, D, n_chunks, chunk_rows,
    dh_sb, dh_sl, x_sb, x_sl, scale_sb,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // n_chunks).to(tl.int64)
    chunk = pid % n_chunks
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    scale = _load_vec(scale_ptr + b * scale_sb, cols, cmask, COMPUTE)
    acc_dshift = tl.zeros([BLOCK_R, BLOCK_D], dtype=COMPUTE)
    acc_dscale = tl.zeros([BLOCK_R, BLOCK_D], dtype=COMPUTE)
    for r in range(0, chunk_rows, BLOCK_R):
        rows = chunk * chunk_rows + r + tl.arange(0, BLOCK_R)
        rmask = rows < L
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        dh = _load_rows(dh_ptr + b * dh_sb, rows64, dh_sl, cols, mask, COMPUTE)
        x = _load_rows(x_ptr + b * x_sb, rows64, x_sl, cols, mask, COMPUTE)
        row_idx = b * L + rows64
        mean = tl.load(mean_ptr + row_idx, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + row_idx, mask=rmask, other=0.0)
        xhat = _normalized(x, mask, mean, rstd, D)
        acc_dshift += dh
        acc_dscale += dh * xhat
        dx = _layer_norm_modulate_bwd(dh, xhat, rstd, scale, D)
        _store_rows(dx_ptr, row_idx, D, cols, dx, mask, ROUND_BF16)
    part = (b * n_chunks + chunk) * D + cols
    tl.store(dshift_part_ptr + part, tl.sum(acc_dshift, axis=0), mask=cmask)
    tl.store(dscale_part_ptr + part, tl.sum(acc_dscale, axis=0), mask=cmask)


@triton.jit
def _gated_residual_fwd_kernel(
    x_ptr, y_ptr, gate_ptr, out_ptr,
    L, D, n_blocks,
    x_sb, x_sl, y_sb, y_sl, gate_sb,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // n_blocks).to(tl.int64)
    rows = (pid % n_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    mask = (rows < L)[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    x = _load_rows(x_ptr + b * x_sb, rows64, x_sl, cols, mask, COMPUTE)
    y = _load_rows(y_ptr + b * y_sb, rows64, y_sl, cols, mask, COMPUTE)
    gate = _load_vec(gate_ptr + b * gate_sb, cols, cmask, COMPUTE)
    out = x + gate[None, :] * y
    _store_rows(out_ptr, b * L + rows64, D, cols, out, mask, ROUND_BF16)


@triton.jit
def _gated_residual_bwd_kernel(
    dout_ptr, y_ptr, gate_ptr, dy_ptr, dgate_part_ptr,
    L, D, n_chunks, chunk_rows,
    dout_sb, dout_sl, y_sb, y_sl, gate_sb,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // n_chunks).to(tl.int64)
    chunk = pid % n_chunks
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    gate = _load_vec(gate_ptr + b * gate_sb, cols, cmask, COMPUTE)
    acc_dgate = tl.zeros([BLOCK_R, BLOCK_D], dtype=COMPUTE)
    for r in range(0, chunk_rows, BLOCK_R):
        rows = chunk * chunk_rows + r + tl.arange(0, BLOCK_R)
        mask = (rows < L)[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        dout = _load_rows(dout_ptr + b * dout_sb, rows64, dout_sl, cols, mask, COMPUTE)
        y = _load_rows(y_ptr + b * y_sb, rows64, y_sl, cols, mask, COMPUTE)
        acc_dgate += dout * y
        dy = dout * gate[None, :]
        _store_rows(dy_ptr, b * L + rows64, D, cols, dy, mask, ROUND_BF16)
    tl.store(dgate_part_ptr + (b * n_chunks + chunk) * D + cols, tl.sum(acc_dgate, axis=0), mask=cmask)


@triton.jit
def _gated_residual_adaln_fwd_kernel(
    x_ptr, y_ptr, gate_ptr, shift_ptr, scale_ptr, xo_ptr, h_ptr, mean_ptr, rstd_ptr,
    L, D, n_blocks,
    x_sb, x_sl, y_sb, y_sl, gate_sb, shift_sb, scale_sb,
    eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // n_blocks).to(tl.int64)
    rows = (pid % n_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < L
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    x = _load_rows(x_ptr + b * x_sb, rows64, x_sl, cols, mask, COMPUTE)
    y = _load_rows(y_ptr + b * y_sb, rows64, y_sl, cols, mask, COMPUTE)
    gate = _load_vec(gate_ptr + b * gate_sb, cols, cmask, COMPUTE)
    shift = _load_vec(shift_ptr + b * shift_sb, cols, cmask, COMPUTE)
    scale = _load_vec(scale_ptr + b * scale_sb, cols, cmask, COMPUTE)

    # h is normalized from x_out as stored (rounded to x's dtype), as the unfused model does.
    xo = cast_for(x + gate[None, :] * y, xo_ptr, ROUND_BF16)
    h, mean, rstd = _layer_norm_modulate(xo.to(COMPUTE), mask, shift, scale, D, eps)

    row_idx = b * L + rows64
    tl.store(xo_ptr + row_idx[:, None] * D + cols[None, :], xo, mask=mask)
    _store_rows(h_ptr, row_idx, D, cols, h, mask, ROUND_BF16)
    tl.store(mean_ptr + row_idx, mean, mask=rmask)
    tl.store(rstd_ptr + row_idx, rstd, mask=rmask)


@triton.jit
def _gated_residual_adaln_bwd_kernel(
    dxo_ptr, dh_ptr, xo_ptr, y_ptr, gate_ptr, scale_ptr, mean_ptr, rstd_ptr,
    dx_ptr, dy_ptr, dgate_part_ptr, dshift_part_ptr, dscale_part_ptr,
    L, D, n_chunks, chunk_rows,
    dxo_sb, dxo_sl, dh_sb, dh_sl, xo_sb, xo_sl, y_sb, y_sl, gate_sb, scale_sb,
    HAS_DXO: tl.constexpr, HAS_DH: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // n_chunks).to(tl.int64)
    chunk = pid % n_chunks
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    gate = _load_vec(gate_ptr + b * gate_sb, cols, cmask, COMPUTE)
    scale = _load_vec(scale_ptr + b * scale_sb, cols, cmask, COMPUTE)
    acc_dgate = tl.zeros([BLOCK_R, BLOCK_D], dtype=COMPUTE)
    acc_dshift = tl.zeros([BLOCK_R, BLOCK_D], dtype=COMPUTE)
    acc_dscale = tl.zeros([BLOCK_R, BLOCK_D], dtype=COMPUTE)
    for r in range(0, chunk_rows, BLOCK_R):
        rows = chunk * chunk_rows + r + tl.arange(0, BLOCK_R)
        rmask = rows < L
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        row_idx = b * L + rows64
        total = tl.zeros([BLOCK_R, BLOCK_D], dtype=COMPUTE)
        if HAS_DXO:
            dxo = _load_rows(dxo_ptr + b * dxo_sb, rows64, dxo_sl, cols, mask, COMPUTE)
            total += dxo
        if HAS_DH:
            dh = _load_rows(dh_ptr + b * dh_sb, rows64, dh_sl, cols, mask, COMPUTE)
            xo = _load_rows(xo_ptr + b * xo_sb, rows64, xo_sl, cols, mask, COMPUTE)
            mean = tl.load(mean_ptr + row_idx, mask=rmask, other=0.0)
            rstd = tl.load(rstd_ptr + row_idx, mask=rmask, other=0.0)
            xhat = _normalized(xo, mask, mean, rstd, D)
            acc_dshift += dh
            acc_dscale += dh * xhat
            total += _layer_norm_modulate_bwd(dh, xhat, rstd, scale, D)
        y = _load_rows(y_ptr + b * y_sb, rows64, y_sl, cols, mask, COMPUTE)
        acc_dgate += total * y
        _store_rows(dx_ptr, row_idx, D, cols, total, mask, ROUND_BF16)
        _store_rows(dy_ptr, row_idx, D, cols, total * gate[None, :], mask, ROUND_BF16)
    part = (b * n_chunks + chunk) * D + cols
    tl.store(dgate_part_ptr + part, tl.sum(acc_dgate, axis=0), mask=cmask)
    tl.store(dshift_part_ptr + part, tl.sum(acc_dshift, axis=0), mask=cmask)
    tl.store(dscale_part_ptr + part, tl.sum(acc_dscale, axis=0), mask=cmask)


@triton.jit
def _sum_chunks_kernel(part_ptr, out_ptr, n_chunks, D, BLOCK_D: tl.constexpr, ROUND_BF16: tl.constexpr):
    """out[b, :] = sum over c of part[b, c, :], c in increasing order (deterministic)."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    acc = tl.load(part_ptr + b * n_chunks * D + cols, mask=cmask, other=0.0)
    for c in range(1, n_chunks):
        acc += tl.load(part_ptr + (b * n_chunks + c) * D + cols, mask=cmask, other=0.0)
    tl.store(out_ptr + b * D + cols, cast_for(acc, out_ptr, ROUND_BF16), mask=cmask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _rows_strides(t: torch.Tensor) -> tuple[int, int]:
    return t.stride(0), t.stride(1)


def _finish(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, n_chunks, D] partial sums -> [B, D] in dtype: chunks added in a fixed order, one launch."""
    B, n_chunks, D = part.shape
    out = _empty((B, D), dtype, part.device)
    block_d = min(triton.next_power_of_2(D), 1024)
    _sum_chunks_kernel[(B, triton.cdiv(D, block_d))](
        part, out, n_chunks, D, BLOCK_D=block_d, ROUND_BF16=interpreting(), num_warps=4,
    )
    return out


def adaln_modulate_fwd(x, shift, scale, eps: float, h_dtype=None):
    """h = LayerNorm(x) * (1 + scale) + shift; returns (h, mean, rstd), statistics [B, L] in the compute dtype."""
    x, shift, scale = _unit_last(x), _unit_last(shift), _unit_last(scale)
    B, L, D = x.shape
    ct = compute_dtype(x, shift, scale)
    h = _empty((B, L, D), h_dtype or x.dtype, x.device)
    mean = _empty((B, L), ct, x.device)
    rstd = _empty((B, L), ct, x.device)
    if h.numel() == 0:
        return h, mean.zero_(), rstd.zero_()
    block_r, block_d, num_warps = _tile(D, L)
    n_blocks = triton.cdiv(L, block_r)
    _adaln_modulate_fwd_kernel[(B * n_blocks,)](
        x, shift, scale, h, mean, rstd,
        L, D, n_blocks,
        *_rows_strides(x), shift.stride(0), scale.stride(0),
        eps,
        BLOCK_R=block_r, BLOCK_D=block_d, COMPUTE=_tl(ct), ROUND_BF16=interpreting(), num_warps=num_warps,
    )
    return h, mean, rstd


def adaln_modulate_bwd(dh, x, scale, mean, rstd, shift_dtype: torch.dtype):
    """(dx, dshift, dscale) of adaln_modulate given dh; dshift/dscale reduced over L deterministically."""
    dh, x, scale = _unit_last(dh), _unit_last(x), _unit_last(scale)
    B, L, D = x.shape
    ct = mean.dtype
    dx = _empty((B, L, D), x.dtype, x.device)
    if dx.numel() == 0:
        zeros = torch.zeros((B, D), dtype=ct, device=x.device)
        return dx, zeros.to(shift_dtype), zeros.to(scale.dtype)
    block_r, block_d, num_warps = _tile(D, L)
    chunk_rows, n_chunks = _chunking(B, L, block_r, x.device)
    dshift_part = _empty((B, n_chunks, D), ct, x.device)
    dscale_part = _empty((B, n_chunks, D), ct, x.device)
    _adaln_modulate_bwd_kernel[(B * n_chunks,)](
        dh, x, scale, mean, rstd, dx, dshift_part, dscale_part,
        L, D, n_chunks, chunk_rows,
        *_rows_strides(dh), *_rows_strides(x), scale.stride(0),
        BLOCK_R=block_r, BLOCK_D=block_d, COMPUTE=_tl(ct), ROUND_BF16=interpreting(), num_warps=num_warps,
    )
    return dx, _finish(dshift_part, shift_dtype), _finish(dscale_part, scale.dtype)


def gated_residual_fwd(x, y, gate):
    """x + gate * y in x.dtype."""
    x, y, gate = _unit_last(x), _unit_last(y), _unit_last(gate)
    B, L, D = x.shape
    out = _empty((B, L, D), x.dtype, x.device)
    if out.numel() == 0:
        return out
    block_r, block_d, num_warps = _tile(D, L)
    n_blocks = triton.cdiv(L, block_r)
    _gated_residual_fwd_kernel[(B * n_blocks,)](
        x, y, gate, out,
        L, D, n_blocks,
        *_rows_strides(x), *_rows_strides(y), gate.stride(0),
        BLOCK_R=block_r, BLOCK_D=block_d, COMPUTE=_tl(compute_dtype(x, y, gate)), ROUND_BF16=interpreting(), num_warps=num_warps,
    )
    return out


def gated_residual_bwd(dout, y, gate):
    """(dy, dgate) of gated_residual given dout (dx is dout itself, cast to x.dtype by the caller)."""
    dout, y, gate = _unit_last(dout), _unit_last(y), _unit_last(gate)
    B, L, D = y.shape
    ct = compute_dtype(dout, y, gate)
    dy = _empty((B, L, D), y.dtype, y.device)
    if dy.numel() == 0:
        return dy, torch.zeros((B, D), dtype=gate.dtype, device=y.device)
    block_r, block_d, num_warps = _tile(D, L)
    chunk_rows, n_chunks = _chunking(B, L, block_r, y.device)
    dgate_part = _empty((B, n_chunks, D), ct, y.device)
    _gated_residual_bwd_kernel[(B * n_chunks,)](
        dout, y, gate, dy, dgate_part,
        L, D, n_chunks, chunk_rows,
        *_rows_strides(dout), *_rows_strides(y), gate.stride(0),
        BLOCK_R=block_r, BLOCK_D=block_d, COMPUTE=_tl(ct), ROUND_BF16=interpreting(), num_warps=num_warps,
    )
    return dy, _finish(dgate_part, gate.dtype)


def gated_residual_adaln_fwd(x, y, gate, shift, scale, eps: float, h_dtype=None):
    """(x_out, h, mean, rstd): x_out = x + gate * y (x.dtype), h = adaln_modulate(x_out, shift, scale), one pass."""
    x, y = _unit_last(x), _unit_last(y)
    gate, shift, scale = _unit_last(gate), _unit_last(shift), _unit_last(scale)
    B, L, D = x.shape
    ct = compute_dtype(x, y, gate, shift, scale)
    x_out = _empty((B, L, D), x.dtype, x.device)
    h = _empty((B, L, D), h_dtype or x.dtype, x.device)
    mean = _empty((B, L), ct, x.device)
    rstd = _empty((B, L), ct, x.device)
    if h.numel() == 0:
        return x_out, h, mean.zero_(), rstd.zero_()
    block_r, block_d, num_warps = _tile(D, L)
    n_blocks = triton.cdiv(L, block_r)
    _gated_residual_adaln_fwd_kernel[(B * n_blocks,)](
        x, y, gate, shift, scale, x_out, h, mean, rstd,
        L, D, n_blocks,
        *_rows_strides(x), *_rows_strides(y), gate.stride(0), shift.stride(0), scale.stride(0),
        eps,
        BLOCK_R=block_r, BLOCK_D=block_d, COMPUTE=_tl(ct), ROUND_BF16=interpreting(), num_warps=num_warps,
    )
    return x_out, h, mean, rstd


def gated_residual_adaln_bwd(dx_out, dh, x_out, y, gate, scale, mean, rstd, shift_dtype: torch.dtype):
    """(dx, dy, dgate, dshift, dscale) of gated_residual_adaln in one pass; dx_out and/or dh may be None.

    total = dx_out + LayerNorm-modulate backward of dh; dx = total, dy = total * gate,
    dgate = sum_L total * y, dshift = sum_L dh, dscale = sum_L dh * xhat (deterministic reductions).
    """
    x_out, y, gate, scale = _unit_last(x_out), _unit_last(y), _unit_last(gate), _unit_last(scale)
    B, L, D = x_out.shape
    ct = mean.dtype
    dev = x_out.device
    if (dx_out is None and dh is None) or x_out.numel() == 0:
        zeros = torch.zeros((B, D), dtype=ct, device=dev)
        return (torch.zeros_like(x_out), torch.zeros_like(y, memory_format=torch.contiguous_format),
                zeros.to(gate.dtype), zeros.to(shift_dtype), zeros.to(scale.dtype))
    dx_out = None if dx_out is None else _unit_last(dx_out)
    dh = None if dh is None else _unit_last(dh)
    dx = _empty((B, L, D), x_out.dtype, dev)
    dy = _empty((B, L, D), y.dtype, dev)
    block_r, block_d, num_warps = _tile(D, L)
    chunk_rows, n_chunks = _chunking(B, L, block_r, dev)
    dgate_part = _empty((B, n_chunks, D), ct, dev)
    dshift_part = _empty((B, n_chunks, D), ct, dev)
    dscale_part = _empty((B, n_chunks, D), ct, dev)
    # An absent gradient is never read (HAS_* is False): any tensor can stand in for its pointer.
    dxo_arg = x_out if dx_out is None else dx_out
    dh_arg = x_out if dh is None else dh
    _gated_residual_adaln_bwd_kernel[(B * n_chunks,)](
        dxo_arg, dh_arg, x_out, y, gate, scale, mean, rstd,
        dx, dy, dgate_part, dshift_part, dscale_part,
        L, D, n_chunks, chunk_rows,
        *_rows_strides(dxo_arg), *_rows_strides(dh_arg), *_rows_strides(x_out), *_rows_strides(y),
        gate.stride(0), scale.stride(0),
        HAS_DXO=dx_out is not None, HAS_DH=dh is not None,
        BLOCK_R=block_r, BLOCK_D=block_d, COMPUTE=_tl(ct), ROUND_BF16=interpreting(), num_warps=num_warps,
    )
    return dx, dy, _finish(dgate_part, gate.dtype), _finish(dshift_part, shift_dtype), _finish(dscale_part, scale.dtype)
