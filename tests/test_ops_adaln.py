"""The adaLN ops (adaln_modulate, gated_residual, gated_residual_adaln) on every backend.

Each backend is called through the public API dit_fast.ops and compared, forward and every
gradient, with the torch backend run on float64 copies of the same inputs. A backend that
cannot run here (no GPU, no extension built, op not implemented) is skipped with the reason.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dit_fast.ops as ops
from dit_fast import backends
from dit_fast.ops import torch_backend
from tolerances import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ("torch", "triton", "ext")
OP_NAMES = ("adaln_modulate", "gated_residual", "gated_residual_adaln")
EPS = 1e-6

# (B, L, D): every D, L in {1, 16, 64, 256}, B in {1, 3}; not the whole product (the Triton
# interpreter is slow), D=1152 with short L only.
CASES = [
    (1, 1, 64), (3, 16, 64), (1, 256, 64),
    (3, 1, 72), (1, 64, 72), (3, 16, 72),
    (1, 16, 384), (3, 64, 384),
    (1, 1, 1152), (3, 16, 1152), (1, 64, 1152),
    (3, 256, 72),
]
LOWP_CASES = [(3, 16, 72), (1, 16, 1152)]

TOKENS = {"adaln_modulate": ("x",), "gated_residual": ("x", "y"), "gated_residual_adaln": ("x", "y")}
MODS = {
    "adaln_modulate": ("shift", "scale"),
    "gated_residual": ("gate",),
    "gated_residual_adaln": ("gate", "shift", "scale"),
}
HAS_H = {"adaln_modulate": True, "gated_residual": False, "gated_residual_adaln": True}


def need(backend: str, op: str) -> None:
    ok, why = backends.probe(backend, DEVICE)
    if not ok:
        pytest.skip(f"backend {backend!r} unavailable on {DEVICE}: {why}")
    if not backends.implements(backend, op):
        pytest.skip(f"backend {backend!r} has no {op} kernel")


def make_inputs(op, B, L, D, dtype, mod_dtype=None, offset=0.0):
    mod_dtype = mod_dtype or dtype
    inp = {name: torch.randn(B, L, D, device=DEVICE).to(dtype) for name in TOKENS[op]}
    inp["x"] = (inp["x"].float() + offset).to(dtype)
    for name in MODS[op]:
        inp[name] = (0.5 * torch.randn(B, D, device=DEVICE)).to(mod_dtype)
    return inp


def call(op, inp, backend, h_dtype=None):
    """Outputs of `op` as a tuple, through dit_fast.ops (backend name) or torch_backend ("reference").
    An input named "bias" goes to the gated ops' bias."""
    bias = inp.get("bias")
    if backend == "reference":
        fn = getattr(torch_backend, op)
        if op == "adaln_modulate":
            return (fn(inp["x"], inp["shift"], inp["scale"], EPS, h_dtype),)
        if op == "gated_residual":
            return (fn(inp["x"], inp["y"], inp["gate"], bias),)
        return fn(inp["x"], inp["y"], inp["gate"], inp["shift"], inp["scale"], EPS, h_dtype, bias)
    if op == "adaln_modulate":
        return (ops.adaln_modulate(inp["x"], inp["shift"], inp["scale"], EPS, h_dtype=h_dtype, backend=backend),)
    if op == "gated_residual":
        return (ops.gated_residual(inp["x"], inp["y"], inp["gate"], bias=bias, backend=backend),)
    return tuple(ops.gated_residual_adaln(
        inp["x"], inp["y"], inp["gate"], inp["shift"], inp["scale"], EPS, h_dtype=h_dtype, bias=bias,
        backend=backend))


def eager_lowp(op, inp):
    """PyTorch's own eager composition in the inputs' (low) precision: the bound of tolerances.py."""
    def modulate(x):
        return F.layer_norm(x, x.shape[-1:], eps=EPS) * (1 + inp["scale"].unsqueeze(1)) + inp["shift"].unsqueeze(1)

    if op == "adaln_modulate":
        return (modulate(inp["x"]),)
    y = inp["y"] if "bias" not in inp else inp["y"] + inp["bias"]
    x_out = inp["x"] + inp["gate"].unsqueeze(1) * y
    return (x_out,) if op == "gated_residual" else (x_out, modulate(x_out))


def with_grads(fn, inp, cotangents):
    """(outputs, {name: grad}) of fn on fresh leaf copies of inp."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inp.items()}
    outs = fn(leaves)
    grads = torch.autograd.grad(outs, list(leaves.values()), grad_outputs=cotangents)
    return outs, dict(zip(leaves, grads))


def float64_reference(op, inp, cotangents, stored_x_out=None):
    """torch_backend on float64 copies. stored_x_out (gated_residual_adaln): h is normalized from x_out as the
    op stored it, rounded to x's dtype (the op's semantics; the gradient passes the rounding unchanged). The
    op's own stored values, not the float64 x_out rounded here: x + gate * y rounds once with a fused
    multiply-add (GPU) and twice without (CPU, the interpreter), a last-bit difference that at a row mean of
    1e4 is 1e-3 of the row's spread, so it would be charged to the normalization under test."""
    inp64 = {k: v.double() for k, v in inp.items()}

    def fn(t):
        if stored_x_out is None:
            return call(op, t, "reference")
        x_out = torch_backend.gated_residual(t["x"], t["y"], t["gate"], t.get("bias"))
        normalized = x_out + (stored_x_out.double() - x_out).detach()
        x_out = x_out + (x_out.to(inp["x"].dtype).double() - x_out).detach()
        return x_out, torch_backend.adaln_modulate(normalized, t["shift"], t["scale"], EPS, None)

    return with_grads(fn, inp64, [c.double() for c in cotangents])


