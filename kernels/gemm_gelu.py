"""fc1 as one Triton GEMM whose epilogue adds the bias and applies GELU(tanh): out = GELU(x @ W^T + b).

An opt-in alternative (DIT_FAST_FC1_GEMM=triton, dit_fast/ops/triton_embed.py) to cuBLAS + the
elementwise pass of gelu.py: the [M, N] pre-activation is never written and read back just to add the
bias and apply GELU. When a gradient is needed the kernel also stores pre = x @ W^T (without the bias, in
x's dtype), exactly what the default path saves, so the backward (gelu.gelu_tanh_bwd on (dout, pre, bias),
then the two GEMMs) is the same for both paths.

Dtypes: x is float16, bfloat16 or float32 (the activation dtype); W and the bias are read as stored, in any
of those dtypes. Under autocast W is the float32 parameter: each W tile is cast to x's dtype in registers
before tl.dot, so no [N, K] copy of the weight is made per call. Accumulation, bias and GELU are float32,
one rounding on store; out and pre have x's dtype. float32 x multiplies in exact float32
(input_precision="ieee", no TF32), as this project's float32 results must match float64 to 1e-5.

Tiles: a fixed heuristic per (shape, dtypes, GPU), never autotuning (it times on the GPU, so the chosen
config, and with it the rounding of a reduction, would differ from run to run and machine to machine).
Programs are ordered in groups of GROUP_M row tiles that sweep the column tiles together, so that the W
tiles they share are read from L2. Rows and columns past M and N re-read the first ones (in bounds:
no load masks in the K loop) and are not stored; K needs a mask only when it is not a multiple of BLOCK_K.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import cast_for, dot_acc, empty, interpreting, n_sm
from .gelu import _sigmoid_2u

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class GemmTiles:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


# GPU configs: one table for sm_80 and sm_90, so every config must fit sm_80's 166,912 B of shared memory
# (scripts/check_triton_compile.py compiles each launch for both; at 128 x 128 x 64 with 16-bit tiles a
# stage takes 32 KB; the float32 W of autocast gets one stage fewer).
_HALF_TILES = GemmTiles(128, 128, 64, 8, 8, 4)
_HALF_X_FP32_W_TILES = GemmTiles(128, 128, 64, 8, 8, 3)
# Fewer rows per tile when 128-row tiles leave SMs idle (batch-1 sampling: M = 256).
_HALF_SMALL_M_TILES = GemmTiles(64, 128, 64, 8, 4, 4)
_HALF_SMALL_M_FP32_W_TILES = GemmTiles(64, 128, 64, 8, 4, 3)
# Row strides (K) not known to be multiples of 16 elements: the loads are scalar, each element with its own
# 64-bit address, and the tiles above then spill (K = 72 at 64 x 128 x 64: 255 registers + 232 B of stack).
_HALF_UNALIGNED_TILES = GemmTiles(64, 64, 32, 8, 4, 3)
# float32 x: "ieee" dots run on the FMA units, not tensor cores; short K steps keep the operand tiles small.
_FP32_TILES = GemmTiles(64, 128, 32, 8, 8, 3)
# Interpreter: few, large programs (each program costs Python time); small enough for tests to cover
# partial tiles in every dimension.
_INTERPRETER_TILES = GemmTiles(32, 64, 32, 4, 4, 1)


def choose_tiles(
    M: int, N: int, K: int, x_dtype: torch.dtype, w_dtype: torch.dtype, device: torch.device
) -> GemmTiles:
    """The tile config for an [M, K] x [K, N] product: a deterministic function of the shape, dtypes and GPU."""
    if device.type != "cuda":
        return _INTERPRETER_TILES
    if x_dtype == torch.float32:
        return _FP32_TILES
    if K % 16:  # Triton's launcher marks an integer (the row stride) divisible by 16 or not at all
        return _HALF_UNALIGNED_TILES
    wide_w = w_dtype == torch.float32
    big = _HALF_X_FP32_W_TILES if wide_w else _HALF_TILES
    if triton.cdiv(M, big.block_m) * triton.cdiv(N, big.block_n) < n_sm(device):
        return _HALF_SMALL_M_FP32_W_TILES if wide_w else _HALF_SMALL_M_TILES
    return big


@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program pid: consecutive programs walk down a group of GROUP_M row tiles,
    then to the next column tile, so programs running together share their W (and x) tiles in L2."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    in_group = pid % per_group
    return first_m + in_group % group_rows, in_group // group_rows


@triton.jit
def _linear_bias_gelu_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, pre_ptr,
    M, N, K, sxm, swn,
    HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # int64 row offsets: M * K and M * N pass 2^31 at large batches
    x_ptrs = x_ptr + (rows % M).to(tl.int64)[:, None] * sxm + ks[None, :]
    w_ptrs = w_ptr + (cols % N).to(tl.int64)[None, :] * swn + ks[:, None]  # a [BLOCK_K, BLOCK_N] tile of W^T

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_left = K - k0
            a = tl.load(x_ptrs, mask=ks[None, :] < k_left, other=0.0)
            w = tl.load(w_ptrs, mask=ks[:, None] < k_left, other=0.0)
        acc += dot_acc(a, cast_for(w, x_ptr, INTERPRET), INTERPRET)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    cmask = cols < N
    mask = (rows < M)[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    if STORE_PRE:
        tl.store(pre_ptr + offs, cast_for(acc, pre_ptr, INTERPRET), mask=mask)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs, cast_for(acc * _sigmoid_2u(acc), out_ptr, INTERPRET), mask=mask)


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1 or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must have shape [N, {x.shape[-1] if x.dim() else '?'}] for x of shape "
                         f"{list(x.shape)}, got {list(weight.shape)}")
    tensors = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    for name, t in tensors.items():
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on {x.device} like x, got {t.device}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {list(bias.shape)}")


def _unit_stride_last(t: torch.Tensor) -> torch.Tensor:
    # the kernel steps along K with unit stride; rows may have any stride
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def linear_bias_gelu_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    need_pre: bool = True,
    tiles: GemmTiles | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, pre) for x [..., K], weight [N, K], bias [N] or None: out = GELU_tanh(x @ W^T + bias) and, with
    need_pre, pre = x @ W^T (no bias), both [..., N] in x's dtype; without need_pre, pre is an empty tensor
    and is not written. `tiles` overrides choose_tiles (tests run the GPU configs under the interpreter)."""
    _check_inputs(x, weight, bias)
    K, N = x.shape[-1], weight.shape[0]
    lead = x.shape[:-1]
    M = lead.numel()
    x2 = _unit_stride_last(x.reshape(M, K))
    weight = _unit_stride_last(weight)
    out = empty((M, N), x.dtype, x.device)
    pre = empty((M, N) if need_pre else (0,), x.dtype, x.device)
    if M and N:
        t = tiles or choose_tiles(M, N, K, x.dtype, weight.dtype, x.device)
        grid = (triton.cdiv(M, t.block_m) * triton.cdiv(N, t.block_n),)
        _linear_bias_gelu_kernel[grid](
            x2, weight, bias.contiguous() if bias is not None else weight, out, pre,
            M, N, K, x2.stride(0), weight.stride(0),
            HAS_BIAS=bias is not None, STORE_PRE=need_pre, EVEN_K=K % t.block_k == 0,
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, GROUP_M=t.group_m,
            INTERPRET=interpreting(), num_warps=t.num_warps, num_stages=t.num_stages,
        )
    return out.view(*lead, N), pre.view(*lead, N) if need_pre else pre
