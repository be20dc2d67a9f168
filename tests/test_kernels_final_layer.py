"""kernels/final_layer.py launchers directly: patch 8 (several feature tiles), one-pass statistics at a
large mean, poisoned outputs, against float64 references (forward and every gradient)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dit_fast import backends
from dit_fast.ops import torch_backend as tb
from tolerances import assert_close, poison_

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6

ok, why = backends.probe("triton", DEVICE)
pytestmark = pytest.mark.skipif(not ok, reason=f"triton backend unavailable on {DEVICE}: {why}")


def _inputs(B, p, C, side, D, mean=0.0, dtype=torch.float32):
    L = side * side
    x = torch.randn(B, L, D, device=DEVICE) * 2 + mean
    shift, scale = torch.randn(B, D, device=DEVICE), 0.5 * torch.randn(B, D, device=DEVICE)
    w = torch.randn(p * p * C, D, device=DEVICE) / math.sqrt(D)
    b = torch.randn(p * p * C, device=DEVICE)
    return [t.to(dtype) for t in (x, shift, scale, w, b)]


def _reference(x, shift, scale, w, b, p, C, dout):
    """float64 torch backend: (out, dx, dshift, dscale, dweight, dbias)."""
    leaves = [t.detach().double().requires_grad_() for t in (x, shift, scale, w, b)]
    out = tb.final_layer(*leaves, p, C, EPS)
    return (out, *torch.autograd.grad(out, leaves, dout.double()))


def _eager(x, shift, scale, w, b, p, C, dout):
    """PyTorch's own composition at the inputs' precision (bounds the low-precision error)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, shift, scale, w, b)]
    xs, sh, sc, ww, bb = leaves
    h = F.layer_norm(xs, xs.shape[-1:], eps=EPS) * (1 + sc.unsqueeze(1)) + sh.unsqueeze(1)
    out = tb.unpatchify(F.linear(h, ww, bb), p, C)
    return (out, *torch.autograd.grad(out, leaves, dout.to(out.dtype)))


def _run_kernels(x, shift, scale, w, b, p, C, dout):
    from dit_fast.kernels import final_layer as fl

    B, L, _ = x.shape
    side = math.isqrt(L)
    out = poison_(torch.empty(B, C, side * p, side * p, device=DEVICE, dtype=w.dtype))
    fl.final_layer_fwd(x, shift, scale, w, b, p, C, EPS, out=out)
    dx = poison_(torch.empty_like(x))
    grads = fl.final_layer_bwd(dout.to(out.dtype), x, shift, scale, w, p, C, EPS, need_weight=True, dx_out=dx)
    return (out, *grads)


NAMES = ("out", "dx", "dshift", "dscale", "dweight", "dbias")


# (B, p, C_out, side, D): patch 8 gives NF = 256 / 512 features (2 / 4 feature tiles); L = 1 and 4;
# D not a power of two and not a multiple of 16.
@pytest.mark.parametrize("B,p,C,side,D", [(1, 8, 8, 1, 72), (2, 8, 4, 2, 200), (1, 4, 8, 2, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_final_layer_kernels_patch8(B, p, C, side, D, dtype):
    base = _inputs(B, p, C, side, D, mean=3.0, dtype=dtype)
    dout = torch.randn(B, C, side * p, side * p, device=DEVICE)
    got = _run_kernels(*base, p, C, dout)
    ref = _reference(*base, p, C, dout)
    low = _eager(*base, p, C, dout) if dtype != torch.float32 else [None] * len(NAMES)
    for name, g, r, e in zip(NAMES, got, ref, low):
        assert_close(g, r, dtype, eager_lowp=e, name=f"final_layer {name}")


def test_final_layer_kernels_large_mean_float32():
    """Rows with mean 1e4, std 2: the pivoted one-pass statistics keep float32 accuracy (a plain
    sum / sum-of-squares variance would lose everything; an unpivoted mean ~1e-4 of the std)."""
    p, C = 2, 4
    base = _inputs(2, p, C, 3, 1152, mean=1e4)
    dout = torch.randn(2, C, 3 * p, 3 * p, device=DEVICE)
    got = _run_kernels(*base, p, C, dout)
    ref = _reference(*base, p, C, dout)
    for name, g, r in zip(NAMES, got, ref):
        assert_close(g, r, torch.float32, name=f"final_layer {name}")


def test_final_layer_kernels_autocast_dtypes():
    """fp32 x and modulation with bf16 weights (autocast): output and weight grads in bf16."""
    p, C, side, D = 8, 4, 1, 72
    x, shift, scale, w, b = _inputs(2, p, C, side, D)
    w16, b16 = w.to(torch.bfloat16), b.to(torch.bfloat16)
    dout = torch.randn(2, C, side * p, side * p, device=DEVICE)
    got = _run_kernels(x, shift, scale, w16, b16, p, C, dout)
    ref = _reference(x, shift, scale, w16, b16, p, C, dout.to(torch.bfloat16))
    for name, g, r in zip(NAMES, got, ref):
        # h and dY are rounded to bf16 before the GEMMs: bf16-level error everywhere
        assert torch.isfinite(g).all(), f"{name}: non-finite values"
        assert (g.double() - r).norm() <= 2e-2 * r.norm(), f"{name}: {(g.double() - r).norm() / r.norm():.3e}"
