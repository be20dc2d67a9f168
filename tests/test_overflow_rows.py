"""Rows whose squares overflow the compute dtype (|x| >~ 1e19 in float32) on every backend (issue 19 item 8).

1 / sqrt(inf) = 0 would normalize such a row to exactly `shift`: a finite constant that hides a diverging
activation from every non-finite guard. Every adaLN-family op (adaln_modulate, gated_residual_adaln,
final_layer) must give NaN for that row instead, forward and backward, and leave the other rows exact.
Rows just below the overflow (squares near the float32 maximum) still normalize exactly.
"""
from __future__ import annotations

import pytest
import torch

import dit_fast.ops as ops
from dit_fast import backends
from dit_fast.ops import torch_backend
from tolerances import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6
B, L = 2, 4
HUGE_ROW = (1, 2)  # (batch, token) of the row scaled past the overflow
# The Triton interpreter runs the kernels in numpy, which reports the (intended) overflow
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning")


def need(backend: str, op: str) -> None:
    why = backends.why_not(backend, op, DEVICE)
    if why:
        pytest.skip(f"backend {backend!r} cannot run {op} here: {why}")


def tokens(D, dtype, magnitude):
    x = torch.randn(B, L, D, device=DEVICE)
    x[HUGE_ROW] = x[HUGE_ROW] * magnitude
    return x.to(dtype).requires_grad_()


def mods(D, dtype, n):
    return [(0.5 * torch.randn(B, D, device=DEVICE)).to(dtype).requires_grad_() for _ in range(n)]


def run(op, backend, x, D, dtype, norm="layer"):
    """(h, the differentiable inputs) of `op` with x as the normalized row's source."""
    if op == "adaln_modulate":
        shift, scale = mods(D, dtype, 2)
        return ops.adaln_modulate(x, shift, scale, EPS, norm=norm, backend=backend), [x, shift, scale]
    gate, shift, scale = mods(D, dtype, 3)
    y = torch.randn(B, L, D, device=DEVICE).to(dtype).requires_grad_()
    _, h = ops.gated_residual_adaln(x, y, gate, shift, scale, EPS, norm=norm, backend=backend)
    return h, [x, y, gate, shift, scale]


@pytest.mark.parametrize("norm,dtype", [("layer", torch.float32), ("layer", torch.bfloat16), ("rms", torch.float32)],
                         ids=str)
@pytest.mark.parametrize("D", [72, 1152])  # Triton: one masked tile; a head and a tail tile
@pytest.mark.parametrize("op", ["adaln_modulate", "gated_residual_adaln"])
@pytest.mark.parametrize("backend", ["torch", "triton", "ext"])
def test_overflowing_row_is_nan_forward_and_backward(backend, op, D, norm, dtype):
    need(backend, op)
    x = tokens(D, dtype, 1e20)
    h, inputs = run(op, backend, x, D, dtype, norm)
    others = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    others[HUGE_ROW] = False
    assert h[HUGE_ROW].isnan().all(), f"{backend} {op}: the overflowing row must be NaN, got {h[HUGE_ROW][:4]}"
    assert h[others].isfinite().all(), f"{backend} {op}: the other rows must stay finite"
    h.backward(torch.randn_like(h))
    dx = x.grad
    assert dx[HUGE_ROW].isnan().all(), f"{backend} {op}: d x of the overflowing row must be NaN"
    assert dx[others].isfinite().all(), f"{backend} {op}: d x of the other rows must stay finite"
    # dscale sums dh * xhat over L: the NaN row reaches it (dshift = sum of dh stays finite)
    assert inputs[-1].grad[HUGE_ROW[0]].isnan().all()


@pytest.mark.parametrize("op", ["adaln_modulate", "gated_residual_adaln"])
@pytest.mark.parametrize("backend", ["torch", "triton", "ext"])
def test_row_just_below_the_overflow_is_exact(backend, op):
    """|x| ~ 1e17 at D = 72: squares ~1e34 each, their sum far from the float32 maximum."""
    need(backend, op)
    D, dtype = 72, torch.float32
    torch_seed = torch.initial_seed()
    x = tokens(D, dtype, 1e17)
    torch.manual_seed(torch_seed + 1)
    h, _ = run(op, backend, x, D, dtype)
    torch.manual_seed(torch_seed + 1)
    x64 = x.detach().double().requires_grad_()
    want, _ = run(op, "torch", x64, D, torch.float64)
    assert h.isfinite().all()
    assert_close(h, want, dtype, name=f"{backend} {op} h")


@pytest.mark.parametrize("backend", ["torch", "triton", "ext"])
def test_final_layer_overflowing_row_is_nan(backend):
    need(backend, "final_layer")
    D, p, C = 40, 2, 3
    x = tokens(D, torch.float32, 1e20)
    shift, scale = mods(D, torch.float32, 2)
    w = (0.1 * torch.randn(p * p * C, D, device=DEVICE)).requires_grad_()
    b = torch.randn(p * p * C, device=DEVICE).requires_grad_()
    out = ops.final_layer(x, shift, scale, w, b, p, C, EPS, backend=backend)
    tok = torch_backend.patchify(out, p)  # [B, L, C*p*p]: the token's own output pixels
    assert tok[HUGE_ROW].isnan().all(), f"{backend}: the overflowing token's pixels must be NaN"
    others = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    others[HUGE_ROW] = False
    assert tok[others].isfinite().all()
    out.backward(torch.randn_like(out))
    assert x.grad[HUGE_ROW].isnan().all()
    assert x.grad[others].isfinite().all()
