"""patch_embed, final_layer and linear_gelu_tanh on every backend against float64 references.

Forward and gradients through the public API (dit_fast.ops), low precision judged against PyTorch's own
eager composition in that dtype (conv2d / layer_norm / linear / gelu), NaN-poisoned output buffers for
the Triton launchers, the registered ops under opcheck and torch.compile, and bad-input messages.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import dit_fast.ops as ops
from conftest import DEVICE, TRITON_RUNS, needs_triton
from dit_fast.backends import implements, probe
from dit_fast.ops import torch_backend as tb
from tolerances import FP32_RTOL, assert_close, poison_, rel_err

BACKENDS = ["torch", "triton", "ext"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _skip_unless(backend, op, device=DEVICE):
    ok, why = probe(backend, device)
    if not ok:
        pytest.skip(f"{backend} backend does not run on {device}: {why}")
    if not implements(backend, op):
        pytest.skip(f"{backend} backend has no {op}")


def _leaves(*tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def _run(fn, inputs, grad_out=None):
    """fn(*inputs) and the gradients of <out, grad_out> w.r.t. the inputs that require grad."""
    out = fn(*inputs)
    if grad_out is None:
        grad_out = torch.randn_like(out, dtype=torch.float32)
    wrt = [t for t in inputs if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, wrt, grad_out.to(out.dtype))
    return out, grads, grad_out


def _check_all(name, dtype, out, grads, ref, ref_grads, low, low_grads, grad_names):
    assert out.dtype == (low.dtype if low is not None else out.dtype)
    assert_close(out, ref, dtype, eager_lowp=low, name=f"{name} out")
    for gname, g, r, lg in zip(grad_names, grads, ref_grads, low_grads or [None] * len(grads)):
        assert_close(g, r, dtype, eager_lowp=lg, name=f"{name} d{gname}")


# ----------------------------------------------------------------------------------------- patch_embed


def _conv_patch_embed(x, w, b, pos, p):
    """PyTorch's own composition (the published model's Conv2d + flatten + pos_embed)."""
    return F.conv2d(x, w, b, stride=p).flatten(2).transpose(1, 2) + pos


# (N, C, H, W, p, D): p in {2, 4}, square and non-square images, D in {72, 384}
PE_SHAPES = [(1, 4, 8, 8, 2, 72), (3, 4, 16, 16, 4, 384), (3, 4, 8, 16, 2, 72), (1, 3, 12, 8, 2, 40)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", PE_SHAPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_embed(backend, shape, dtype):
    _skip_unless(backend, "patch_embed")
    N, C, H, W, p, D = shape
    T = (H // p) * (W // p)
    base = [torch.randn(N, C, H, W), torch.randn(D, C, p, p) / p, torch.randn(D), torch.randn(1, T, D)]
    base = [t.to(DEVICE) for t in base]
    inputs = _leaves(*base, dtype=dtype)
    inputs[3].requires_grad_(False)  # frozen in the DiT
    out, grads, g = _run(lambda *a: ops.patch_embed(*a, p, backend=backend), inputs)
    ref_in = _leaves(*base, dtype=torch.float64)
    ref, ref_grads, _ = _run(lambda *a: tb.patch_embed(*a, p), ref_in[:3] + [ref_in[3].detach()], g)
    low = low_grads = None
    if dtype != torch.float32:
        low_in = _leaves(*base, dtype=dtype)
        low, low_grads, _ = _run(lambda *a: _conv_patch_embed(*a, p), low_in[:3] + [low_in[3].detach()], g)
    _check_all("patch_embed", dtype, out, grads, ref, ref_grads, low, low_grads, ["x", "weight", "bias"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_embed_pos_grad_and_no_bias(backend):
    _skip_unless(backend, "patch_embed")
    N, C, H, W, p, D = 2, 4, 8, 8, 2, 72
    base = [torch.randn(N, C, H, W), torch.randn(D, C, p, p), None, torch.randn(1, (H // p) * (W // p), D)]
    base = [None if t is None else t.to(DEVICE) for t in base]
    inputs = _leaves(*base)
    inputs[0].requires_grad_(False)
    out, grads, g = _run(lambda *a: ops.patch_embed(*a, p, backend=backend), inputs)
    ref_in = [base[0].double()] + _leaves(base[1], None, base[3], dtype=torch.float64)
    ref, ref_grads, _ = _run(lambda *a: tb.patch_embed(*a, p), ref_in, g)
    _check_all("patch_embed", torch.float32, out, grads, ref, ref_grads, None, None, ["weight", "pos_embed"])


# ----------------------------------------------------------------------------------------- final_layer


def _eager_final_layer(x, shift, scale, w, b, p, C, eps):
    """PyTorch's own composition in the inputs' dtype (the published FinalLayer + unpatchify)."""
    h = F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    return tb.unpatchify(F.linear(h, w, b), p, C)


# (B, p, C_out, grid side, D); L = side^2
FL_SHAPES = [(1, 2, 4, 4, 72), (3, 4, 8, 2, 384), (3, 2, 8, 3, 72), (1, 2, 8, 2, 1152)]


def _final_layer_inputs(B, p, C, side, D, mean=0.0):
    L = side * side
    x = torch.randn(B, L, D) * 2 + mean  # large-mean rows: statistics must not cancel
    w = torch.randn(p * p * C, D) / math.sqrt(D)
    base = [x, torch.randn(B, D), torch.randn(B, D) * 0.5, w, torch.randn(p * p * C)]
    return [t.to(DEVICE) for t in base]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", FL_SHAPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_final_layer(backend, shape, dtype):
    _skip_unless(backend, "final_layer")
    B, p, C, side, D = shape
    eps = 1e-6
    base = _final_layer_inputs(B, p, C, side, D, mean=20.0)
    out, grads, g = _run(lambda *a: ops.final_layer(*a, p, C, eps, backend=backend), _leaves(*base, dtype=dtype))
    ref, ref_grads, _ = _run(lambda *a: tb.final_layer(*a, p, C, eps), _leaves(*base, dtype=torch.float64), g)
    low = low_grads = None
    if dtype != torch.float32:
        low, low_grads, _ = _run(lambda *a: _eager_final_layer(*a, p, C, eps), _leaves(*base, dtype=dtype), g)
    names = ["x", "shift", "scale", "weight", "bias"]
    _check_all("final_layer", dtype, out, grads, ref, ref_grads, low, low_grads, names)


@pytest.mark.parametrize("backend", BACKENDS)
def test_final_layer_mixed_dtypes(backend):
    """x float32 with bfloat16 shift/scale (autocast's residual stream): float32 math, float32 output."""
    _skip_unless(backend, "final_layer")
    p, C = 2, 4
    base = _final_layer_inputs(2, p, C, 3, 72)
    base[1], base[2] = base[1].bfloat16(), base[2].bfloat16()
    out, grads, g = _run(lambda *a: ops.final_layer(*a, p, C, backend=backend), _leaves(*base))
    ref, ref_grads, _ = _run(lambda *a: tb.final_layer(*a, p, C), _leaves(*base, dtype=torch.float64), g)
    assert out.dtype == torch.float32
    assert [t.dtype for t in grads] == [torch.float32, torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    assert rel_err(out, ref) <= FP32_RTOL
    assert rel_err(grads[0], ref_grads[0]) <= FP32_RTOL
    for got, want in zip(grads[1:3], ref_grads[1:3]):  # rounded to bfloat16 once, like the torch backend
        assert rel_err(got, want) <= 2 * rel_err(want.bfloat16(), want) + 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """The model's layouts: shift/scale as chunks of one [B, 2D] adaLN output, a channels_last image."""
    _skip_unless(backend, "final_layer")
    _skip_unless(backend, "patch_embed")
    p, C, D = 2, 4, 72
    x, _, _, w, b = _final_layer_inputs(2, p, C, 3, D)
    mods = torch.randn(2, 2 * D, device=DEVICE)
    shift, scale = mods.chunk(2, dim=1)
    x_t = x.transpose(0, 1).contiguous().transpose(0, 1)  # rows strided across the batch
    out = ops.final_layer(x_t, shift, scale, w, b, p, C, backend=backend)
    ref = tb.final_layer(x.double(), shift.double(), scale.double(), w.double(), b.double(), p, C)
    assert_close(out, ref, torch.float32, name="final_layer (strided)")

    img = torch.randn(2, 4, 8, 12, device=DEVICE).to(memory_format=torch.channels_last)
    w, b = torch.randn(D, 4, p, p, device=DEVICE), torch.randn(D, device=DEVICE)
    pos = torch.randn(1, 24, D, device=DEVICE)
    out = ops.patch_embed(img, w, b, pos, p, backend=backend)
    assert_close(out, tb.patch_embed(img.double(), w.double(), b.double(), pos.double(), p), torch.float32,
                 name="patch_embed (channels_last)")


# ------------------------------------------------------------------------------------ linear_gelu_tanh

LG_SHAPES = [(2, 5, 48, 96), (1, 17, 72, 288)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LG_SHAPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_gelu_tanh(backend, shape, dtype):
    _skip_unless(backend, "linear_gelu_tanh")
    B, L, Din, Dout = shape
    base = [torch.randn(B, L, Din) * 2, torch.randn(Dout, Din) / math.sqrt(Din), torch.randn(Dout)]
    _check_linear_gelu_tanh([t.to(DEVICE) for t in base], backend, dtype)


def test_linear_gelu_tanh_saturates():
    """Large |pre| must give x or 0, never NaN (exp overflow in the sigmoid form)."""
    if not TRITON_RUNS:
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    from dit_fast.kernels import gelu

    pre = torch.tensor([-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4], device=DEVICE)
    out = gelu.gelu_tanh_fwd(pre)
    assert_close(out, F.gelu(pre.double(), approximate="tanh"), torch.float32, name="gelu")
    d, db = gelu.gelu_tanh_bwd(torch.ones_like(pre), pre, True)
    assert not torch.isnan(d).any() and not torch.isnan(db).any()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_gelu_tanh_casts_the_weight_through_autocasts_cache(backend):
    """Under autocast the fp32 weight is cast by autocast itself (its cache: once per autocast region,
    reused by an activation checkpoint's recompute), never by an explicit .to() per call."""
    from torch.utils._python_dispatch import TorchDispatchMode

    _skip_unless(backend, "linear_gelu_tanh")
    x = torch.randn(2, 4, 32, device=DEVICE, requires_grad=True)
    w = torch.randn(64, 32, device=DEVICE, requires_grad=True)
    b = torch.randn(64, device=DEVICE, requires_grad=True)
    casts = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("_to_copy", "to", "copy_") and tuple(args[0].shape) == (64, 32):
                casts.append(func)
            return func(*args, **(kwargs or {}))

    with torch.autocast(torch.device(DEVICE).type, torch.bfloat16), Record():
        outs = [ops.linear_gelu_tanh(x, w, b, backend=backend) for _ in range(2)]
    assert len(casts) == 1, f"weight cast {len(casts)} times in two calls: {casts}"
    assert all(o.dtype == torch.bfloat16 for o in outs)
    ref = tb.linear_gelu_tanh(x.double(), w.double(), b.double())
    assert rel_err(outs[1], ref) < 2e-2


# ------------------------------------------------------------------------------------ autocast (mixed)


@pytest.mark.parametrize("op", ["patch_embed", "final_layer", "linear_gelu_tanh"])
@pytest.mark.parametrize("backend", ["triton", "ext"])
def test_autocast_matches_torch_backend(backend, op):
    """float32 inputs under bfloat16 autocast: same output dtype as the torch backend, within its error."""
    _skip_unless(backend, op)
    if op == "patch_embed":
        p, D = 2, 72
        base = [torch.randn(2, 4, 8, 8), torch.randn(D, 4, p, p) / 4, torch.randn(D), torch.randn(1, 16, D)]
        call = lambda be, *a: ops.patch_embed(*a, p, backend=be)  # noqa: E731
        ref_fn = lambda *a: tb.patch_embed(*a, p)  # noqa: E731
    elif op == "final_layer":
        base = _final_layer_inputs(2, 2, 4, 3, 72)
        call = lambda be, *a: ops.final_layer(*a, 2, 4, backend=be)  # noqa: E731
        ref_fn = lambda *a: tb.final_layer(*a, 2, 4)  # noqa: E731
    else:
        base = [torch.randn(2, 5, 48), torch.randn(96, 48) / 7, torch.randn(96)]
        call = lambda be, *a: ops.linear_gelu_tanh(*a, backend=be)  # noqa: E731
        ref_fn = tb.linear_gelu_tanh
    base = [t.to(DEVICE) for t in base]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        low = call("torch", *base)
        out = call(backend, *base)
    ref = ref_fn(*[t.double() for t in base])
    assert out.dtype == low.dtype
    assert_close(out, ref, torch.bfloat16, eager_lowp=low, name=f"{op} under autocast")


@pytest.mark.parametrize("which", ["weight", "bias"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_embed_mixed_dtypes_outside_autocast_is_refused(backend, which):
    """nn.Conv2d (the published patch embedding) refuses bf16 x with fp32 parameters outside autocast: every
    backend gives one clear error naming both dtypes (issue 19 item 21), and runs the same call under autocast."""
    p, D = 2, 8
    x = _r(1, 4, 8, 8).to(torch.bfloat16)
    w = _r(D, 4, p, p).to(torch.bfloat16 if which == "bias" else torch.float32)
    b = _r(D).to(torch.bfloat16 if which == "weight" else torch.float32)
    pos = _r(1, 16, D)
    with pytest.raises(TypeError, match=rf"x is torch.bfloat16 but {which} is torch.float32"):
        ops.patch_embed(x, w, b, pos, p, backend=backend)
    _skip_unless(backend, "patch_embed")
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = ops.patch_embed(x, w, b, pos, p, backend=backend)
    assert out.shape == (1, 16, D)


# ------------------------------------------------------------------------------ launchers: poisoned out


@needs_triton
def test_launchers_write_every_element():
    from dit_fast.kernels import final_layer as fl
    from dit_fast.kernels import gelu
    from dit_fast.kernels import patch_embed as pe

    N, C, H, W, p, D = 2, 4, 8, 12, 2, 40  # D not a multiple of any tile
    T = (H // p) * (W // p)
    x, w, b, pos = torch.randn(N, C, H, W), torch.randn(D, C, p, p), torch.randn(D), torch.randn(1, T, D)
    x, w, b, pos = [t.to(DEVICE) for t in (x, w, b, pos)]
    out = poison_(torch.empty(N, T, D, device=DEVICE))
    pe.patch_embed_fwd(x, w, b, pos, p, out=out)
    assert_close(out, tb.patch_embed(x.double(), w.double(), b.double(), pos.double(), p), torch.float32)

    B, side, D, Co = 3, 3, 40, 4
    xs, sh, sc, wf, bf = _final_layer_inputs(B, p, Co, side, D)
    out = poison_(torch.empty(B, Co, side * p, side * p, device=DEVICE))
    fl.final_layer_fwd(xs, sh, sc, wf, bf, p, Co, 1e-6, out=out)
    ref = tb.final_layer(xs.double(), sh.double(), sc.double(), wf.double(), bf.double(), p, Co, 1e-6)
    assert_close(out, ref, torch.float32)
    dout = torch.randn_like(out)
    dx = poison_(torch.empty_like(xs))
    fl.final_layer_bwd(dout, xs, sh, sc, wf, p, Co, 1e-6, dx_out=dx)
    xd = xs.double().requires_grad_()
    (ref_dx,) = torch.autograd.grad(tb.final_layer(xd, sh.double(), sc.double(), wf.double(), bf.double(), p, Co, 1e-6),
                                    xd, dout.double())
    assert_close(dx, ref_dx, torch.float32, name="dx")

    pre = torch.randn(1000, device=DEVICE)  # not a multiple of the block
    out = poison_(torch.empty_like(pre))
    gelu.gelu_tanh_fwd(pre, out=out)
    assert_close(out, F.gelu(pre.double(), approximate="tanh"), torch.float32)
    pre = torch.randn(77, 300, device=DEVICE)  # rows and columns not multiples of the tiles
    g = torch.randn_like(pre)
    dpre = poison_(torch.empty_like(pre))
    _, dbias = gelu.gelu_tanh_bwd(g, pre, True, out=dpre)
    pd = pre.double().requires_grad_()
    (ref_d,) = torch.autograd.grad(F.gelu(pd, approximate="tanh"), pd, g.double())
    assert_close(dpre, ref_d, torch.float32, name="dpre")
    assert_close(dbias, ref_d.sum(0), torch.float32, name="dbias")

    # with the bias added in the pass (fc1's GEMM runs without it); bf16 bias read as stored
    for bias in (torch.randn(300, device=DEVICE), torch.randn(300, device=DEVICE).bfloat16()):
        out = poison_(torch.empty_like(pre))
        gelu.gelu_tanh_fwd(pre, out=out, bias=bias)
        pd = pre.double().requires_grad_()
        ref = F.gelu(pd + bias.double(), approximate="tanh")
        assert_close(out, ref, torch.float32, name="gelu(pre + bias)")
        dpre = poison_(torch.empty_like(pre))
        _, dbias = gelu.gelu_tanh_bwd(g, pre, True, out=dpre, bias=bias)
        (ref_d,) = torch.autograd.grad(ref, pd, g.double())
        assert_close(dpre, ref_d, torch.float32, name="dpre with bias")
        assert_close(dbias, ref_d.sum(0), torch.float32, name="dbias with bias")


@needs_triton
def test_final_layer_backward_is_deterministic():
    from dit_fast.kernels import final_layer as fl

    xs, sh, sc, wf, _ = _final_layer_inputs(3, 2, 4, 4, 72)
    dout = torch.randn(3, 4, 8, 8, device=DEVICE)
    first = fl.final_layer_bwd(dout, xs, sh, sc, wf, 2, 4, 1e-6)
    second = fl.final_layer_bwd(dout, xs, sh, sc, wf, 2, 4, 1e-6)
    for a, b in zip(first[:5], second[:5]):  # the sixth, d(norm gain), is None without a gain
        assert torch.equal(a, b)


# -------------------------------------------------------------------------- registered ops and compile


def _op_samples():
    N, C, H, W, p, D = 2, 4, 8, 8, 2, 32
    pe_args = [torch.randn(N, C, H, W), torch.randn(D, C, p, p), torch.randn(D), torch.randn(1, 16, D)]
    fl_args = _final_layer_inputs(2, 2, 4, 2, 32)
    pre, bias = torch.randn(3, 5, 48), torch.randn(48)
    return [
        ("patch_embed_fwd", [t.to(DEVICE).requires_grad_() for t in pe_args] + [p]),
        ("final_layer_fwd", [t.to(DEVICE).requires_grad_() for t in fl_args] + [2, 4, 1e-6]),
        ("bias_gelu_tanh_fwd", [pre.to(DEVICE).requires_grad_(), bias.to(DEVICE).requires_grad_()]),
        ("bias_gelu_tanh_fwd_no_bias", [pre.to(DEVICE).requires_grad_(), None]),
        ("bias_gelu_tanh_bwd", [torch.randn(4, 40, device=DEVICE), torch.randn(4, 40, device=DEVICE),
                                torch.randn(40, device=DEVICE), True]),
        ("bias_gelu_tanh_bwd_no_bias", [torch.randn(4, 40, device=DEVICE), torch.randn(4, 40, device=DEVICE),
                                        None, False]),
        ("final_layer_bwd", [torch.randn(2, 4, 4, 4, device=DEVICE)] + [t.detach() for t in fl_args[:4]]
         + [2, 4, 1e-6, True]),
    ]


@needs_triton
@pytest.mark.parametrize("name,args", _op_samples(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    import dit_fast.ops.triton_embed  # noqa: F401 (registers the ops)

    torch.library.opcheck(getattr(torch.ops.dit_fast_triton, name.removesuffix("_no_bias")).default, args)


@needs_triton
def test_compile_fullgraph_matches_eager():
    from dit_fast.ops import triton_embed as te

    def model(img, w_pe, b_pe, pos, w1, b1, shift, scale, w_f, b_f):
        x = te.patch_embed(img, w_pe, b_pe, pos, 2)
        x = x + te.linear_gelu_tanh(x, w1, b1)[..., : x.shape[-1]]
        return te.final_layer(x, shift, scale, w_f, b_f, 2, 4, 1e-6)

    D = 32
    args = [torch.randn(2, 4, 8, 8), torch.randn(D, 4, 2, 2), torch.randn(D), torch.randn(1, 16, D),
            torch.randn(2 * D, D) / 6, torch.randn(2 * D), torch.randn(2, D), torch.randn(2, D),
            torch.randn(16, D) / 6, torch.randn(16)]
    args = [t.to(DEVICE).requires_grad_(i != 3) for i, t in enumerate(args)]
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out_e, grads_e, g = _run(model, args)
    out_c, grads_c, _ = _run(compiled, args, g)
    assert rel_err(out_c, out_e) <= FP32_RTOL
    for a, b in zip(grads_c, grads_e):
        assert rel_err(a, b) <= FP32_RTOL


# ------------------------------------------------------------------------------------------ bad input


def _r(*shape):
    return torch.randn(*shape)


BAD_CALLS = {
    "pe_weight": (lambda be: ops.patch_embed(_r(1, 4, 8, 8), _r(8, 4, 3, 3), None, _r(1, 16, 8), 2, backend=be),
                  "weight must have shape"),
    "pe_divisible": (lambda be: ops.patch_embed(_r(1, 4, 9, 8), _r(8, 4, 2, 2), None, _r(1, 16, 8), 2, backend=be),
                     "multiple of patch_size"),
    "pe_bias": (lambda be: ops.patch_embed(_r(1, 4, 8, 8), _r(8, 4, 2, 2), _r(9), _r(1, 16, 8), 2, backend=be),
                "bias must have shape"),
    "pe_pos": (lambda be: ops.patch_embed(_r(1, 4, 8, 8), _r(8, 4, 2, 2), None, _r(1, 15, 8), 2, backend=be),
               "pos_embed must have shape"),
    "pe_x_rank": (lambda be: ops.patch_embed(_r(4, 8, 8), _r(8, 4, 2, 2), None, _r(1, 16, 8), 2, backend=be),
                  "x must have shape"),
    "fl_weight": (lambda be: ops.final_layer(_r(2, 4, 8), _r(2, 8), _r(2, 8), _r(15, 8), None, 2, 4, backend=be),
                  "weight must have shape"),
    "fl_shift": (lambda be: ops.final_layer(_r(2, 4, 8), _r(1, 8), _r(2, 8), _r(16, 8), None, 2, 4, backend=be),
                 "shift must have shape"),
    "fl_scale": (lambda be: ops.final_layer(_r(2, 4, 8), _r(2, 8), _r(2, 7), _r(16, 8), None, 2, 4, backend=be),
                 "scale must have shape"),
    "fl_int": (lambda be: ops.final_layer(torch.ones(2, 4, 8, dtype=torch.long), _r(2, 8), _r(2, 8), _r(16, 8), None,
                                          2, 4, backend=be),
               "x must be a floating-point"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_names_the_argument(backend, case):
    # dit_fast.ops checks before dispatching, so every backend (available or not) gives the same message.
    call, match = BAD_CALLS[case]
    with pytest.raises((ValueError, TypeError), match=match):
        call(backend)


# ---------------------------------------------------------------------------------------- GPU, full size


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dit_xl2_shapes_on_gpu(dtype):
    _skip_unless("triton", "patch_embed", "cuda")
    p, D = 2, 1152
    base = [torch.randn(4, 4, 32, 32), torch.randn(D, 4, p, p) / 4, torch.randn(D), torch.randn(1, 256, D)]
    base = [t.cuda() for t in base]
    out = ops.patch_embed(*[t.to(dtype) for t in base], p, backend="triton")
    ref = tb.patch_embed(*[t.double() for t in base], p)
    low = _conv_patch_embed(*[t.to(dtype) for t in base], p)
    assert_close(out, ref, dtype, eager_lowp=low if dtype != torch.float32 else None, name="patch_embed")

    base = _final_layer_inputs(4, 2, 8, 16, D, mean=5.0)
    out, grads, g = _run(lambda *a: ops.final_layer(*a, 2, 8, backend="triton"), _leaves(*base, dtype=dtype))
    ref, ref_grads, _ = _run(lambda *a: tb.final_layer(*a, 2, 8), _leaves(*base, dtype=torch.float64), g)
    low = low_grads = None
    if dtype != torch.float32:
        low, low_grads, _ = _run(lambda *a: _eager_final_layer(*a, 2, 8, 1e-6), _leaves(*base, dtype=dtype), g)
    names = ["x", "shift", "scale", "weight", "bias"]
    _check_all("final_layer", dtype, out, grads, ref, ref_grads, low, low_grads, names)

    base = [torch.randn(512, D).cuda(), (torch.randn(4 * D, D) / math.sqrt(D)).cuda(), torch.randn(4 * D).cuda()]
    _check_linear_gelu_tanh(base, "triton", dtype)


def _check_linear_gelu_tanh(base, backend, dtype):
    """linear_gelu_tanh on `backend` against float64, forward and backward (x, weight, bias = base)."""
    out, grads, g = _run(lambda *a: ops.linear_gelu_tanh(*a, backend=backend), _leaves(*base, dtype=dtype))
    ref, ref_grads, _ = _run(tb.linear_gelu_tanh, _leaves(*base, dtype=torch.float64), g)
    low = low_grads = None
    if dtype != torch.float32:
        eager = lambda x, w, b: F.gelu(F.linear(x, w, b), approximate="tanh")  # noqa: E731
        low, low_grads, _ = _run(eager, _leaves(*base, dtype=dtype), g)
    _check_all("linear_gelu_tanh", dtype, out, grads, ref, ref_grads, low, low_grads, ["x", "weight", "bias"])
