"""kernels/final_layer.py launchers directly: patch 8 (several feature tiles), one-pass statistics at a
large mean, poisoned outputs, against float64 references (forward and every gradient); LightningDiT's norm modes
(RMSNorm, the norm's gain, no shift) as the kernels' flags, and the op routing them to those kernels."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import dit_fast.ops as ops
from dit_fast import backends
from dit_fast.ops import torch_backend as tb
from tolerances import assert_close, poison_

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6

ok, why = backends.probe("triton", DEVICE)
pytestmark = pytest.mark.skipif(not ok, reason=f"triton backend unavailable on {DEVICE}: {why}")


def _inputs(B, p, C, side, D, mean=0.0, dtype=torch.float32, shift=True, gain=False):
    """(x, shift, scale, weight, bias, norm gain); shift None without one, gain None without one."""
    L = side * side
    x = torch.randn(B, L, D, device=DEVICE) * 2 + mean
    sh = torch.randn(B, D, device=DEVICE) if shift else None
    scale = 0.5 * torch.randn(B, D, device=DEVICE)
    w = torch.randn(p * p * C, D, device=DEVICE) / math.sqrt(D)
    b = torch.randn(p * p * C, device=DEVICE)
    g = 1 + 0.3 * torch.randn(D, device=DEVICE) if gain else None
    return [None if t is None else t.to(dtype) for t in (x, sh, scale, w, b, g)]


def _grads_of(fn, tensors, dout):
    """(out, grads) of fn over the tensors (None entries stay None, without a gradient)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, present, dout.to(out.dtype)))
    return (out, *(None if t is None else next(grads) for t in leaves))


def _reference(x, shift, scale, w, b, g, p, C, dout, norm="layer"):
    """float64 torch backend: (out, dx, dshift, dscale, dweight, dbias, dgain)."""
    def fn(x, sh, sc, w, b, g):
        return tb.final_layer(x, sh, sc, w, b, p, C, EPS, norm, g)

    return _grads_of(fn, [None if t is None else t.double() for t in (x, shift, scale, w, b, g)], dout.double())


def _eager(x, shift, scale, w, b, g, p, C, dout, norm="layer"):
    """The published composition at the inputs' precision (bounds the low-precision error): nn.LayerNorm, or
    LightningDiT's RMSNorm (float32 math, type_as(x), then the gain), modulate, linear, unpatchify."""
    def fn(x, sh, sc, w, b, g):
        if norm == "rms":
            xf = x.float()
            n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).type_as(x)
        else:
            n = F.layer_norm(x, x.shape[-1:], eps=EPS)
        if g is not None:
            n = n * g
        h = n * (1 + sc.unsqueeze(1))
        if sh is not None:
            h = h + sh.unsqueeze(1)
        return tb.unpatchify(F.linear(h, w, b), p, C)

    return _grads_of(fn, (x, shift, scale, w, b, g), dout)


def _run_kernels(x, shift, scale, w, b, g, p, C, dout, norm="layer"):
    """The launchers with every output NaN-poisoned before they write it (out and dx here, the summed
    modulation and gain gradients by the poison hook)."""
    from dit_fast.kernels import adaln
    from dit_fast.kernels import final_layer as fl

    B, L, _ = x.shape
    side = math.isqrt(L)
    rms = norm == "rms"
    out = poison_(torch.empty(B, C, side * p, side * p, device=DEVICE, dtype=w.dtype))
    dx = poison_(torch.empty_like(x))
    with adaln.poison_outputs():
        fl.final_layer_fwd(x, shift, scale, w, b, p, C, EPS, out=out, rms=rms, norm_weight=g)
        grads = fl.final_layer_bwd(dout.to(out.dtype), x, shift, scale, w, p, C, EPS, need_weight=True, dx_out=dx,
                                   rms=rms, norm_weight=g)
    return (out, *grads)


NAMES = ("out", "dx", "dshift", "dscale", "dweight", "dbias", "dgain")


def _check(got, ref, dtype, low=None, what=""):
    low = low if low is not None else [None] * len(NAMES)
    for name, o, r, e in zip(NAMES, got, ref, low):
        if r is None:  # no shift / no gain: nothing computed
            assert o is None, f"{what} {name}: expected None (input absent), got a tensor"
            continue
        assert o.dtype == r.dtype if dtype == torch.float64 else True
        assert_close(o, r, dtype, eager_lowp=e, name=f"{what} final_layer {name}")