def random_cotangents(outs):
    return [torch.randn(o.shape, device=o.device).to(o.dtype) for o in outs]


def check_all(op, inp, outs, grads, ref_outs, ref_grads, eager=None, tag=""):
    eager_outs, eager_grads = eager if eager is not None else ((None,) * len(outs), {})
    for i, (o, r, e) in enumerate(zip(outs, ref_outs, eager_outs)):
        assert_close(o, r, o.dtype, eager_lowp=e, name=f"{op}{tag} output {i}")
    for k, g in grads.items():
        assert g.dtype == inp[k].dtype, f"{op}{tag}: grad of {k} has dtype {g.dtype}, input {inp[k].dtype}"
        assert_close(g, ref_grads[k], g.dtype, eager_lowp=eager_grads.get(k), name=f"{op}{tag} grad of {k}")


def run_and_check(op, backend, inp, h_dtype=None, eager_fn=None, cotangent_fn=random_cotangents, round_x_out=False):
    outs = call(op, {k: v.detach() for k, v in inp.items()}, backend, h_dtype)
    cotangents = cotangent_fn(outs)
    outs, grads = with_grads(lambda t: call(op, t, backend, h_dtype), inp, cotangents)
    ref = float64_reference(op, inp, cotangents, outs[0].detach() if round_x_out else None)
    eager = with_grads(eager_fn, inp, cotangents) if eager_fn is not None else None
    check_all(op, inp, outs, grads, *ref, eager=eager)
    return outs, grads


@pytest.mark.parametrize("B,L,D", CASES)
@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_forward_and_grads(backend, op, B, L, D):
    need(backend, op)
    run_and_check(op, backend, make_inputs(op, B, L, D, torch.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,L,D", LOWP_CASES)
@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision(backend, op, B, L, D, dtype):
    need(backend, op)
    inp = make_inputs(op, B, L, D, dtype)
    outs, _ = run_and_check(op, backend, inp, eager_fn=lambda t: eager_lowp(op, t))
    assert all(o.dtype == dtype for o in outs)


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes(backend, op):
    """Autocast-style: float32 residual stream, bfloat16 branch and modulation, bfloat16 h."""
    need(backend, op)
    inp = make_inputs(op, 3, 16, 72, torch.float32, mod_dtype=torch.bfloat16)
    if "y" in inp:
        inp["y"] = inp["y"].bfloat16()
    h_dtype = torch.bfloat16 if HAS_H[op] else None
    # PyTorch's own mixed-precision composition is the torch backend itself.
    outs, _ = run_and_check(op, backend, inp, h_dtype=h_dtype, eager_fn=lambda t: call(op, t, "reference", h_dtype))
    if op != "adaln_modulate":
        assert outs[0].dtype == torch.float32, "x_out must keep x's dtype"
    if HAS_H[op]:
        assert outs[-1].dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "mixed"])
