"""GELU (tanh approximation) forward and backward as elementwise Triton kernels.

fc1's GEMM runs in cuBLAS (F.linear, without its bias); these kernels add the bias and apply the
activation to its output and, in the backward, turn d(out) into d(pre-activation) from the saved GEMM
output and bias and sum it into d(bias) in the same pass. Math in float32 whatever the storage dtypes
(the bias is read as it is stored: no cast of it per call), one rounding on store.

GELU_tanh(x) = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), written as x * sigmoid(2u)
(the same function): exp-based, so it needs no libdevice tanh and runs under the interpreter, and it
saturates cleanly (the exp argument is capped, so never inf * 0 = NaN).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cast_for, chunk_grid, column_chunk, interpreting, row_tile

BLOCK = 1024


@triton.jit
def _sigmoid_2u(x):
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    # exp argument capped: sigmoid(-80) ~ 1e-35 already rounds x * s to 0 (and avoids inf * 0 in the backward)
    return 1.0 / (1.0 + tl.exp(tl.minimum(-2.0 * u, 80.0)))


@triton.jit
def _gelu_tanh_fwd_kernel(
    pre_ptr, bias_ptr, out_ptr, n, N, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, INTERPRET: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:  # the bias row stays in L1/L2: N floats against BLOCK elements of pre
        x += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    y = x * _sigmoid_2u(x)
    tl.store(out_ptr + offs, cast_for(y, out_ptr, INTERPRET), mask=mask)


@triton.jit
def _gelu_tanh_bwd_kernel(
    dout_ptr, pre_ptr, bias_ptr, dpre_ptr, dbias_part_ptr, M, N, rows_per_prog,
    HAS_BIAS: tl.constexpr, HAS_DBIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, INTERPRET: tl.constexpr,
):
    """One program: BN columns of a chunk of rows_per_prog rows of the [M, N] pre-activation. With
    HAS_DBIAS it also writes the chunk's column sums of d(pre) (fc1's d(bias)), so d(bias) costs no
    extra pass over d(pre); the launcher adds the per-chunk partials in a fixed order (deterministic)."""
    pid_c, cols, cmask, row0 = column_chunk(N, rows_per_prog, BN)
    acc = tl.zeros((BN,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    for r in range(0, rows_per_prog, BM):
        rows, m = row_tile(row0 + r, M, cmask, BM)
        offs = rows[:, None] * N + cols[None, :]
        x = tl.load(pre_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += bias[None, :]
        g = tl.load(dout_ptr + offs, mask=m, other=0.0).to(tl.float32)
        s = _sigmoid_2u(x)
        # d/dx [x s(2u)] = s + x * 2 s (1 - s) * du/dx, du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
        dp = cast_for(g * (s + 2.0 * x * s * (1.0 - s) * du), dpre_ptr, INTERPRET)
        tl.store(dpre_ptr + offs, dp, mask=m)
        if HAS_DBIAS:  # sum of d(pre) as stored, like d(x) and d(weight) see it
            acc += tl.sum(tl.where(m, dp.to(tl.float32), 0.0), axis=0)
    if HAS_DBIAS:
        tl.store(dbias_part_ptr + pid_c * N + cols, acc, mask=cmask)


def _grid(n: int):
    return (triton.cdiv(n, BLOCK),)


def _bias_arg(bias: torch.Tensor | None, pre: torch.Tensor) -> torch.Tensor:
    if bias is None:
        return pre  # a stand-in pointer, never read (HAS_BIAS=False)
    N = pre.shape[-1] if pre.dim() else 1
    assert bias.shape == (N,), f"bias must have shape [{N}], got {tuple(bias.shape)}"
    return bias.contiguous()


def gelu_tanh_fwd(
    pre: torch.Tensor, out: torch.Tensor | None = None, *, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """GELU_tanh(pre + bias) into `out` (new tensor of pre's dtype if None; `out=pre` works in place);
    bias [N] broadcasts over pre's last dim, in any float dtype."""
    pre = pre.contiguous()
    if out is None:
        out = torch.empty_like(pre)
    assert out.is_contiguous() and out.shape == pre.shape, "out must be contiguous with pre's shape"
    n = pre.numel()
    if n:
        N = pre.shape[-1] if pre.dim() else 1
        _gelu_tanh_fwd_kernel[_grid(n)](pre, _bias_arg(bias, pre), out, n, N, HAS_BIAS=bias is not None,
                                        BLOCK=BLOCK, INTERPRET=interpreting())
    return out


def _bwd_tiling(M: int, N: int, device: torch.device):
    BN = min(256, max(16, triton.next_power_of_2(N)))
    if device.type == "cuda":
        BM, warps = 32, 8
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # interpreter: few large programs
        BM, warps, target = 64, 4, 4
    return (BM, BN, warps, *chunk_grid(M, N, BM, BN, target))


def gelu_tanh_bwd(dout: torch.Tensor, pre: torch.Tensor, need_bias_grad: bool = False, out: torch.Tensor | None = None,
                  *, bias: torch.Tensor | None = None):
    """(d(pre), d(bias)) of GELU_tanh(pre + bias): d(pre) = dout * GELU_tanh'(pre + bias) in pre's dtype;
    d(bias) = d(pre) summed over all but the last dim, in float32, when need_bias_grad (else None)."""
    dout = dout.contiguous()
    pre = pre.contiguous()
    if out is None:
        out = torch.empty_like(pre)
    assert out.is_contiguous() and out.shape == pre.shape, "out must be contiguous with pre's shape"
    N = pre.shape[-1] if pre.dim() else 1
    M = pre.numel() // max(N, 1)
    if pre.numel() == 0:
        return out, (torch.zeros(N, device=pre.device, dtype=torch.float32) if need_bias_grad else None)
    BM, BN, warps, n_col, n_chunks, rows_per_prog = _bwd_tiling(M, N, pre.device)
    part = torch.empty((n_chunks, N), device=pre.device, dtype=torch.float32) if need_bias_grad else out
    _gelu_tanh_bwd_kernel[(n_col, n_chunks)](
        dout, pre, _bias_arg(bias, pre), out, part, M, N, rows_per_prog,
        HAS_BIAS=bias is not None, HAS_DBIAS=need_bias_grad, BM=BM, BN=BN, INTERPRET=interpreting(), num_warps=warps,
    )
    return out, (part.sum(0) if need_bias_grad else None)