# (B, p, C_out, side, D): patch 8 gives NF = 256 / 512 features (2 / 4 feature tiles); L = 1 and 4;
# D not a power of two and not a multiple of 16.
@pytest.mark.parametrize("B,p,C,side,D", [(1, 8, 8, 1, 72), (2, 8, 4, 2, 200), (1, 4, 8, 2, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_final_layer_kernels_patch8(B, p, C, side, D, dtype):
    base = _inputs(B, p, C, side, D, mean=3.0, dtype=dtype)
    dout = torch.randn(B, C, side * p, side * p, device=DEVICE)
    low = _eager(*base, p, C, dout) if dtype != torch.float32 else None
    _check(_run_kernels(*base, p, C, dout), _reference(*base, p, C, dout), dtype, low)


def test_final_layer_kernels_large_mean_float32():
    """Rows with mean 1e4, std 2: the pivoted one-pass statistics keep float32 accuracy (a plain
    sum / sum-of-squares variance would lose everything; an unpivoted mean ~1e-4 of the std)."""
    p, C = 2, 4
    base = _inputs(2, p, C, 3, 1152, mean=1e4)
    dout = torch.randn(2, C, 3 * p, 3 * p, device=DEVICE)
    _check(_run_kernels(*base, p, C, dout), _reference(*base, p, C, dout), torch.float32)


def test_final_layer_kernels_autocast_dtypes():
    """fp32 x and modulation with bf16 weights (autocast): output and weight grads in bf16."""
    p, C, side, D = 8, 4, 1, 72
    x, shift, scale, w, b, _ = _inputs(2, p, C, side, D)
    w16, b16 = w.to(torch.bfloat16), b.to(torch.bfloat16)
    dout = torch.randn(2, C, side * p, side * p, device=DEVICE)
    got = _run_kernels(x, shift, scale, w16, b16, None, p, C, dout)
    ref = _reference(x, shift, scale, w16, b16, None, p, C, dout.to(torch.bfloat16))
    for name, g, r in zip(NAMES, got, ref):
        if r is None:
            continue
        # h and dY are rounded to bf16 before the GEMMs: bf16-level error everywhere
        assert torch.isfinite(g).all(), f"{name}: non-finite values"
        assert (g.double() - r).norm() <= 2e-2 * r.norm(), f"{name}: {(g.double() - r).norm() / r.norm():.3e}"


# ------------------------------------------------------------------------------------ norm modes
# (norm, shift, gain): LightningDiT's final layer (RMSNorm with its gain; with a shift, and scale-only), RMSNorm
# without a gain, and LayerNorm with a gain and no shift (each flag on its own against the LayerNorm default).
MODES = [("rms", True, True), ("rms", False, True), ("rms", True, False), ("layer", False, True)]
# (B, p, C, side, D): LightningDiT-XL/1's head (patch 1, 32 channels) at L = 1 and D = 72; patch 2 at L = 9 with
# D = 40 (one masked column tile); patch 8 (4 feature tiles in the backward's dh loop) at L = 4, D = 200
MODE_SHAPES = [(1, 1, 32, 1, 72), (2, 2, 3, 3, 40), (2, 8, 8, 2, 200)]


@pytest.mark.parametrize("B,p,C,side,D", MODE_SHAPES)
@pytest.mark.parametrize("norm,shift,gain", MODES)
def test_norm_modes_float32(norm, shift, gain, B, p, C, side, D):
    base = _inputs(B, p, C, side, D, mean=0.0 if norm == "rms" else 3.0, shift=shift, gain=gain)
    dout = torch.randn(B, C, side * p, side * p, device=DEVICE)
    _check(_run_kernels(*base, p, C, dout, norm), _reference(*base, p, C, dout, norm), torch.float32, what=norm)


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("B,p,C,side,D", MODE_SHAPES[:2])
def test_rms_bfloat16(B, p, C, side, D, shift):
    """bf16 x: n is rounded to bf16 before the gain (LightningDiT's type_as), h to bf16 before the GEMM."""
    base = _inputs(B, p, C, side, D, dtype=torch.bfloat16, shift=shift, gain=True)
    dout = torch.randn(B, C, side * p, side * p, device=DEVICE)
    low = _eager(*base, p, C, dout, "rms")
    _check(_run_kernels(*base, p, C, dout, "rms"), _reference(*base, p, C, dout, "rms"), torch.bfloat16, low, "rms")


def test_rms_rounds_the_normalized_row_to_x_dtype():
    """With bf16 x and float32 weights, the output differs from the unrounded RMSNorm by the bf16 rounding of
    n and equals the torch backend's (which rounds there) to float32 accuracy: a kernel that skipped the rounding
    would fail the second check by ~1e-3."""
    from dit_fast.kernels import final_layer as fl

    x, _, scale, w, b, g = _inputs(2, 2, 3, 3, 40, shift=False, gain=True)
    x16 = x.to(torch.bfloat16)
    got = fl.final_layer_fwd(x16, None, scale, w, b, 2, 3, EPS, rms=True, norm_weight=g)

    def reference(x):  # the torch backend's h (float32 math; n rounded to x's dtype), then a float64 GEMM
        h = tb.adaln_modulate(x, None, scale, EPS, torch.float64, "rms", g)
        return tb.unpatchify(F.linear(h, w.double(), b.double()), 2, 3)

    rounded, unrounded = reference(x16), reference(x16.float())
    assert (rounded - unrounded).norm() > 1e-4 * unrounded.norm()
    assert_close(got, rounded, torch.float32, name="rms out, n rounded to bf16")


def test_norm_modes_backward_is_deterministic():
    from dit_fast.kernels import final_layer as fl

    x, _, sc, w, _, g = _inputs(3, 2, 4, 4, 72, shift=False, gain=True)
    dout = torch.randn(3, 4, 8, 8, device=DEVICE)
    first = fl.final_layer_bwd(dout, x, None, sc, w, 2, 4, EPS, rms=True, norm_weight=g)
    second = fl.final_layer_bwd(dout, x, None, sc, w, 2, 4, EPS, rms=True, norm_weight=g)
    assert first[1] is None and second[1] is None  # no shift, no d(shift)
    for a, b in zip(first, second):
        assert a is None or torch.equal(a, b)


# ------------------------------------------------------------------------------- through the op


def test_api_runs_the_modes_in_the_fused_kernels(monkeypatch):
    """dit_fast.ops.final_layer(norm="rms", norm_weight=..., shift=None, backend="triton") launches the final
    layer's own kernels, forward and backward (counted), and not the adaLN kernel + F.linear composition (made to
    raise); with and without grad; results against float64."""
    from dit_fast.kernels import final_layer as fl
    from dit_fast.ops import triton_adaln

    calls = {"fwd": 0, "bwd": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            assert kwargs.get("rms") is True and kwargs.get("norm_weight") is not None
            return fn(*args, **kwargs)
        return wrapper

    def refuse(*args, **kwargs):
        raise AssertionError("the final layer's norm modes ran through the adaLN kernel (the old fallback)")

    monkeypatch.setattr(fl, "final_layer_fwd", counted("fwd", fl.final_layer_fwd))
    monkeypatch.setattr(fl, "final_layer_bwd", counted("bwd", fl.final_layer_bwd))
    monkeypatch.setattr(triton_adaln, "adaln_modulate", refuse)
    p, C = 2, 3
    x, _, scale, w, b, g = _inputs(2, p, C, 3, 40, shift=False, gain=True)
    dout = torch.randn(2, C, 3 * p, 3 * p, device=DEVICE)

    def api(x, sh, sc, w, b, g):
        return ops.final_layer(x, sh, sc, w, b, p, C, EPS, norm="rms", norm_weight=g, backend="triton")

    with torch.no_grad():
        plain = api(x, None, scale, w, b, g)
    assert calls == {"fwd": 1, "bwd": 0}
    got = _grads_of(api, (x, None, scale, w, b, g), dout)
    assert calls == {"fwd": 2, "bwd": 1}
    ref = _reference(x, None, scale, w, b, g, p, C, dout, "rms")
    assert_close(plain, ref[0], torch.float32, name="no-grad out")
    _check(got, ref, torch.float32, what="api rms")


def test_api_autocast_rms_gain_dtypes():
    """Under autocast (bf16) with float32 x, parameters and gain: output in bf16, every gradient in its input's
    dtype, d(gain) included, against float64 at bf16's level (h and dY are rounded to bf16 before the GEMMs)."""
    p, C = 1, 32
    x, sh, scale, w, b, g = _inputs(2, p, C, 2, 72, shift=True, gain=True)
    dout = torch.randn(2, C, 2, 2, device=DEVICE)

    def api(x, sh, sc, w, b, g):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            return ops.final_layer(x, sh, sc, w, b, p, C, EPS, norm="rms", norm_weight=g, backend="triton")

    got = _grads_of(api, (x, sh, scale, w, b, g), dout)
    ref = _reference(x, sh, scale, w.bfloat16(), b.bfloat16(), g, p, C, dout.bfloat16().float(), "rms")
    assert got[0].dtype == torch.bfloat16
    for name, o, r, t in zip(NAMES, got, ref, (None, x, sh, scale, w, b, g)):
        assert t is None or o.dtype == t.dtype, f"{name}: {o.dtype}, input {t.dtype}"
        assert torch.isfinite(o).all(), f"{name}: non-finite values"
        assert (o.double() - r).norm() <= 2e-2 * r.norm(), f"{name}: {(o.double() - r).norm() / r.norm():.3e}"


def test_registered_ops_opcheck_modes():
    """Schema, fake kernels and autograd registration of the mode arguments (no shift, RMS, a gain)."""
    import dit_fast.ops.triton_embed  # noqa: F401 (registers the ops)

    x, sh, sc, w, b, g = _inputs(2, 2, 3, 2, 40, shift=True, gain=True)
    fwd, bwd = torch.ops.dit_fast_triton.final_layer_fwd.default, torch.ops.dit_fast_triton.final_layer_bwd.default
    req = [t.requires_grad_() for t in (x, sc, w, g)]
    torch.library.opcheck(fwd, (req[0], None, req[1], req[2], b, 2, 3, EPS, True, req[3]))
    torch.library.opcheck(fwd, (req[0], sh.requires_grad_(), req[1], req[2], None, 2, 3, EPS, False, req[3]))
    dout = torch.randn(2, 3, 4, 4, device=DEVICE)
    detached = [t.detach() for t in (x, sc, w, g)]
    torch.library.opcheck(bwd, (dout, detached[0], None, detached[1], detached[2], 2, 3, EPS, True, True, detached[3]))
    torch.library.opcheck(bwd, (dout, detached[0], sh.detach(), detached[1], detached[2], 2, 3, EPS, False, False))


def test_compile_fullgraph_and_double_backward_rms():
    """torch.compile (fullgraph, aot_eager: the registered ops and their fake kernels) matches eager; a gradient
    penalty (create_graph=True) takes the differentiable backward with the modes and matches the torch backend."""
    p, C = 1, 32
    x, _, scale, w, b, g = _inputs(2, p, C, 2, 40, shift=False, gain=True)
    leaves = [t.requires_grad_() for t in (x, scale, w, b, g)]

    def f(x, sc, w, b, g, backend="triton"):
        return ops.final_layer(x, None, sc, w, b, p, C, EPS, norm="rms", norm_weight=g, backend=backend).square().sum()

    want = f(*leaves)
    want_grads = torch.autograd.grad(want, leaves)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves)
    for a, e in zip(torch.autograd.grad(got, leaves), want_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)

    def penalty(backend, leaves):
        grads = torch.autograd.grad(f(*leaves, backend=backend), leaves, create_graph=True)
        return torch.autograd.grad(sum(gr.square().sum() for gr in grads), leaves)

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    names = ("x", "scale", "weight", "bias", "gain")
    for name, a, e in zip(names, penalty("triton", leaves), penalty("torch", leaves64)):
        assert_close(a, e, torch.float32, name=f"gradient penalty's d{name}")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy, on purpose
def test_rms_overflowing_row_is_nan():
    """A token whose squares overflow float32 (|x| ~ 1e20) gets NaN output and d x in RMS mode too, as in
    LayerNorm mode (common.inv_std), not the finite `shift`-only value 1 / sqrt(inf) = 0 would give; the other
    tokens stay finite."""
    p, C, side = 1, 4, 2
    x, _, scale, w, b, g = _inputs(2, p, C, side, 40, shift=False, gain=True)
    x[1, 2] = 1e20
    x.requires_grad_()
    out = ops.final_layer(x, None, scale, w, b, p, C, EPS, norm="rms", norm_weight=g, backend="triton")
    huge = torch.zeros(2, side, side, dtype=torch.bool, device=DEVICE)
    huge[1, 1, 0] = True  # token 2 of image 1 is pixel (1, 0) at patch 1
    pixels = out.permute(0, 2, 3, 1)  # [B, H, W, C]
    assert pixels[huge].isnan().all() and pixels[~huge].isfinite().all()
    (dx,) = torch.autograd.grad(out, x, torch.randn_like(out))
    assert dx[1, 2].isnan().all()
    assert dx[0].isfinite().all() and dx[1, [0, 1, 3]].isfinite().all()