@pytest.mark.parametrize("B,L,D", [(3, 16, 72), (1, 64, 1152), (2, 1, 64)])
@pytest.mark.parametrize("op", ["gated_residual", "gated_residual_adaln"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bias(backend, op, B, L, D, dtype):
    """x + gate * (y + bias): the bias of the GEMM that made y, with its gradient (Triton: summed in the
    backward's own pass). "mixed": autocast-style, float32 x and bias (a parameter), bfloat16 y and gate."""
    need(backend, op)
    mixed = dtype == "mixed"
    inp = make_inputs(op, B, L, D, torch.float32 if mixed else dtype, mod_dtype=torch.bfloat16 if mixed else None)
    if mixed:
        inp["y"] = inp["y"].bfloat16()
    inp["bias"] = torch.randn(D, device=DEVICE).to(torch.float32 if mixed else dtype)
    h_dtype = torch.bfloat16 if mixed and op == "gated_residual_adaln" else None
    if mixed:
        eager_fn = lambda t: call(op, t, "reference", h_dtype)  # noqa: E731
    else:
        eager_fn = (lambda t: eager_lowp(op, t)) if dtype != torch.float32 else None
    outs, grads = run_and_check(op, backend, inp, h_dtype=h_dtype, eager_fn=eager_fn)
    assert grads["bias"].dtype == inp["bias"].dtype and grads["bias"].shape == (D,)
    # and the bias really is used: without it the output differs
    no_bias = call(op, {k: v for k, v in inp.items() if k != "bias"}, backend, h_dtype)
    assert not torch.equal(outs[0], no_bias[0])


def test_one_schema_for_both_kernel_namespaces():
    """dit_fast_triton:: and dit_fast_ext:: declare the gated ops with the same arguments (bias included)."""
    need("triton", "gated_residual_adaln")
    need("ext", "gated_residual_adaln")
    import dit_fast.ops.ext_backend  # noqa: F401
    import dit_fast.ops.triton_adaln  # noqa: F401

    for name in ("gated_residual_fwd", "gated_residual_adaln_fwd"):
        args = [[a.name for a in getattr(getattr(torch.ops, ns), name).default._schema.arguments]
                for ns in ("dit_fast_triton", "dit_fast_ext")]
        assert args[0] == args[1], name


def test_model_passes_the_bias_only_to_a_fusing_backend():
    """The model hands attn.proj's and mlp.fc2's biases to the gated ops only where the kernel adds them
    (capability fused_bias: Triton); elsewhere the GEMM keeps its bias (no extra pass)."""
    assert backends.capability("triton", "gated_residual_adaln", "cuda").fused_bias
    assert not backends.capability("ext", "gated_residual_adaln", "cuda").fused_bias
    assert not backends.capability("torch", "gated_residual_adaln", "cpu").fused_bias


def _transposed_view(shape, dtype):
    B, L, D = shape
    return torch.randn(B, D, L, device=DEVICE).to(dtype).transpose(1, 2)


@pytest.mark.parametrize("D", [72, 384])  # Triton: one masked tile; a head and a tail tile
@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend, op, D):
    """Modulation as chunks of one [B, 6D] tensor (as the model makes them), x a transposed view,
    y a strided slice, cotangents a transposed view and an expanded (stride 0) tensor."""
    need(backend, op)
    B, L = 3, 16
    mods = (0.5 * torch.randn(B, 6 * D, device=DEVICE)).chunk(6, dim=1)
    inp = {"x": _transposed_view((B, L, D), torch.float32)}
    if "y" in TOKENS[op]:
        inp["y"] = torch.randn(B, L, 2 * D, device=DEVICE)[..., D:]
    for name, m in zip(MODS[op], mods[1:]):
        inp[name] = m
    assert not inp["x"].is_contiguous() and not inp[MODS[op][0]].is_contiguous()
    run_and_check(op, backend, inp, cotangent_fn=lambda outs: [_transposed_view(o.shape, o.dtype) for o in outs])
    run_and_check(op, backend, inp, cotangent_fn=lambda outs: [torch.randn(()).expand(o.shape) for o in outs])


@pytest.mark.parametrize("op", ["adaln_modulate", "gated_residual_adaln"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_offset_float32(backend, op):
    """Rows with mean 1e4 and std 1 keep float32 accuracy (no one-pass variance, exact centring).

    x_out's float32 rounding at 1e4 (5e-4 absolute) is part of the op's semantics, so the reference
    normalizes the rounded x_out."""
    if backend == "torch":
        pytest.skip("the torch backend is F.layer_norm, which loses ~3e-4 at mean 1e4 in float32: "
                    "it defines the semantics, not this accuracy target")
    need(backend, op)
    run_and_check(op, backend, make_inputs(op, 2, 16, 1152, torch.float32, offset=1e4),
                  round_x_out=op == "gated_residual_adaln")


def _registered_fwd(backend, op):
    """The backend's registered forward op: (x[, y, gate], shift, scale, eps, h_dtype) -> (..., mean, rstd)."""
    if backend == "triton":
        import dit_fast.ops.triton_adaln  # noqa: F401  (registers dit_fast_triton::*)
        fwd = getattr(torch.ops.dit_fast_triton, f"{op}_fwd")
    else:
        import dit_fast.ops.ext_backend  # noqa: F401
        fwd = getattr(torch.ops.dit_fast_ext, f"{op}_fwd")
    if op == "gated_residual_adaln":  # the schema has the optional bias after gate
        return lambda x, y, gate, *rest: fwd(x, y, gate, None, *rest)
    return fwd


@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("op", ["adaln_modulate", "gated_residual_adaln"])
@pytest.mark.parametrize("backend", ["triton", "ext"])
def test_saved_statistics_are_the_row_mean_and_rstd(backend, op, offset):
    """One contract for what a norm op saves: mean is the row mean of x (resp. x_out as stored), to
    within the compute dtype's rounding at the row's scale, rstd = 1 / sqrt(var + eps); and one backend's backward takes
    another's saved statistics."""
    need(backend, op)
    B, L, D = 2, 5, 1152
    inp = make_inputs(op, B, L, D, torch.float32, offset=offset)
    args = [inp[k] for k in TOKENS[op] + MODS[op]]
    *_, mean, rstd = _registered_fwd(backend, op)(*args, EPS, None)
    normed = inp["x"]
    if op == "gated_residual_adaln":  # x_out as stored
        normed = ops.gated_residual(inp["x"], inp["y"], inp["gate"], backend="torch")
    x64 = normed.double()
    mean64 = x64.mean(-1)
    rstd64 = (x64.var(-1, unbiased=False) + EPS).rsqrt()
    # pivot + mu rounds at the scale of the row's elements, not of the mean
    ulp = 2 * torch.finfo(torch.float32).eps * x64.abs().amax(-1)
    err = (mean.double() - mean64).abs()
    assert (err <= ulp).all(), f"{backend} saved mean off by {err.max():.3g}"
    torch.testing.assert_close(rstd.double(), rstd64, rtol=1e-5, atol=0)
    for other in ("triton", "ext"):
        if other == backend or not backends.probe(other, DEVICE)[0] or not backends.implements(other, op):
            continue
        *_, mean_o, rstd_o = _registered_fwd(other, op)(*args, EPS, None)
        assert ((mean_o.double() - mean.double()).abs() <= 2 * ulp).all(), f"{other} and {backend} save different means"
        # x_out itself may differ by its last bit between backends (one FMA or two roundings of x + gate*y): at a
        # row mean of 1e4 that bit is 1e-3 of the spread, so the gated op's rstd gets the reference's 1e-5
        # (measured 2.08e-6 at DIT_FAST_SEED=3982976656, ext vs triton).
        rtol = 1e-5 if op == "gated_residual_adaln" else 2e-6
        torch.testing.assert_close(rstd_o, rstd, rtol=rtol, atol=0)


@pytest.mark.parametrize("B,L,D", [(3, 17, 72), (2, 5, 1152)])
@pytest.mark.parametrize("op", OP_NAMES)
def test_triton_writes_every_element(op, B, L, D):
    """Every buffer the Triton launchers allocate (outputs, statistics, partial sums) starts as NaN."""
    need("triton", op)
    from dit_fast.kernels import adaln as kernels

    with kernels.poison_outputs():
        run_and_check(op, "triton", make_inputs(op, B, L, D, torch.float32))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("which", ["dh only", "dx_out only", "neither"])
def test_triton_gated_residual_adaln_backward_missing_grads(which, bias):
    """The fused backward takes None for an unused output's gradient, same as passing zeros."""
    need("triton", "gated_residual_adaln")
    from dit_fast.kernels import adaln as kernels

    B, L, D = 2, 5, 72
    x, y = torch.randn(2, B, L, D, device=DEVICE)
    gate, shift, scale = torch.randn(3, B, D, device=DEVICE)
    b = torch.randn(D, device=DEVICE) if bias else None
    x_out, _, mean, rstd = kernels.gated_residual_adaln_fwd(x, y, gate, shift, scale, EPS, None, b)
    dx_out, dh = torch.randn(2, B, L, D, device=DEVICE)
    zeros = torch.zeros_like(x)
    given = {"dh only": (None, dh), "dx_out only": (dx_out, None), "neither": (None, None)}[which]
    as_zeros = tuple(zeros if g is None else g for g in given)
    saved = (x_out, y, gate, scale, mean, rstd, torch.float32)
    with kernels.poison_outputs():
        got = kernels.gated_residual_adaln_bwd(*given, *saved, bias=b)
    want = kernels.gated_residual_adaln_bwd(*as_zeros, *saved, bias=b)
    assert (got[-1] is None) == (not bias)
    for name, g, w in zip(("dx", "dy", "dgate", "dshift", "dscale", "dbias"), got, want):
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6, msg=lambda m, name=name: f"{which}: {name}: {m}")


def _opcheck_cases():
    B, L, D = 2, 3, 72
    x, y, dx_out, dh = torch.randn(4, B, L, D, device=DEVICE)
    gate, shift, scale = torch.randn(3, B, D, device=DEVICE)
    mean, rstd = torch.randn(B, L, device=DEVICE), torch.rand(B, L, device=DEVICE) + 0.5
    bias = torch.randn(D, device=DEVICE)
    bf = torch.bfloat16
    return {
        "adaln_modulate_fwd": (x, shift, scale, EPS, None),
        "adaln_modulate_bwd": (dh, x, mean, rstd, scale, torch.float32),
        "gated_residual_fwd": (x, y.to(bf), gate.to(bf), None),
        "gated_residual_fwd_bias": (x, y.to(bf), gate.to(bf), bias),
        "gated_residual_bwd": (dh, y, gate, None),
        "gated_residual_bwd_bias": (dh, y, gate, bias),
        "gated_residual_adaln_fwd": (x, y, gate, None, shift, scale, EPS, bf),
        "gated_residual_adaln_fwd_bias": (x, y, gate, bias.to(bf), shift, scale, EPS, bf),
        "gated_residual_adaln_bwd": (dh, dx_out, x, y, gate, None, mean, rstd, scale, torch.float32),
        "gated_residual_adaln_bwd_bias": (dh, dx_out, x, y, gate, bias, mean, rstd, scale, torch.float32),
        "gated_residual_adaln_bwd_no_dxo": (dh, None, x, y, gate, None, mean, rstd, scale, bf),
        # LightningDiT's modes: RMSNorm with a gain and no shift (the _rms suffix is dropped for the op name)
        "adaln_modulate_fwd_rms": (x, None, scale, EPS, None, True, bias),
        "adaln_modulate_bwd_rms": (dh, x, mean * 0, rstd, scale, None, True, bias),
        "gated_residual_adaln_fwd_rms": (x, y, gate, bias, None, scale, EPS, bf, True, bias.to(bf)),
        "gated_residual_adaln_bwd_rms": (dh, dx_out, x, y, gate, None, mean * 0, rstd, scale, None, True, bias),
    }


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_triton_opcheck(name):
    need("triton", "gated_residual_adaln")
    import dit_fast.ops.triton_backend  # noqa: F401  (registers the ops)

    args = _opcheck_cases()[name]
    if "_fwd" in name:
        args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    op = getattr(torch.ops.dit_fast_triton, name.replace("_no_dxo", "").replace("_bias", "").replace("_rms", ""))
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("through", ["dit_fast.ops", "backend module"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_matches_eager(backend, through):
    for op in OP_NAMES:
        need(backend, op)
    B, L, D = 2, 5, 72
    names = ("x", "y", "gate", "shift", "scale")
    inp = {k: torch.randn(B, L, D, device=DEVICE) if k in "xy" else torch.randn(B, D, device=DEVICE) for k in names}
    if through == "dit_fast.ops":
        adaln_modulate = lambda x, shift, scale: ops.adaln_modulate(x, shift, scale, EPS, backend=backend)  # noqa: E731
        gated_residual = lambda x, y, gate: ops.gated_residual(x, y, gate, backend=backend)  # noqa: E731
        gated_residual_adaln = lambda *a: ops.gated_residual_adaln(*a, EPS, backend=backend)  # noqa: E731
    else:  # the backend's registered ops alone, without the dispatch layer
        module = backends.module_for(backend)
        adaln_modulate = lambda x, shift, scale: module.adaln_modulate(x, shift, scale, EPS, None)  # noqa: E731
        gated_residual = module.gated_residual
        gated_residual_adaln = lambda *a: module.gated_residual_adaln(*a, EPS, None)  # noqa: E731

    def block(x, y, gate, shift, scale):
        h = adaln_modulate(x, shift, scale)
        x, h = gated_residual_adaln(x, y * h, gate, shift, scale)
        return gated_residual(x, h, gate), h

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    cot = [torch.randn(B, L, D, device=DEVICE) for _ in range(2)]
    want, want_grads = with_grads(lambda t: block(**t), inp, cot)
    got, got_grads = with_grads(lambda t: compiled(**t), inp, cot)
    for name, g, w in [*zip(("out", "h"), got, want), *((k, got_grads[k], want_grads[k]) for k in names)]:
        torch.testing.assert_close(
            g, w, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{backend} compiled {name}: {m}"
        )


@pytest.mark.parametrize("B,L,D", [(2, 203, 72), (2, 37, 384)])  # many rows per step; one row, head + tail
@pytest.mark.parametrize("op", OP_NAMES)
def test_triton_prefetch_switch_is_bitwise_neutral(op, B, L, D, monkeypatch):
    """kernels.adaln.PREFETCH (DIT_FAST_ADALN_PREFETCH) changes when loads are issued, never a result:
    outputs and every gradient bitwise equal, over several row blocks per program and a ragged last one."""
    need("triton", op)
    from dit_fast.kernels import adaln as kernels

    inp = make_inputs(op, B, L, D, torch.float32)
    cot = random_cotangents(call(op, inp, "triton"))
    runs = []
    for prefetch in (True, False):
        monkeypatch.setattr(kernels, "PREFETCH", prefetch)
        runs.append(with_grads(lambda t: call(op, t, "triton"), inp, cot))
    (outs_a, grads_a), (outs_b, grads_b) = runs
    assert all(torch.equal(a, b) for a, b in zip(outs_a, outs_b)), f"{op}: outputs differ with PREFETCH off"
    for k in inp:
        assert torch.equal(grads_a[k], grads_b[k]), f"{op}: grad of {k} differs with PREFETCH off"


def test_triton_column_tiles(monkeypatch):
    """kernels.adaln covers a row with a power-of-two head tile and a tail tile (no idle lanes at D = 1152),
    a row with a tail one per step; rows under 256 (no DiT width), and every row with SPLIT_D off, get one
    masked next_power_of_2(D) tile."""
    need("triton", "adaln_modulate")
    from dit_fast.kernels import adaln as kernels

    def tiles(D, split):  # (head, tail or None, head masked)
        t = kernels._col_tiles(D, split)
        return t["BLOCK_D"], t["BLOCK_T"] if t["HAS_TAIL"] else None, t["MASK_HEAD"]

    assert {D: tiles(D, True) for D in (1, 3, 72, 255, 256, 300, 384, 768, 1024, 1152, 2047)} == {
        1: (1, None, False), 3: (4, None, True), 72: (128, None, True), 255: (256, None, True),
        256: (256, None, False), 300: (256, 64, False), 384: (256, 128, False), 768: (512, 256, False),
        1024: (1024, None, False), 1152: (1024, 128, False), 2047: (1024, 1024, False)}
    assert {D: tiles(D, False) for D in (1, 72, 384, 1024, 1152)} == {
        1: (1, None, False), 72: (128, None, True), 384: (512, None, True), 1024: (1024, None, False),
        1152: (2048, None, True)}
    # (BLOCK_R, num_warps) at the model's token count: a row with a tail runs alone, warps from the head
    for split, D, want in ((True, 1152, (1, 4)), (True, 384, (1, 1)), (True, 1024, (2, 8)), (True, 72, (16, 8)),
                           (False, 1152, (1, 8)), (False, 384, (4, 8))):
        monkeypatch.setattr(kernels, "SPLIT_D", split)
        assert kernels._tile(D, 256)[:2] == want, (split, D)


SPLIT_OPS = [("adaln_modulate", False), ("gated_residual", False), ("gated_residual", True),
             ("gated_residual_adaln", False), ("gated_residual_adaln", True)]


@pytest.mark.parametrize("B,L,D", [(2, 5, 1), (2, 5, 64), (2, 9, 72), (2, 5, 384), (2, 5, 1152)])
@pytest.mark.parametrize("op,bias", SPLIT_OPS)
def test_triton_split_d_switch(op, bias, B, L, D, monkeypatch):
    """kernels.adaln.SPLIT_D (DIT_FAST_ADALN_SPLIT_D) changes the column tiles, not the results: with it on
    and off every element is written (poisoned buffers) and outputs and every gradient match the float64
    reference; what no reduction touches (x_out; gated_residual's dx, dy) is bitwise equal. The order of
    the row and column sums differs between the two (head then tail, rows per step), so the rest may
    differ in the last bits. D = 1, 64, 72: no tail either way (a power of two, or under 256)."""
    need("triton", op)
    from dit_fast.kernels import adaln as kernels

    inp = make_inputs(op, B, L, D, torch.float32)
    if bias:
        inp["bias"] = torch.randn(D, device=DEVICE)
    cot = random_cotangents(call(op, inp, "triton"))
    ref = float64_reference(op, inp, cot)
    runs = {}
    for split in (True, False):
        monkeypatch.setattr(kernels, "SPLIT_D", split)
        with kernels.poison_outputs():
            outs, grads = with_grads(lambda t: call(op, t, "triton"), inp, cot)
        check_all(op, inp, outs, grads, *ref, tag=f" SPLIT_D={split}")
        runs[split] = outs, grads
    (outs_a, grads_a), (outs_b, grads_b) = runs[True], runs[False]
    if op != "adaln_modulate":
        assert torch.equal(outs_a[0], outs_b[0]), f"{op}: x_out differs with SPLIT_D off"
    if op == "gated_residual":
        for k in ("x", "y"):
            assert torch.equal(grads_a[k], grads_b[k]), f"{op}: grad of {k} differs with SPLIT_D off"


def test_bench_contenders_switch_the_triton_kernels(monkeypatch):
    """The triton-noprefetch / triton-nosplit contenders of `dit-fast kernels` run the Triton adaLN ops with
    kernels.adaln.PREFETCH / SPLIT_D off for their whole pass, and leave the switch as they found it."""
    need("triton", "gated_residual_adaln")
    from dit_fast.bench.kernels import CONTENDERS, op_fn
    from dit_fast.kernels import adaln as kernels

    for switch in ("PREFETCH", "SPLIT_D"):  # as by default, whatever the environment says
        monkeypatch.setattr(kernels, switch, True)

    for name, switch in (("triton-noprefetch", "PREFETCH"), ("triton-nosplit", "SPLIT_D")):
        assert name in CONTENDERS
        assert op_fn(name, "linear_gelu_tanh") is None  # not an adaLN op
        fn = op_fn(name, "gated_residual_adaln")
        assert getattr(kernels, switch)
        with fn.bench_context():
            assert not getattr(kernels, switch), name
            assert getattr(kernels, "SPLIT_D" if switch == "PREFETCH" else "PREFETCH"), name
        assert getattr(kernels, switch)


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic(backend, op):
    """Bitwise equal gradients over repeated runs and thread counts (reductions in a fixed order)."""
    need(backend, op)
    # Several row chunks per batch element, so partial sums really are combined.
    inp = make_inputs(op, 2, 256, 64, torch.float32)
    cot = random_cotangents(call(op, inp, backend))
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, max(2, threads), max(2, threads)):
            torch.set_num_threads(n)
            runs.append(with_grads(lambda t: call(op, t, backend), inp, cot)[1])
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for k in inp:
            assert torch.equal(runs[0][k], run[k]), f"{backend} {op}: grad of {k} differs between identical runs"


@pytest.mark.parametrize("D", [72, 384])
@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float64(backend, op, D):
    """Where the capability table says a backend computes float64, it matches the torch backend to 1e-12."""
    need(backend, op)
    if backends.why_not(backend, op, DEVICE, float64=True):
        pytest.skip(f"{backend} runs no float64 {op} on {DEVICE}: {backends.why_not(backend, op, DEVICE, True)}")
    inp = make_inputs(op, 3, 17, D, torch.float64)
    cot = random_cotangents(call(op, inp, "reference"))
    outs, grads = with_grads(lambda t: call(op, t, backend), inp, cot)
    ref, ref_grads = with_grads(lambda t: call(op, t, "reference"), inp, cot)
    for name, o, r in [*zip(("out0", "out1"), outs, ref), *((k, grads[k], ref_grads[k]) for k in inp)]:
        assert o.dtype == torch.float64, f"{backend} {op} {name}: dtype {o.dtype}"
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12, msg=lambda m, name=name: f"{backend} {op} {name}: {m}")


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_fully_written(backend, op):
    """With deterministic algorithms on, torch.empty (from Python or C++) fills new memory with NaN: any
    element a kernel leaves unwritten fails the NaN check of assert_close."""
    need(backend, op)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.empty(8, device=DEVICE).isnan().all()
        run_and_check(op, backend, make_inputs(op, 3, 17, 100, torch.bfloat16), eager_fn=lambda t: eager_lowp(op, t))
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_messages(backend):
    need(backend, "gated_residual_adaln")
    B, L, D = 2, 3, 64
    x, y = torch.randn(2, B, L, D, device=DEVICE)
    gate, shift, scale = torch.randn(3, B, D, device=DEVICE)
    with pytest.raises(ValueError, match=r"shift must have shape \[B, D\] = \[2, 64\].*got \[2, 65\]"):
        ops.adaln_modulate(x, torch.randn(B, D + 1, device=DEVICE), scale, backend=backend)
    with pytest.raises(ValueError, match=r"x must have shape \[B, L, D\], got \[6, 64\]"):
        ops.adaln_modulate(x.reshape(B * L, D), shift, scale, backend=backend)
    with pytest.raises(ValueError, match=r"y must have the shape of x \[2, 3, 64\], got \[2, 4, 64\]"):
        ops.gated_residual(x, torch.randn(B, L + 1, D, device=DEVICE), gate, backend=backend)
    with pytest.raises(ValueError, match=r"gate must have shape \[B, D\]"):
        ops.gated_residual_adaln(x, y, gate[:1], shift, scale, backend=backend)
    with pytest.raises(TypeError, match=r"scale must be a floating-point tensor"):
        ops.gated_residual_adaln(x, y, gate, shift, scale.long(), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_argument_rule_for_every_backend(backend):
    """h_dtype, eps and D are checked in dit_fast.ops, the same way whichever backend runs."""
    need(backend, "gated_residual_adaln")
    x = torch.randn(1, 2, 64, device=DEVICE)
    s = torch.randn(1, 64, device=DEVICE)
    with pytest.raises(TypeError, match="h_dtype must be None or a floating-point torch.dtype"):
        ops.adaln_modulate(x, s, s, h_dtype=torch.int32, backend=backend)
    with pytest.raises(ValueError, match="eps must be a number >= 0, got -1"):
        ops.gated_residual_adaln(x, x, s, s, s, -1.0, backend=backend)
    x0, s0 = torch.randn(1, 2, 0, device=DEVICE), torch.randn(1, 0, device=DEVICE)
    for op, args in (("adaln_modulate", (x0, s0, s0)), ("gated_residual", (x0, x0, s0)),
                     ("gated_residual_adaln", (x0, x0, s0, s0, s0))):
        with pytest.raises(ValueError, match=r"x must have D >= 1 features .*got \[1, 2, 0\]"):
            getattr(ops, op)(*args, backend=backend)


@pytest.mark.parametrize("B,L", [(0, 3), (2, 0)])
@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend, op, B, L):
    """An empty batch (B = 0 or L = 0) gives empty outputs and gradients on every backend."""
    need(backend, op)
    inp = make_inputs(op, B, L, 8, torch.float32)
    outs, grads = with_grads(lambda t: call(op, t, backend), inp, random_cotangents(call(op, inp, backend)))
    for o in outs:
        assert o.shape == (B, L, 8)
    for k, g in grads.items():
        assert g.shape == inp[k].shape, f"{op}: grad of {k}"


# ---- full-size checks, for a GPU -------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dit_xl_shapes_gpu(backend, op, dtype):
    need(backend, op)
    inp = make_inputs(op, 4, 256, 1152, dtype)
    run_and_check(op, backend, inp, eager_fn=(lambda t: eager_lowp(op, t)) if dtype != torch.float32 else None)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["gated_residual", "gated_residual_adaln"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_dit_xl_shapes_gpu(backend, op):
    """The model's call at DiT-XL/2 shapes under autocast: float32 x and bias, bfloat16 y and gate."""
    test_bias(backend, op, 4, 256, 1152, "mixed")


@pytest.mark.gpu
@pytest.mark.parametrize("op", OP_NAMES)
def test_triton_poison_and_determinism_gpu(op):
    need("triton", op)
    from dit_fast.kernels import adaln as kernels

    inp = make_inputs(op, 8, 1024, 1152, torch.bfloat16)
    with kernels.poison_outputs():
        run_and_check(op, "triton", inp, eager_fn=lambda t: eager_lowp(op, t))
    cot = random_cotangents(call(op, inp, "triton"))
    first = with_grads(lambda t: call(op, t, "triton"), inp, cot)[1]
    second = with_grads(lambda t: call(op, t, "triton"), inp, cot)[1]
    for k in MODS[op]:
        assert torch.equal(first[k], second[k]), f"{op}: grad of {k} differs between two identical runs"


@pytest.mark.gpu
def test_triton_offsets_beyond_int32_gpu():
    """B * L * D > 2**31 elements: the last rows must be right too (int64 row offsets)."""
    need("triton", "adaln_modulate")
    B, L, D = 1900, 1024, 1152
    assert B * L * D > 2**31
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs 24 GB of GPU memory")
    x = torch.randn(B, L, D, device="cuda", dtype=torch.bfloat16)
    shift, scale = torch.randn(2, B, D, device="cuda", dtype=torch.bfloat16)
    h = ops.adaln_modulate(x, shift, scale, backend="triton")
    tail = slice(B - 2, B)
    want = torch_backend.adaln_modulate(x[tail].double(), shift[tail].double(), scale[tail].double(), EPS, None)
    eager = eager_lowp("adaln_modulate", {"x": x[tail], "shift": shift[tail], "scale": scale[tail]})[0]
    del x
    assert_close(h[tail], want, torch.bfloat16, eager_lowp=eager, name="last rows")


def _int_specialization(value):
    """What Triton specializes an int argument on (unless told not to): == 1, and divisibility by 16."""
    return (value == 1, value % 16 == 0) if isinstance(value, int) and not isinstance(value, bool) else None


@pytest.mark.parametrize("op", OP_NAMES)
def test_triton_backward_warmup_compiles_the_launched_specialization(op, monkeypatch):
    """Issue 20 item 5: the warmup that sizes the backward's chunking (run with n_chunks=1) must compile the
    specialization the launch uses, so each backward variant JIT-compiles once and chunking is sized from
    its own registers: every int argument Triton specializes agrees between the two calls."""
    need("triton", op)
    import inspect

    from dit_fast.kernels import adaln as kernels

    real = kernels._adaln_bwd_kernel
    names = list(inspect.signature(real.fn).parameters)
    seen = {}

    def record_probe(kernel, key, args, grid, kwargs):
        seen["probe"] = args
        return kernels._CONSERVATIVE_REGS

    class RecordLaunch:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen["launch"] = args
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(kernels, "_regs_of", record_probe)
    monkeypatch.setattr(kernels, "_adaln_bwd_kernel", RecordLaunch())
    inp = make_inputs(op, 2, 40, 72, torch.float32)  # 3 chunks per batch element (interpreter stand-ins)
    with_grads(lambda t: call(op, t, "triton"), inp, random_cotangents(call(op, inp, "triton")))
    probe, launch = seen["probe"], seen["launch"]
    assert launch[names.index("n_chunks")] > 1, "the case must launch several chunks to mean anything"
    for name, a, b in zip(names, probe, launch):
        if name in kernels.BWD_RUNTIME_ARGS:
            continue
        assert _int_specialization(a) == _int_specialization(b), (
            f"argument {name}: the warmup compiles for {a!r}, the launch runs {b!r} (another specialization)")
    # ...and those two are declared unspecialized (JITFunction, or the interpreter's kwargs)
    declared = getattr(real, "do_not_specialize", None) or getattr(real, "kwargs", {}).get("do_not_specialize")
    assert set(kernels.BWD_RUNTIME_ARGS) <= set(declared or ()) and set(kernels.BWD_RUNTIME_ARGS) <= set(names)


@pytest.mark.gpu
@pytest.mark.parametrize("op", OP_NAMES)
def test_triton_backward_compiles_each_variant_once_gpu(op):
    """On a GPU: after the first backward of a variant, Triton's cache for the backward kernel holds one
    compiled kernel more, not two (the warmup's and the launch's)."""
    need("triton", op)
    from dit_fast.kernels import adaln as kernels

    kernels._REGS.clear()
    cache = kernels._adaln_bwd_kernel.device_caches[torch.cuda.current_device()][0]
    before = len(cache)
    inp = make_inputs(op, 4, 1024, 1152, torch.bfloat16)
    cot = random_cotangents(call(op, inp, "triton"))
    with_grads(lambda t: call(op, t, "triton"), inp, cot)
    after_first = len(cache)
    assert after_first - before <= 1, f"{op}: one backward compiled {after_first - before} kernels"
    with_grads(lambda t: call(op, t, "triton"), inp, cot)
    assert len(cache) == after_first
