"""Fused adaLN kernels: LayerNorm (no affine) + modulate, gated residual, and both in one pass.

One forward and one backward kernel serve the three ops, as csrc's CUDA kernels do with their Mode:
MODE = MODULATE (adaln_modulate: h = LN(x) * (1 + scale) + shift), GATED (gated_residual:
x_out = x + gate * y) or FUSED (gated_residual_adaln: both, h normalized from x_out as stored).
Constexpr flags (NORM, GATE) select the code, so there is one place to tune.

Shapes: x, y, h, x_out: [B, L, D] with unit stride along D (any strides over B and L; the launchers
copy a tensor only when its last dim is not contiguous); shift, scale, gate: [B, D] with unit stride
along D (chunks of the model's [B, 6D] modulation tensor run without copies). Math is done in float32
(float64 when any input is float64) whatever the input dtypes; each output is stored in its own dtype
(h: h_dtype or x.dtype, x_out: x.dtype, grads: their input's).

Tiles: a row is covered by two power-of-two column tiles: a head of BLOCK_D = the largest power of two
<= D (columns [0, BLOCK_D), no column mask) and, when D is not a power of two, a tail of
BLOCK_T = next_power_of_2(D - BLOCK_D) (columns [BLOCK_D, D), masked; HAS_TAIL). One next_power_of_2(D)
tile would leave lanes idle: 44% at DiT-XL's D = 1152 (2048 lanes); 1024 + 128 leaves none. The two tiles
get different register layouts, so a row with a tail runs alone (BLOCK_R = 1, warps from the head width)
and its statistics are scalars, which carry no layout (see _adaln_fwd_kernel); without a tail a program
step takes BLOCK_R rows, from the tile budget (_TILE_ELEMS elements per head tile). Rows narrower than
_MIN_SPLIT_D (no DiT width) keep one masked tile with many rows per step. Row reductions add the head's
sums, then the tail's; per-column accumulators live per tile. SPLIT_D off (DIT_FAST_ADALN_SPLIT_D=0)
gives back the one masked next_power_of_2(D) tile, for a GPU A/B. Each program walks several row blocks,
the next block's loads (x, y; dh, x_out, dx_out, mean, rstd in backward) issued before the current
block's reductions, so memory latency overlaps math (PREFETCH, a constexpr: off, each block is loaded
when reached, for fewer live registers).

Statistics (forward): centred on a per-row pivot (the row's first element of x), so x - pivot is
exact for rows far from zero; two reductions (mean, then the variance of the centred row). The saved
mean is pivot + mu in the compute dtype.
Backward: the saved mean is used as is. Its rounding (up to half an ulp of the mean: 5e-4 at mean 1e4)
is corrected algebraically inside the ONE reduction round the backward has: the sums of
xc = x - mean, of g = dh * (1 + scale) and of g * xc go through one tuple reduction, then
xhat = (xc - mean(xc)) * rstd and mean(g * xhat) = rstd * (mean(g * xc) - mean(xc) * mean(g)).

Backward kernels reduce over L for dshift/dscale/dgate ([B, D] each) DETERMINISTICALLY, without
atomics: each program walks a fixed chunk of rows of one batch element, accumulates in registers and
writes its partial sums to one [B, n_chunks, K, D] buffer (K = 1..4 sums); common.sum_partials then
adds the chunks in a fixed order for all K sums in one launch. The chunk count comes from the kernel's
occupancy: registers per thread of the compiled kernel (CUDA) or a conservative table, fixed per
(kernel variant, shape) before the first launch, so two runs give bitwise identical results.

Launchers allocate every buffer through common.empty(); inside `poison_outputs()` those buffers start
NaN-filled, so tests can prove every element is written.

The Triton interpreter (TRITON_INTERPRET=1, CPU tensors) truncates float32 -> bfloat16 where
GPUs round to nearest even; the launchers then pass ROUND_BF16 so results match (common.cast_for).
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

# The one compute-dtype rule of every backend; absolute, since scripts/check_triton_compile.py loads kernels/ alone.
from dit_fast.ops.dtypes import compute_dtype

from . import common
from .common import cast_for, interpreting, inv_std, n_sm, sum_partials

# Elements per program tile: 8 per thread at 8 warps, one 16-byte load per bf16 tensor.
_TILE_ELEMS = 2048
# Narrowest row split into head and tail tiles. A split row runs alone (see _adaln_fwd_kernel), and a
# narrower head would not fill one warp at 8 elements per thread; such rows (no DiT width: DiT-S has 384)
# keep one masked next_power_of_2(D) tile with many rows per step.
_MIN_SPLIT_D = 256
# Row blocks one forward program walks at most (more blocks: fewer programs, longer pipelines).
_MAX_FWD_STEPS = 8
# Backward: rows per program at most (longer chunks shrink the partial-sum buffers but cut parallelism).
_MAX_CHUNK_ROWS = 256
# Registers per thread assumed for a backward kernel when the compiled kernel cannot be asked (CPU,
# interpreter, an old triton): the largest of both Triton versions checked (3.9 here, 3.6 on the GPU machine:
# 212 registers, benchmarks/results/2026-12-05-triton-compile-versions.md), rounded up to the allocation unit.
_CONSERVATIVE_REGS = 216

# Whether the kernels issue the next row block's loads before the current block's reductions (the
# default), or load each block when it is reached (fewer live registers, maybe more CTAs per SM). A
# switch for A/B runs on a GPU (DIT_FAST_ADALN_PREFETCH=0; benchmarks/gpu_check.sh times both); the
# results are bitwise equal either way.
PREFETCH = os.environ.get("DIT_FAST_ADALN_PREFETCH", "1") != "0"
# Whether a row is covered by a power-of-two head tile plus a tail tile (the default: no idle lanes at
# D = 1152), or by one masked next_power_of_2(D) tile. A switch for A/B runs on a GPU
# (DIT_FAST_ADALN_SPLIT_D=0, or the triton-nosplit contender of `dit-fast kernels`); results agree but for
# the last bits of the sums, whose order differs.
SPLIT_D = os.environ.get("DIT_FAST_ADALN_SPLIT_D", "1") != "0"

MODULATE, GATED, FUSED = 0, 1, 2


@contextlib.contextmanager
def poison_outputs():
    """Test hook: buffers allocated by the launchers (all kernels) inside this block are NaN-filled first."""
    old = common.set_poison(True)
    try:
        yield
    finally:
        common.set_poison(old)


_empty = common.empty


def _tl(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """The kernels index rows by strides but need unit stride along D."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _col_tiles(D: int, split: bool) -> dict:
    """The kernels' column constexprs for rows of D elements: head BLOCK_D (masked past D only when
    MASK_HEAD: the unsplit tile), tail BLOCK_T when HAS_TAIL (1, unused, without one)."""
    if not split or D < _MIN_SPLIT_D:
        block_d = triton.next_power_of_2(D)
        return dict(BLOCK_D=block_d, BLOCK_T=1, MASK_HEAD=block_d != D, HAS_TAIL=False)
    head = 1 << (D.bit_length() - 1)
    rest = D - head
    return dict(BLOCK_D=head, BLOCK_T=triton.next_power_of_2(rest) if rest else 1, MASK_HEAD=False,
                HAS_TAIL=rest > 0)


def _tile(D: int, L: int) -> tuple[int, int, dict]:
    """(BLOCK_R, num_warps, column constexprs) for rows of D elements (SPLIT_D decides the column tiles).
    BLOCK_R comes from the head's width (_TILE_ELEMS elements per head tile), except that a row with a
    tail runs alone, with scalar statistics (see _adaln_fwd_kernel)."""
    cols = _col_tiles(D, SPLIT_D)
    block_d = cols["BLOCK_D"]
    block_r = 1 if cols["HAS_TAIL"] else max(1, min(_TILE_ELEMS // block_d, triton.next_power_of_2(L)))
    num_warps = min(max(block_r * block_d // 256, 1), 8)
    return block_r, num_warps, cols


def _ctas_per_sm(regs: int, num_warps: int) -> int:
    """Resident CTAs per SM for a kernel of `regs` registers per thread (64K registers, allocated per
    warp in units of 256 = 8 per thread; at most 64 warps per SM), ignoring shared memory (a few KB here)."""
    regs = max(8, -(-regs // 8) * 8)
    return max(1, min(65536 // (regs * 32 * num_warps), 64 // num_warps))


_REGS: dict = {}  # (kernel variant key) -> registers per thread, fixed at the first call


def _regs_of(kernel, key, args, grid, kwargs) -> int:
    """Registers per thread of the compiled backward kernel (compiled ahead of the launch by warmup: the
    same specialization the launch then takes from Triton's cache, as the chunking arguments are not
    specialized, BWD_RUNTIME_ARGS); the conservative table value where that is not available. Cached per
    variant: the chunking, and so the order of the partial sums, never changes between calls."""
    if key not in _REGS:
        regs = _CONSERVATIVE_REGS
        if not interpreting() and torch.cuda.is_available():
            try:
                compiled = kernel.warmup(*args, grid=grid, **kwargs)
                compiled._init_handles()
                regs = int(compiled.n_regs) or regs
            except Exception:  # an API difference: the table is safe, only less tuned
                pass
        _REGS[key] = regs
    return _REGS[key]


def _chunking(B: int, L: int, block_r: int, num_warps: int, regs: int, device: torch.device) -> tuple[int, int]:
    """(rows per program, chunks per batch element) for the backward kernels: one wave of programs at
    the kernel's real occupancy; rows is a multiple of block_r."""
    want_programs = _ctas_per_sm(regs, num_warps) * n_sm(device)
    rows = triton.cdiv(B * L, want_programs)
    rows = min(max(rows, block_r), max(_MAX_CHUNK_ROWS, block_r))
    rows = triton.cdiv(rows, block_r) * block_r
    n_chunks = triton.cdiv(L, rows)
    rows = triton.cdiv(triton.cdiv(L, n_chunks), block_r) * block_r  # even out the last chunk
    return rows, n_chunks


def _fwd_steps(B: int, L: int, block_r: int, device: torch.device) -> tuple[int, int]:
    """(row blocks per forward program, programs per batch element): about 8 programs per SM."""
    n_blocks = triton.cdiv(L, block_r)
    steps = max(1, min(_MAX_FWD_STEPS, triton.cdiv(B * n_blocks, 8 * n_sm(device))))
    return steps, triton.cdiv(n_blocks, steps)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(base_ptr, rows64, row_stride, cols, mask, COMPUTE: tl.constexpr):
    """A [BLOCK_R, W] tile of rows of a [B, L, D] tensor (base_ptr: its batch element), in COMPUTE."""
    return tl.load(base_ptr + rows64[:, None] * row_stride + cols[None, :], mask=mask, other=0.0).to(COMPUTE)


@triton.jit
def _load_vec(base_ptr, cols, cmask, COMPUTE: tl.constexpr):
    """One column tile of a batch element's [D] modulation vector (shift, scale or gate), in COMPUTE."""
    return tl.load(base_ptr + cols, mask=cmask, other=0.0).to(COMPUTE)


@triton.jit
def _store_rows(ptr, row_idx, D, cols, v, mask, ROUND_BF16: tl.constexpr):
    """Store a tile into rows row_idx of a contiguous [B*L, D] output, rounded to its dtype."""
    tl.store(ptr + row_idx[:, None] * D + cols[None, :], cast_for(v, ptr, ROUND_BF16), mask=mask)


@triton.jit
def _add3(a0, b0, c0, a1, b1, c1):
    return a0 + a1, b0 + b1, c0 + c1


@triton.jit
def _row_sum(v, SCALAR: tl.constexpr):
    """Row sums of a tile: [BLOCK_R], or one scalar when SCALAR (one row per step)."""
    if SCALAR:
        s = tl.sum(v)
    else:
        s = tl.sum(v, axis=1)
    return s


@triton.jit
def _flat(v):
    """A tile as one vector (row order kept)."""
    return tl.reshape(v, [v.numel])


@triton.jit
def _per_row(s, SCALAR: tl.constexpr):
    """A per-row value ([BLOCK_R], or a scalar when SCALAR) ready to broadcast along a tile's columns."""
    if SCALAR:
        r = s
    else:
        r = s[:, None]
    return r


@triton.jit
def _tile_mask(rmask, cmask, MASK_COLS: tl.constexpr):
    """The mask of a [BLOCK_R, W] tile. A split head lies inside [0, D): its rows' mask alone (broadcast
    along the columns) keeps its loads and stores unpredicated per column."""
    mask = rmask[:, None]
    if MASK_COLS:
        mask = mask & cmask[None, :]
    return mask


@triton.jit
def _row_columns(D, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """The head tile's columns [0, BLOCK_D) and the tail tile's [BLOCK_D, BLOCK_D + BLOCK_T), each with its
    mask (columns < D)."""
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    cols_t = BLOCK_D + tl.arange(0, BLOCK_T)
    return cols, cmask, cols_t, cols_t < D


@triton.jit
def _mod_vectors(gate_base, bias_ptr, shift_base, scale_base, weight_ptr, cols, cmask, GATE: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SHIFT: tl.constexpr, SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                 W: tl.constexpr, COMPUTE: tl.constexpr):
    """One column tile of (gate, bias, shift, (1 + scale) * gain); absent ones are zeros (never read). The
    gain (HAS_WEIGHT, with SCALE only) multiplies (1 + scale): one multiplier per column."""
    zero = tl.zeros([W], dtype=COMPUTE)
    gate, bias, shift, scale1 = zero, zero, zero, zero
    if GATE:
        gate = _load_vec(gate_base, cols, cmask, COMPUTE)
        if HAS_BIAS:  # the bias of the GEMM that made y (attn.proj, mlp.fc2), added here instead
            bias = _load_vec(bias_ptr, cols, cmask, COMPUTE)
    if SHIFT:
        shift = _load_vec(shift_base, cols, cmask, COMPUTE)
    if SCALE:
        scale1 = 1.0 + _load_vec(scale_base, cols, cmask, COMPUTE)
        if HAS_WEIGHT:
            scale1 *= _load_vec(weight_ptr, cols, cmask, COMPUTE)
    return gate, bias, shift, scale1


@triton.jit
def _mod_tiles(gate_base, bias_ptr, shift_base, scale_base, weight_ptr, cols, cmask, cols_t, cmask_t,
               GATE: tl.constexpr, HAS_BIAS: tl.constexpr, SHIFT: tl.constexpr, SCALE: tl.constexpr,
               HAS_WEIGHT: tl.constexpr, HAS_TAIL: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
               COMPUTE: tl.constexpr):
    """A batch element's modulation vectors (gate, bias, shift, (1 + scale) * gain) for the head tile, then
    the same for the tail tile (zeros, never read, without HAS_TAIL)."""
    gate, bias, shift, scale1 = _mod_vectors(gate_base, bias_ptr, shift_base, scale_base, weight_ptr, cols, cmask,
                                             GATE, HAS_BIAS, SHIFT, SCALE, HAS_WEIGHT, BLOCK_D, COMPUTE)
    zero_t = tl.zeros([BLOCK_T], dtype=COMPUTE)
    gate_t, bias_t, shift_t, scale1_t = zero_t, zero_t, zero_t, zero_t
    if HAS_TAIL:
        gate_t, bias_t, shift_t, scale1_t = _mod_vectors(gate_base, bias_ptr, shift_base, scale_base, weight_ptr,
                                                         cols_t, cmask_t, GATE, HAS_BIAS, SHIFT, SCALE, HAS_WEIGHT,
                                                         BLOCK_T, COMPUTE)
    return gate, bias, shift, scale1, gate_t, bias_t, shift_t, scale1_t


@triton.jit
def _fwd_load(x_base, x_sl, y_base, y_sl, r64, cols, mask, GATE: tl.constexpr, COMPUTE: tl.constexpr):
    """One column tile of the forward's inputs (x, y) for a block of rows; y is x when there is no gate."""
    x = _load_rows(x_base, r64, x_sl, cols, mask, COMPUTE)
    y = x
    if GATE:
        y = _load_rows(y_base, r64, y_sl, cols, mask, COMPUTE)
    return x, y


@triton.jit
def _fwd_tiles(x_base, x_sl, y_base, y_sl, rows, rmask, cols, cmask, cols_t, cmask_t, GATE: tl.constexpr,
               MASK_HEAD: tl.constexpr, HAS_TAIL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
               COMPUTE: tl.constexpr):
    """The forward's inputs for one block of rows: head (x, y), tail (xt, yt; zeros without a tail), pivot
    (a scalar with a tail: one row)."""
    r64 = rows.to(tl.int64)
    x, y = _fwd_load(x_base, x_sl, y_base, y_sl, r64, cols, _tile_mask(rmask, cmask, MASK_HEAD), GATE, COMPUTE)
    xt = tl.zeros([BLOCK_R, BLOCK_T], dtype=COMPUTE)
    yt = xt
    if HAS_TAIL:
        xt, yt = _fwd_load(x_base, x_sl, y_base, y_sl, r64, cols_t, _tile_mask(rmask, cmask_t, True), GATE,
                           COMPUTE)
    pivot = tl.load(x_base + r64 * x_sl, mask=rmask, other=0.0).to(COMPUTE)
    if HAS_TAIL:
        pivot = tl.sum(pivot)
    return x, y, xt, yt, pivot


@triton.jit
def _fwd_gated(x, y, gate, bias, xo_ptr, row_idx, D, cols, mask, GATE: tl.constexpr, HAS_BIAS: tl.constexpr,
               COMPUTE: tl.constexpr, ROUND_BF16: tl.constexpr):
    """One column tile: stores x_out = x + gate * (y + bias) (GATE) and returns what is normalized: x_out as
    stored (rounded to x's dtype), as the unfused model normalizes it, or x."""
    v = x
    if GATE:
        if HAS_BIAS:
            y += bias[None, :]
        xo = cast_for(x + gate[None, :] * y, xo_ptr, ROUND_BF16)
        tl.store(xo_ptr + row_idx[:, None] * D + cols[None, :], xo, mask=mask)
        v = xo.to(COMPUTE)
    return v


@triton.jit
def _centred(v, pivot, mask, SCALAR: tl.constexpr):
    """One column tile of v - pivot (zero outside the mask) and its row sums."""
    vc = tl.where(mask, v - _per_row(pivot, SCALAR), 0.0)
    return vc, _row_sum(vc, SCALAR)


@triton.jit
def _deviation(vc, mu, mask, SCALAR: tl.constexpr):
    """One column tile of vc - mu (zero outside the mask) and its row sums of squares."""
    d = tl.where(mask, vc - _per_row(mu, SCALAR), 0.0)
    return d, _row_sum(d * d, SCALAR)


@triton.jit
def _squares(v, mask, SCALAR: tl.constexpr):
    """RMS mode: one column tile of v (zero outside the mask) and its row sums of squares."""
    d = tl.where(mask, v, 0.0)
    return d, _row_sum(d * d, SCALAR)


@triton.jit
def _modulated(d, r, scale1, shift, x_ptr, ROUND_N: tl.constexpr, SHIFT: tl.constexpr, ROUND_BF16: tl.constexpr):
    """One column tile of h = n * scale1 + shift with n = d * rstd, rounded to x's dtype first when ROUND_N
    (RMSNorm as LightningDiT writes it: normalized in float32, cast back with type_as, then the gain; scale1
    holds gain * (1 + scale) here). Without SHIFT (scale-only adaLN) nothing is added."""
    n = d * r
    if ROUND_N:
        n = cast_for(n, x_ptr, ROUND_BF16).to(d.dtype)
    h = n * scale1[None, :]
    if SHIFT:
        h += shift[None, :]
    return h


@triton.jit
def _adaln_fwd_kernel(
    x_ptr, y_ptr, gate_ptr, bias_ptr, shift_ptr, scale_ptr, weight_ptr, xo_ptr, h_ptr, mean_ptr, rstd_ptr,
    L, D, n_groups, steps,
    x_sb, x_sl, y_sb, y_sl, gate_sb, shift_sb, scale_sb,
    eps,
    NORM: tl.constexpr, GATE: tl.constexpr, HAS_BIAS: tl.constexpr, PREFETCH: tl.constexpr,
    RMS: tl.constexpr, SHIFT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, MASK_HEAD: tl.constexpr,
    HAS_TAIL: tl.constexpr, COMPUTE: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    """Program (batch element, group): row blocks group*steps .. +steps of that batch element. Columns:
    the head tile [0, BLOCK_D) (masked past D only with MASK_HEAD) and, with HAS_TAIL, the tail tile
    [BLOCK_D, D) in BLOCK_T lanes. Norm modes (NORM): LayerNorm, or RMSNorm with RMS (no centring; the
    saved mean is 0); a gain [D] with HAS_WEIGHT; the shift added only with SHIFT (scale-only adaLN)."""
    # Head and tail tiles get different register layouts (8 and 1 elements per thread at D = 1152). Row
    # statistics that both use, as [BLOCK_R] vectors, make the compiler move one tile's math into the
    # other's layout (shared-memory round trips of whole tiles, ~40% more registers); scalars carry no
    # layout. So a row with a tail runs alone (BLOCK_R = 1, _tile) and its statistics are scalars.
    pid = tl.program_id(0)
    b = (pid // n_groups).to(tl.int64)
    first = (pid % n_groups) * steps * BLOCK_R
    cols, cmask, cols_t, cmask_t = _row_columns(D, BLOCK_D, BLOCK_T)
    x_base = x_ptr + b * x_sb
    y_base = y_ptr + b * y_sb
    gate, bias, shift, scale1, gate_t, bias_t, shift_t, scale1_t = _mod_tiles(
        gate_ptr + b * gate_sb, bias_ptr, shift_ptr + b * shift_sb, scale_ptr + b * scale_sb, weight_ptr,
        cols, cmask, cols_t, cmask_t, GATE, HAS_BIAS, NORM and SHIFT, NORM, HAS_WEIGHT, HAS_TAIL, BLOCK_D, BLOCK_T,
        COMPUTE)

    rows = first + tl.arange(0, BLOCK_R)
    rmask = rows < L
    if PREFETCH:
        x, y, xt, yt, pivot = _fwd_tiles(x_base, x_sl, y_base, y_sl, rows, rmask, cols, cmask, cols_t, cmask_t,
                                         GATE, MASK_HEAD, HAS_TAIL, BLOCK_R, BLOCK_T, COMPUTE)
    for _ in range(0, steps):
        nrows = rows + BLOCK_R
        nrmask = (nrows < L) & (nrows < first + steps * BLOCK_R)
        if PREFETCH:  # the next block's loads go out before this block's reductions
            x_next, y_next, xt_next, yt_next, pivot_next = _fwd_tiles(
                x_base, x_sl, y_base, y_sl, nrows, nrmask, cols, cmask, cols_t, cmask_t,
                GATE, MASK_HEAD, HAS_TAIL, BLOCK_R, BLOCK_T, COMPUTE)
        else:
            x, y, xt, yt, pivot = _fwd_tiles(x_base, x_sl, y_base, y_sl, rows, rmask, cols, cmask, cols_t, cmask_t,
                                             GATE, MASK_HEAD, HAS_TAIL, BLOCK_R, BLOCK_T, COMPUTE)

        mask = _tile_mask(rmask, cmask, MASK_HEAD)
        mask_t = _tile_mask(rmask, cmask_t, True)
        row_idx = b * L + rows.to(tl.int64)  # outputs and statistics are contiguous
        v = _fwd_gated(x, y, gate, bias, xo_ptr, row_idx, D, cols, mask, GATE, HAS_BIAS, COMPUTE, ROUND_BF16)
        if HAS_TAIL:
            vt = _fwd_gated(xt, yt, gate_t, bias_t, xo_ptr, row_idx, D, cols_t, mask_t, GATE, HAS_BIAS, COMPUTE,
                            ROUND_BF16)
        if NORM:
            if RMS:  # no centring: the mean of squares of the row itself
                d, ss = _squares(v, mask, HAS_TAIL)
                if HAS_TAIL:
                    dt, ss_t = _squares(vt, mask_t, HAS_TAIL)
                    ss += ss_t
                mean_row = pivot * 0.0
            else:
                vc, s = _centred(v, pivot, mask, HAS_TAIL)
                if HAS_TAIL:
                    vct, s_t = _centred(vt, pivot, mask_t, HAS_TAIL)
                    s += s_t
                mu = s / D
                d, ss = _deviation(vc, mu, mask, HAS_TAIL)
                if HAS_TAIL:
                    dt, ss_t = _deviation(vct, mu, mask_t, HAS_TAIL)
                    ss += ss_t
                mean_row = pivot + mu
            rstd = inv_std(ss / D, eps)  # NaN, not 0, where the squares overflowed
            r = _per_row(rstd, HAS_TAIL)
            _store_rows(h_ptr, row_idx, D, cols, _modulated(d, r, scale1, shift, x_ptr, RMS, SHIFT, ROUND_BF16),
                        mask, ROUND_BF16)
            if HAS_TAIL:
                _store_rows(h_ptr, row_idx, D, cols_t,
                            _modulated(dt, r, scale1_t, shift_t, x_ptr, RMS, SHIFT, ROUND_BF16), mask_t, ROUND_BF16)
            tl.store(mean_ptr + row_idx, mean_row, mask=rmask)
            tl.store(rstd_ptr + row_idx, rstd, mask=rmask)

        rows, rmask = nrows, nrmask
        if PREFETCH:
            x, y, xt, yt, pivot = x_next, y_next, xt_next, yt_next, pivot_next


@triton.jit
def _bwd_load(dh_base, dh_sl, xn_base, xn_sl, dxo_base, dxo_sl, y_base, y_sl, r64, cols, mask,
              NORM: tl.constexpr, HAS_DXO: tl.constexpr, GATE: tl.constexpr, BLOCK_R: tl.constexpr, W: tl.constexpr,
              COMPUTE: tl.constexpr):
    """One column tile of the backward's row inputs (dh, xn, dxo, y); absent ones are zeros."""
    zero = tl.zeros([BLOCK_R, W], dtype=COMPUTE)
    dh, xn, dxo, y = zero, zero, zero, zero
    if NORM:
        dh = _load_rows(dh_base, r64, dh_sl, cols, mask, COMPUTE)
        xn = _load_rows(xn_base, r64, xn_sl, cols, mask, COMPUTE)
    if HAS_DXO:
        dxo = _load_rows(dxo_base, r64, dxo_sl, cols, mask, COMPUTE)
    if GATE:
        y = _load_rows(y_base, r64, y_sl, cols, mask, COMPUTE)
    return dh, xn, dxo, y


@triton.jit
def _bwd_tiles(
    dh_base, dh_sl, xn_base, xn_sl, dxo_base, dxo_sl, y_base, y_sl, mean_row_ptr, rstd_row_ptr,
    rows, rmask, cols, cmask, cols_t, cmask_t, NORM: tl.constexpr, HAS_DXO: tl.constexpr, GATE: tl.constexpr,
    MASK_HEAD: tl.constexpr, HAS_TAIL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr, COMPUTE: tl.constexpr,
):
    """The backward's inputs for one block of rows: head (dh, xn, dxo, y), tail (the same; zeros without a
    tail), and the rows' (mean, rstd) (scalars with a tail: one row); absent ones are zeros."""
    r64 = rows.to(tl.int64)
    dh, xn, dxo, y = _bwd_load(dh_base, dh_sl, xn_base, xn_sl, dxo_base, dxo_sl, y_base, y_sl, r64, cols,
                               _tile_mask(rmask, cmask, MASK_HEAD), NORM, HAS_DXO, GATE, BLOCK_R, BLOCK_D, COMPUTE)
    dh_t = tl.zeros([BLOCK_R, BLOCK_T], dtype=COMPUTE)
    xn_t, dxo_t, y_t = dh_t, dh_t, dh_t
    if HAS_TAIL:
        dh_t, xn_t, dxo_t, y_t = _bwd_load(dh_base, dh_sl, xn_base, xn_sl, dxo_base, dxo_sl, y_base, y_sl, r64,
                                           cols_t, _tile_mask(rmask, cmask_t, True), NORM, HAS_DXO, GATE, BLOCK_R,
                                           BLOCK_T, COMPUTE)
    mean = tl.zeros([BLOCK_R], dtype=COMPUTE)
    rstd = mean
    if NORM:
        mean = tl.load(mean_row_ptr + r64, mask=rmask, other=0.0).to(COMPUTE)
        rstd = tl.load(rstd_row_ptr + r64, mask=rmask, other=0.0).to(COMPUTE)
    if HAS_TAIL:
        mean = tl.sum(mean)
        rstd = tl.sum(rstd)
    return dh, xn, dxo, y, dh_t, xn_t, dxo_t, y_t, mean, rstd


@triton.jit
def _bwd_row_sums(dh, xn, mean, scale1, mask, SCALAR: tl.constexpr):
    """One column tile of xc = xn - mean and g = dh * (1 + scale), with the row sums of xc, g and g * xc."""
    xc = tl.where(mask, xn - _per_row(mean, SCALAR), 0.0)
    g = dh * scale1[None, :]
    if SCALAR:  # flattened by hand: the interpreter (triton 3.9) fails on a tuple reduction over axis=None
        s_xc, s_g, s_gxc = tl.reduce((_flat(xc), _flat(g), _flat(g * xc)), 0, _add3)
    else:
        s_xc, s_g, s_gxc = tl.reduce((xc, g, g * xc), 1, _add3)
    return xc, g, s_xc, s_g, s_gxc


@triton.jit
def _bwd_tile(
    dh, dxo, y, xc, g, c, rstd, mean_g, mean_gx, gate, bias, acc_dgate, acc_dbias, acc_dshift, acc_dscale,
    dx_ptr, dy_ptr, row_idx, D, cols, mask,
    NORM: tl.constexpr, GATE: tl.constexpr, HAS_DXO: tl.constexpr, WRITE_DX: tl.constexpr, HAS_BIAS: tl.constexpr,
    SCALAR: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    """One column tile of the backward once the row sums are known (NORM: c = mean(xc), mean_g, mean_gx):
    stores dx (WRITE_DX) and dy (GATE), returns the updated per-column accumulators."""
    total = dxo
    if NORM:
        r = _per_row(rstd, SCALAR)
        xhat = tl.where(mask, (xc - _per_row(c, SCALAR)) * r, 0.0)
        acc_dshift += dh
        acc_dscale += dh * xhat
        total = r * (g - _per_row(mean_g, SCALAR) - xhat * _per_row(mean_gx, SCALAR))
        if HAS_DXO:
            total += dxo
    if WRITE_DX:
        _store_rows(dx_ptr, row_idx, D, cols, total, mask, ROUND_BF16)
    if GATE:
        dy = total * gate[None, :]
        if HAS_BIAS:
            acc_dgate += total * (y + bias[None, :])  # rows past L: total is 0 there
            acc_dbias += dy
        else:
            acc_dgate += total * y
        _store_rows(dy_ptr, row_idx, D, cols, dy, mask, ROUND_BF16)
    return acc_dgate, acc_dbias, acc_dshift, acc_dscale


@triton.jit
def _store_partials(part, D, cols, cmask, acc_dgate, acc_dbias, acc_dshift, acc_dscale, scale_base, weight_ptr,
                    NORM: tl.constexpr, GATE: tl.constexpr, HAS_BIAS: tl.constexpr, SHIFT: tl.constexpr,
                    HAS_WEIGHT: tl.constexpr):
    """One column tile of a chunk's [K, D] partial sums: (dgate,) (dbias,) (dshift,) (dscale,) (dweight,).
    acc_dscale holds sum dh * xhat: dscale = weight * that, dweight = (1 + scale) * that (one batch element
    per chunk, so (1 + scale) is one vector). Both are loaded again here rather than kept live through the
    row loop (Triton 3.6 spills the RMS backward with a gain otherwise)."""
    k = 0
    if GATE:
        tl.store(part + cols, tl.sum(acc_dgate, axis=0), mask=cmask)
        k = 1
        if HAS_BIAS:
            tl.store(part + D + cols, tl.sum(acc_dbias, axis=0), mask=cmask)
            k = 2
    if NORM:
        if SHIFT:
            tl.store(part + k * D + cols, tl.sum(acc_dshift, axis=0), mask=cmask)
            k += 1
        s_dhx = tl.sum(acc_dscale, axis=0)
        if HAS_WEIGHT:
            weight = tl.load(weight_ptr + cols, mask=cmask, other=0.0).to(s_dhx.dtype)
            scale1 = 1.0 + tl.load(scale_base + cols, mask=cmask, other=0.0).to(s_dhx.dtype)
            tl.store(part + k * D + cols, s_dhx * weight, mask=cmask)
            tl.store(part + (k + 1) * D + cols, s_dhx * scale1, mask=cmask)
        else:
            tl.store(part + k * D + cols, s_dhx, mask=cmask)


# The backward's chunking arguments are runtime values, never specialized: Triton would otherwise compile
# one variant for n_chunks == 1 (or chunk_rows % 16 == 0) and another for the rest, so the warmup that
# sizes the chunking (_regs_of, run before they are known) would compile, and measure, a specialization
# the real launch does not use. With them unspecialized the warmup compiles the launched kernel itself.
BWD_RUNTIME_ARGS = ("n_chunks", "chunk_rows")


@triton.jit(do_not_specialize=BWD_RUNTIME_ARGS)
def _adaln_bwd_kernel(
    dh_ptr, dxo_ptr, xn_ptr, y_ptr, gate_ptr, bias_ptr, scale_ptr, weight_ptr, mean_ptr, rstd_ptr,
    dx_ptr, dy_ptr, part_ptr,
    L, D, n_chunks, chunk_rows,
    dh_sb, dh_sl, dxo_sb, dxo_sl, xn_sb, xn_sl, y_sb, y_sl, gate_sb, scale_sb,
    NORM: tl.constexpr, GATE: tl.constexpr, HAS_DXO: tl.constexpr, WRITE_DX: tl.constexpr, K: tl.constexpr,
    HAS_BIAS: tl.constexpr, PREFETCH: tl.constexpr, RMS: tl.constexpr, SHIFT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, MASK_HEAD: tl.constexpr,
    HAS_TAIL: tl.constexpr, COMPUTE: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    """One chunk of rows of one batch element. Gradients in: dh (NORM) and/or dxo (d x_out; for GATED
    alone it is the only one). Out: dx (NORM: d of the normalized tensor + dxo; GATED: dxo itself, written
    only with WRITE_DX), dy = total * gate (GATE), and the chunk's partial sums [K, D]: (dgate,) (dbias,)
    (dshift, dscale). HAS_BIAS: y + bias was gated in the forward; dbias = sum of dy over the chunk (summed
    over the batch by the launcher), so the GEMM's own bias gradient pass over dy is not needed. Columns
    as in the forward: a head tile and, with HAS_TAIL (one row per step), a tail tile, each with its own
    accumulators; the row statistics are then scalars, as in the forward."""
    pid = tl.program_id(0)
    b = (pid // n_chunks).to(tl.int64)
    chunk = pid % n_chunks
    cols, cmask, cols_t, cmask_t = _row_columns(D, BLOCK_D, BLOCK_T)
    dh_base = dh_ptr + b * dh_sb
    dxo_base = dxo_ptr + b * dxo_sb
    xn_base = xn_ptr + b * xn_sb
    y_base = y_ptr + b * y_sb
    gate_base = gate_ptr + b * gate_sb
    scale_base = scale_ptr + b * scale_sb
    # gscale multiplies dh into d(normalized row): (1 + scale) * gain
    gate, bias, no_shift, gscale, gate_t, bias_t, no_shift_t, gscale_t = _mod_tiles(
        gate_base, bias_ptr, scale_base, scale_base, weight_ptr,
        cols, cmask, cols_t, cmask_t, GATE, HAS_BIAS, False, NORM, HAS_WEIGHT, HAS_TAIL, BLOCK_D, BLOCK_T, COMPUTE)
    # all four per tile, so one _bwd_tile serves every mode: the absent sums' accumulators are never updated
    # nor stored, and the compiler drops them
    acc_dgate = tl.zeros([BLOCK_R, BLOCK_D], dtype=COMPUTE)
    acc_dbias, acc_dshift, acc_dscale = acc_dgate, acc_dgate, acc_dgate
    if HAS_TAIL:
        acc_dgate_t = tl.zeros([BLOCK_R, BLOCK_T], dtype=COMPUTE)
        acc_dbias_t, acc_dshift_t, acc_dscale_t = acc_dgate_t, acc_dgate_t, acc_dgate_t

    first = chunk * chunk_rows
    rows = first + tl.arange(0, BLOCK_R)
    rmask = rows < L
    mean_row_ptr = mean_ptr + b * L
    rstd_row_ptr = rstd_ptr + b * L
    if PREFETCH:
        dh, xn, dxo, y, dh_t, xn_t, dxo_t, y_t, mean, rstd = _bwd_tiles(
            dh_base, dh_sl, xn_base, xn_sl, dxo_base, dxo_sl, y_base, y_sl, mean_row_ptr, rstd_row_ptr,
            rows, rmask, cols, cmask, cols_t, cmask_t, NORM, HAS_DXO, GATE, MASK_HEAD, HAS_TAIL,
            BLOCK_R, BLOCK_D, BLOCK_T, COMPUTE,
        )

    for _ in range(0, chunk_rows, BLOCK_R):
        nrows = rows + BLOCK_R
        nrmask = (nrows < L) & (nrows < first + chunk_rows)
        if PREFETCH:  # the next block's loads go out before this block's reductions
            dh_n, xn_n, dxo_n, y_n, dh_tn, xn_tn, dxo_tn, y_tn, mean_n, rstd_n = _bwd_tiles(
                dh_base, dh_sl, xn_base, xn_sl, dxo_base, dxo_sl, y_base, y_sl, mean_row_ptr, rstd_row_ptr,
                nrows, nrmask, cols, cmask, cols_t, cmask_t, NORM, HAS_DXO, GATE, MASK_HEAD, HAS_TAIL,
                BLOCK_R, BLOCK_D, BLOCK_T, COMPUTE,
            )
        else:
            dh, xn, dxo, y, dh_t, xn_t, dxo_t, y_t, mean, rstd = _bwd_tiles(
                dh_base, dh_sl, xn_base, xn_sl, dxo_base, dxo_sl, y_base, y_sl, mean_row_ptr, rstd_row_ptr,
                rows, rmask, cols, cmask, cols_t, cmask_t, NORM, HAS_DXO, GATE, MASK_HEAD, HAS_TAIL,
                BLOCK_R, BLOCK_D, BLOCK_T, COMPUTE,
            )

        mask = _tile_mask(rmask, cmask, MASK_HEAD)
        mask_t = _tile_mask(rmask, cmask_t, True)
        row_idx = b * L + rows.to(tl.int64)
        # without NORM these stand in for the norm's terms, which _bwd_tile then never reads
        xc, g, xc_t, g_t, c, mean_g, mean_gx = dh, dh, dh_t, dh_t, mean, mean, mean
        if NORM:
            xc, g, s_xc, s_g, s_gxc = _bwd_row_sums(dh, xn, mean, gscale, mask, HAS_TAIL)  # the one reduction round
            if HAS_TAIL:
                xc_t, g_t, t_xc, t_g, t_gxc = _bwd_row_sums(dh_t, xn_t, mean, gscale_t, mask_t, HAS_TAIL)
                s_xc, s_g, s_gxc = _add3(s_xc, s_g, s_gxc, t_xc, t_g, t_gxc)
            if RMS:  # no centring (the saved mean is 0): d x = rstd * (g - xhat * mean(g * xhat))
                c = s_xc * 0.0
                mean_g = c
                mean_gx = rstd * (s_gxc / D)
            else:
                c = s_xc / D  # mean(xc): the saved mean's rounding
                mean_g = s_g / D
                mean_gx = rstd * (s_gxc / D - c * mean_g)
        acc_dgate, acc_dbias, acc_dshift, acc_dscale = _bwd_tile(
            dh, dxo, y, xc, g, c, rstd, mean_g, mean_gx, gate, bias, acc_dgate, acc_dbias, acc_dshift, acc_dscale,
            dx_ptr, dy_ptr, row_idx, D, cols, mask, NORM, GATE, HAS_DXO, WRITE_DX, HAS_BIAS, HAS_TAIL, ROUND_BF16,
        )
        if HAS_TAIL:
            acc_dgate_t, acc_dbias_t, acc_dshift_t, acc_dscale_t = _bwd_tile(
                dh_t, dxo_t, y_t, xc_t, g_t, c, rstd, mean_g, mean_gx, gate_t, bias_t,
                acc_dgate_t, acc_dbias_t, acc_dshift_t, acc_dscale_t,
                dx_ptr, dy_ptr, row_idx, D, cols_t, mask_t, NORM, GATE, HAS_DXO, WRITE_DX, HAS_BIAS, HAS_TAIL,
                ROUND_BF16,
            )

        rows, rmask = nrows, nrmask
        if PREFETCH:
            dh, xn, dxo, y, dh_t, xn_t, dxo_t, y_t, mean, rstd = (
                dh_n, xn_n, dxo_n, y_n, dh_tn, xn_tn, dxo_tn, y_tn, mean_n, rstd_n)

    part = part_ptr + (b * n_chunks + chunk) * K * D
    _store_partials(part, D, cols, cmask, acc_dgate, acc_dbias, acc_dshift, acc_dscale, scale_base, weight_ptr,
                    NORM, GATE, HAS_BIAS, SHIFT, HAS_WEIGHT)
    if HAS_TAIL:
        _store_partials(part, D, cols_t, cmask_t, acc_dgate_t, acc_dbias_t, acc_dshift_t, acc_dscale_t, scale_base,
                        weight_ptr, NORM, GATE, HAS_BIAS, SHIFT, HAS_WEIGHT)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _rows_strides(t: torch.Tensor) -> tuple[int, int]:
    return t.stride(0), t.stride(1)


def _launch_fwd(mode, x, y, gate, shift, scale, eps, x_out, h, mean, rstd, bias=None, rms=False, weight=None):
    B, L, D = x.shape
    norm, gated = mode != GATED, mode != MODULATE
    has_shift, has_weight = shift is not None, weight is not None
    block_r, num_warps, col_tiles = _tile(D, L)
    steps, n_groups = _fwd_steps(B, L, block_r, x.device)
    y = y if gated else x  # absent tensors are never read (constexpr flags): any tensor stands in
    gate = gate if gated else x
    has_bias = bias is not None
    bias = bias if has_bias else x
    optional = [t for t in (bias, shift if norm else None, weight) if t is not None]
    shift, scale = (shift if has_shift else scale, scale) if norm else (x, x)
    weight = weight if has_weight else x
    x_out = x_out if gated else x
    h, mean, rstd = (h, mean, rstd) if norm else (x, x, x)
    ct = compute_dtype(x, y, gate, scale, *optional)
    _adaln_fwd_kernel[(B * n_groups,)](
        x, y, gate, bias, shift, scale, weight, x_out, h, mean, rstd,
        L, D, n_groups, steps,
        *_rows_strides(x), *_rows_strides(y), gate.stride(0), shift.stride(0), scale.stride(0),
        eps,
        NORM=norm, GATE=gated, HAS_BIAS=has_bias, PREFETCH=PREFETCH, RMS=norm and rms, SHIFT=norm and has_shift,
        HAS_WEIGHT=norm and has_weight,
        BLOCK_R=block_r, **col_tiles, COMPUTE=_tl(ct), ROUND_BF16=interpreting(), num_warps=num_warps,
    )


def _launch_bwd(mode, dh, dxo, xn, y, gate, scale, mean, rstd, dx, dy, ct, dtypes, bias=None, rms=False,
                weight=None, has_shift=True):
    """Runs the backward kernel; returns the reduced modulation gradients (sum_partials, one launch) in
    the order (dgate,) (dbias [D], summed over B too, when bias is given,) (dshift, when has_shift,) (dscale,)
    (dweight [D], summed over B too, when weight is given); `dtypes` gives theirs, in that order."""
    ref = xn if xn is not None else y
    B, L, D = ref.shape
    norm, gated = mode != GATED, mode != MODULATE
    has_bias = bias is not None
    has_weight = norm and weight is not None
    has_shift = norm and has_shift
    K = int(gated) + int(has_bias) + int(has_shift) + int(norm) + int(has_weight)
    block_r, num_warps, col_tiles = _tile(D, L)
    stand_in = ref
    dh = dh if dh is not None else stand_in
    has_dxo = dxo is not None
    dxo = dxo if has_dxo else stand_in
    xn = xn if xn is not None else stand_in
    y = y if gated else stand_in
    gate = gate if gated else scale
    bias = bias if has_bias else gate
    scale = scale if norm else gate
    weight = weight if has_weight else scale
    mean = mean if norm else stand_in
    rstd = rstd if norm else stand_in
    write_dx = dx is not None
    dx = dx if write_dx else stand_in
    dy = dy if dy is not None else stand_in
    consts = dict(NORM=norm, GATE=gated, HAS_DXO=has_dxo, WRITE_DX=write_dx, K=K, HAS_BIAS=has_bias,
                  PREFETCH=PREFETCH, RMS=norm and rms, SHIFT=has_shift, HAS_WEIGHT=has_weight,
                  BLOCK_R=block_r, **col_tiles,
                  COMPUTE=_tl(ct), ROUND_BF16=interpreting(), num_warps=num_warps)

    def args(part, n_chunks, chunk_rows):
        return (dh, dxo, xn, y, gate, bias, scale, weight, mean, rstd, dx, dy, part,
                L, D, n_chunks, chunk_rows,
                *_rows_strides(dh), *_rows_strides(dxo), *_rows_strides(xn), *_rows_strides(y),
                gate.stride(0), scale.stride(0))

    key = (mode, has_dxo, write_dx, has_bias, consts["RMS"], has_shift, has_weight, PREFETCH, block_r,
           *col_tiles.values(), num_warps, ct,
           *(t.dtype for t in (dh, dxo, xn, y, gate, bias, scale, weight, dx, dy)), ref.device.type)
    probe = torch.empty((B, 1, K, D), dtype=ct, device=ref.device)
    regs = _regs_of(_adaln_bwd_kernel, key, args(probe, 1, L), (B,), consts)
    chunk_rows, n_chunks = _chunking(B, L, block_r, num_warps, regs, ref.device)
    part = _empty((B, n_chunks, K, D), ct, ref.device)
    _adaln_bwd_kernel[(B * n_chunks,)](*args(part, n_chunks, chunk_rows), **consts)
    totals = (False,) * int(gated) + (True,) * int(has_bias) + (False,) * (int(has_shift) + int(norm)) + (
        True,) * int(has_weight)
    return sum_partials(part, dtypes, totals=totals)


def _opt(t):
    return None if t is None else _unit_last(t)


def _present(*tensors):
    return tuple(t for t in tensors if t is not None)


def adaln_modulate_fwd(x, shift, scale, eps: float, h_dtype=None, rms: bool = False, weight=None):
    """h = norm(x) * weight * (1 + scale) + shift; returns (h, mean, rstd), statistics [B, L] in the compute
    dtype. norm: LayerNorm without affine, or RMSNorm with rms (mean saved as 0; the normalized row is rounded
    to x's dtype before the gain, as LightningDiT's RMSNorm does); weight [D] (the norm's gain) or None;
    shift None for the scale-only adaLN."""
    x, shift, scale, weight = _unit_last(x), _opt(shift), _unit_last(scale), _opt(weight)
    B, L, D = x.shape
    ct = compute_dtype(x, scale, *_present(shift, weight))
    h = _empty((B, L, D), h_dtype or x.dtype, x.device)
    mean = _empty((B, L), ct, x.device)
    rstd = _empty((B, L), ct, x.device)
    if h.numel() == 0:
        return h, mean.zero_(), rstd.zero_()
    _launch_fwd(MODULATE, x, None, None, shift, scale, eps, None, h, mean, rstd, rms=rms, weight=weight)
    return h, mean, rstd


def _norm_grads(sums, shift_dtype, weight):
    """(dshift or None, dscale, (dweight,) when weight) from the norm's tail of _launch_bwd's sums."""
    tail = list(sums)
    dweight = (tail.pop(),) if weight is not None else ()
    dscale = tail.pop()
    dshift = tail.pop() if shift_dtype is not None else None
    return dshift, dscale, dweight


def _zero_norm_grads(B, D, ct, device, shift_dtype, scale, weight):
    zeros = torch.zeros((B, D), dtype=ct, device=device)
    dweight = (torch.zeros((D,), dtype=weight.dtype, device=device),) if weight is not None else ()
    return None if shift_dtype is None else zeros.to(shift_dtype), zeros.to(scale.dtype), dweight


def adaln_modulate_bwd(dh, x, scale, mean, rstd, shift_dtype, rms: bool = False, weight=None):
    """(dx, dshift, dscale) of adaln_modulate given dh, and dweight [D] appended when weight is given;
    dshift is None when shift_dtype is (no shift). Modulation gradients reduced over L deterministically."""
    dh, x, scale, weight = _unit_last(dh), _unit_last(x), _unit_last(scale), _opt(weight)
    B, L, D = x.shape
    ct = mean.dtype
    dx = _empty((B, L, D), x.dtype, x.device)
    if dx.numel() == 0:
        dshift, dscale, dweight = _zero_norm_grads(B, D, ct, x.device, shift_dtype, scale, weight)
        return (dx, dshift, dscale, *dweight)
    dtypes = _present(shift_dtype, scale.dtype, None if weight is None else weight.dtype)
    sums = _launch_bwd(MODULATE, dh, None, x, None, None, scale, mean, rstd, dx, None, ct, dtypes, rms=rms,
                       weight=weight, has_shift=shift_dtype is not None)
    dshift, dscale, dweight = _norm_grads(sums, shift_dtype, weight)
    return (dx, dshift, dscale, *dweight)


def _bias_or_none(bias):
    return None if bias is None else _unit_last(bias)


def _bias_grad(total, bias, D, device):
    """dbias [D] (bias.dtype): the kernels' total of dy over B and L, zeros without one, or None without a bias."""
    if bias is None:
        return None
    return torch.zeros((D,), dtype=bias.dtype, device=device) if total is None else total


def gated_residual_fwd(x, y, gate, bias=None):
    """x + gate * (y + bias) in x.dtype (bias [D] or None)."""
    x, y, gate, bias = _unit_last(x), _unit_last(y), _unit_last(gate), _bias_or_none(bias)
    B, L, D = x.shape
    out = _empty((B, L, D), x.dtype, x.device)
    if out.numel() == 0:
        return out
    _launch_fwd(GATED, x, y, gate, None, None, 0.0, out, None, None, None, bias)
    return out


def gated_residual_bwd(dout, y, gate, bias=None):
    """(dy, dgate, dbias) of gated_residual given dout (dx is dout itself, cast to x.dtype by the caller);
    dbias is None without a bias."""
    dout, y, gate, bias = _unit_last(dout), _unit_last(y), _unit_last(gate), _bias_or_none(bias)
    B, L, D = y.shape
    ct = compute_dtype(dout, y, gate, *((bias,) if bias is not None else ()))
    dy = _empty((B, L, D), y.dtype, y.device)
    if dy.numel() == 0:
        return dy, torch.zeros((B, D), dtype=gate.dtype, device=y.device), _bias_grad(None, bias, D, y.device)
    sums = _launch_bwd(GATED, None, dout, None, y, gate, None, None, None, None, dy, ct,
                       (gate.dtype,) + ((bias.dtype,) if bias is not None else ()), bias)
    return dy, sums[0], _bias_grad(sums[1] if bias is not None else None, bias, D, y.device)


def gated_residual_adaln_fwd(x, y, gate, shift, scale, eps: float, h_dtype=None, bias=None, rms: bool = False,
                             weight=None):
    """(x_out, h, mean, rstd): x_out = x + gate * (y + bias) (x.dtype), h = adaln_modulate(x_out, shift, scale,
    rms=rms, weight=weight), one pass."""
    x, y, bias = _unit_last(x), _unit_last(y), _bias_or_none(bias)
    gate, shift, scale, weight = _unit_last(gate), _opt(shift), _unit_last(scale), _opt(weight)
    B, L, D = x.shape
    ct = compute_dtype(x, y, gate, scale, *_present(shift, bias, weight))
    x_out = _empty((B, L, D), x.dtype, x.device)
    h = _empty((B, L, D), h_dtype or x.dtype, x.device)
    mean = _empty((B, L), ct, x.device)
    rstd = _empty((B, L), ct, x.device)
    if h.numel() == 0:
        return x_out, h, mean.zero_(), rstd.zero_()
    _launch_fwd(FUSED, x, y, gate, shift, scale, eps, x_out, h, mean, rstd, bias, rms=rms, weight=weight)
    return x_out, h, mean, rstd


def gated_residual_adaln_bwd(dx_out, dh, x_out, y, gate, scale, mean, rstd, shift_dtype, bias=None, rms: bool = False,
                             weight=None):
    """(dx, dy, dgate, dshift, dscale, dbias) of gated_residual_adaln in one pass, and dweight [D] appended when
    weight is given; dx_out and/or dh may be None; dbias is None without a bias, dshift None when shift_dtype
    is (no shift).

    total = dx_out + LayerNorm-modulate backward of dh; dx = total, dy = total * gate,
    dgate = sum_L total * (y + bias), dshift = sum_L dh, dscale = sum_L dh * xhat, dbias = sum_B,L dy
    (deterministic reductions).
    """
    x_out, y, gate, scale = _unit_last(x_out), _unit_last(y), _unit_last(gate), _unit_last(scale)
    bias, weight = _bias_or_none(bias), _opt(weight)
    B, L, D = x_out.shape
    ct = mean.dtype
    dev = x_out.device
    if (dx_out is None and dh is None) or x_out.numel() == 0:
        dshift, dscale, dweight = _zero_norm_grads(B, D, ct, dev, shift_dtype, scale, weight)
        return (torch.zeros_like(x_out), torch.zeros_like(y, memory_format=torch.contiguous_format),
                torch.zeros((B, D), dtype=gate.dtype, device=dev), dshift, dscale, _bias_grad(None, bias, D, dev),
                *dweight)
    dx_out = None if dx_out is None else _unit_last(dx_out)
    dx = _empty((B, L, D), x_out.dtype, dev)
    dy = _empty((B, L, D), y.dtype, dev)
    bias_dt = (bias.dtype,) if bias is not None else ()
    if dh is None:  # no norm gradient: the gated backward with total = dx_out
        sums = _launch_bwd(GATED, None, dx_out, None, y, gate, None, None, None, dx, dy, ct,
                           (gate.dtype,) + bias_dt, bias)
        dshift, dscale, dweight = _zero_norm_grads(B, D, ct, dev, shift_dtype, scale, weight)
        return (dx, dy, sums[0], dshift, dscale, _bias_grad(sums[1] if bias is not None else None, bias, D, dev),
                *dweight)
    dh = _unit_last(dh)
    dtypes = (gate.dtype,) + bias_dt + _present(shift_dtype, scale.dtype, None if weight is None else weight.dtype)
    sums = _launch_bwd(FUSED, dh, dx_out, x_out, y, gate, scale, mean, rstd, dx, dy, ct, dtypes, bias, rms=rms,
                       weight=weight, has_shift=shift_dtype is not None)
    dshift, dscale, dweight = _norm_grads(sums, shift_dtype, weight)
    return (dx, dy, sums[0], dshift, dscale, _bias_grad(sums[1] if bias is not None else None, bias, D, dev),
            *dweight)
