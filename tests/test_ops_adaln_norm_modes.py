"""LightningDiT's modes of the adaLN-family ops (issue 22): norm="rms" (RMSNorm), a norm gain (weight), and no
shift (scale-only adaLN, wo_shift), on every backend, forward and every gradient (the gain's included) against
the torch backend in float64, with outputs NaN-poisoned before the Triton kernels write them.

The torch backend defines the modes (dit_fast/ops/torch_backend.py). A backend without them (the capability
table's norm_modes) falls back to one that has them, saying so when it was named.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import dit_fast.ops as ops
from dit_fast import backends
from dit_fast.ops import torch_backend
from tolerances import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6
BACKENDS = ("torch", "triton", "ext")
# (norm, shift, gain): LightningDiT's block (RMSNorm with its gain; with and without shift), RMSNorm without a
# gain, and LayerNorm with a gain or without a shift
MODES = [("rms", False, True), ("rms", True, True), ("rms", True, False), ("layer", True, True),
         ("layer", False, False)]
# D = 1152 (XL) and 1536 (1p6B) as a head tile plus a tail tile in Triton, 72 one masked tile, 37 odd; L = 1,
# batch 1 included
SHAPES = [(1, 1, 1152), (2, 3, 1536), (2, 5, 72), (1, 3, 37)]


def need(backend: str, op: str) -> None:
    ok, why = backends.probe(backend, DEVICE)
    if not ok:
        pytest.skip(f"backend {backend!r} unavailable on {DEVICE}: {why}")


def make_inputs(op, B, L, D, dtype, shift, gain, norm):
    r = lambda *s: torch.randn(*s, device=DEVICE)  # noqa: E731
    inp = {"x": (r(B, L, D) + (0.0 if norm == "rms" else 2.0)).to(dtype), "scale": (0.5 * r(B, D)).to(dtype)}
    if op == "gated_residual_adaln":
        inp["y"], inp["gate"] = r(B, L, D).to(dtype), (0.5 * r(B, D)).to(dtype)
    if shift:
        inp["shift"] = (0.5 * r(B, D)).to(dtype)
    if gain:
        inp["weight"] = (1 + 0.3 * r(D)).to(dtype)
    return inp


def call(op, t, backend, norm, fn=None):
    """Outputs of `op` as a tuple, through dit_fast.ops (or `fn`, a torch_backend function)."""
    if op == "adaln_modulate":
        if fn is not None:
            return (fn(t["x"], t.get("shift"), t["scale"], EPS, None, norm, t.get("weight")),)
        return (ops.adaln_modulate(t["x"], t.get("shift"), t["scale"], EPS, norm=norm, weight=t.get("weight"),
                                   backend=backend),)
    if fn is not None:
        return tuple(fn(t["x"], t["y"], t["gate"], t.get("shift"), t["scale"], EPS, None, None, norm, t.get("weight")))
    return tuple(ops.gated_residual_adaln(t["x"], t["y"], t["gate"], t.get("shift"), t["scale"], EPS, norm=norm,
                                          weight=t.get("weight"), backend=backend))


def eager_lowp(op, t, norm):
    """The published composition in the inputs' precision: LightningDiT's RMSNorm (float32 math, type_as(x),
    then the gain) or nn.LayerNorm, then modulate in that dtype."""
    def modulate(x):
        if norm == "rms":
            xf = x.float()
            n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).type_as(x)
        else:
            n = F.layer_norm(x, x.shape[-1:], eps=EPS)
        if "weight" in t:
            n = n * t["weight"]
        h = n * (1 + t["scale"].unsqueeze(1))
        return h + t["shift"].unsqueeze(1) if "shift" in t else h

    if op == "adaln_modulate":
        return (modulate(t["x"]),)
    x_out = t["x"] + t["gate"].unsqueeze(1) * t["y"]
    return x_out, modulate(x_out)


def with_grads(fn, inp, cotangents):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inp.items()}
    outs = fn(leaves)
    grads = torch.autograd.grad(outs, list(leaves.values()), grad_outputs=cotangents)
    return outs, dict(zip(leaves, grads))


def run_and_check(op, backend, inp, norm):
    from dit_fast.kernels import adaln as kernels

    dtype = inp["x"].dtype
    with kernels.poison_outputs(), warnings.catch_warnings():
        warnings.simplefilter("ignore", backends.BackendFallbackWarning)
        outs = call(op, inp, backend, norm)
        cot = [torch.randn(o.shape, device=DEVICE).to(o.dtype) for o in outs]
        outs, grads = with_grads(lambda t: call(op, t, backend, norm), inp, cot)
    inp64 = {k: v.double() for k, v in inp.items()}
    ref, ref_grads = with_grads(lambda t: call(op, t, None, norm, getattr(torch_backend, op)), inp64,
                                [c.double() for c in cot])
    low, low_grads = (None,) * len(outs), {}
    if dtype != torch.float32:
        low, low_grads = with_grads(lambda t: eager_lowp(op, t, norm), inp, cot)
    for i, (o, r, e) in enumerate(zip(outs, ref, low)):
        assert o.dtype == dtype
        assert_close(o, r, dtype, eager_lowp=e, name=f"{backend} {op} {norm} output {i}")
    for k, g in grads.items():
        assert g.dtype == inp[k].dtype, f"grad of {k}: {g.dtype}, input {inp[k].dtype}"
        assert_close(g, ref_grads[k], dtype, eager_lowp=low_grads.get(k), name=f"{backend} {op} {norm} d{k}")


@pytest.mark.parametrize("B,L,D", SHAPES)
@pytest.mark.parametrize("norm,shift,gain", MODES)
@pytest.mark.parametrize("op", ["adaln_modulate", "gated_residual_adaln"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_float32(backend, op, norm, shift, gain, B, L, D):
    need(backend, op)
    run_and_check(op, backend, make_inputs(op, B, L, D, torch.float32, shift, gain, norm), norm)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("norm,shift,gain", [MODES[0], MODES[1]])
@pytest.mark.parametrize("op", ["adaln_modulate", "gated_residual_adaln"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision(backend, op, norm, shift, gain, dtype):
    need(backend, op)
    run_and_check(op, backend, make_inputs(op, 2, 4, 1152, dtype, shift, gain, norm), norm)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_rms(backend):
    need(backend, "gated_residual_adaln")
    run_and_check("gated_residual_adaln", backend, make_inputs("gated_residual_adaln", 2, 3, 72, torch.float64,
                                                               False, True, "rms"), "rms")


def test_torch_backend_matches_lightningdit_rmsnorm_and_modulate():
    """The torch backend's RMS mode is LightningDiT's block prologue: RMSNorm(x) (float32, type_as, gain), then
    modulate without shift, here in bfloat16 with a float32 gain (autocast's parameters)."""
    B, L, D = 2, 3, 40
    x = torch.randn(B, L, D).to(torch.bfloat16)
    w = 1 + 0.3 * torch.randn(D)
    scale = 0.5 * torch.randn(B, D)
    xf = x.float()
    published = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).type_as(x) * w * (1 + scale.unsqueeze(1))
    got = torch_backend.adaln_modulate(x, None, scale, EPS, torch.float32, "rms", w)
    torch.testing.assert_close(got, published, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("norm,shift,gain", [MODES[0], MODES[3]])
@pytest.mark.parametrize("backend", BACKENDS)
def test_final_layer(backend, norm, shift, gain):
    need(backend, "final_layer")
    B, L, D, p, C = 2, 4, 40, 2, 3
    t = {"x": torch.randn(B, L, D, device=DEVICE), "scale": 0.5 * torch.randn(B, D, device=DEVICE),
         "w": 0.2 * torch.randn(p * p * C, D, device=DEVICE), "b": torch.randn(p * p * C, device=DEVICE)}
    if shift:
        t["shift"] = 0.5 * torch.randn(B, D, device=DEVICE)
    if gain:
        t["g"] = 1 + 0.3 * torch.randn(D, device=DEVICE)

    def run(t, fn):
        return (fn(t["x"], t.get("shift"), t["scale"], t["w"], t["b"], p, C, EPS, norm, t.get("g")),)

    def api(*a):
        return ops.final_layer(*a[:8], norm=a[8], norm_weight=a[9], backend=backend)

    cot = [torch.randn(B, C, 4, 4, device=DEVICE)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", backends.BackendFallbackWarning)
        outs, grads = with_grads(lambda t: run(t, api), t, cot)
    ref, ref_grads = with_grads(lambda t: run(t, torch_backend.final_layer), {k: v.double() for k, v in t.items()},
                                [c.double() for c in cot])
    assert_close(outs[0], ref[0], torch.float32, name=f"{backend} final_layer {norm}")
    for k, g in grads.items():
        assert_close(g, ref_grads[k], torch.float32, name=f"{backend} final_layer {norm} d{k}")


def test_capability_table_routes_the_modes():
    """Every backend runs the modes of its adaLN-family ops on every device it lists, ext's CUDA kernels included
    (so "auto" keeps its choice for LightningDiT's block); a row without them would refuse them by name."""
    for backend in BACKENDS:
        for device in ("cuda", "cpu"):
            for op in ("adaln_modulate", "gated_residual_adaln", "final_layer"):
                cap = backends.capability(backend, op, device)
                if cap is not None:
                    assert not cap.refuses(False, 1152, norm_modes=True), (backend, op, device)
    assert backends.capability("ext", "gated_residual_adaln", "cuda").norm_modes
    without = backends.Capability("x", ("cuda",), ("adaln_modulate",), float64=False)
    assert "RMSNorm" in without.refuses(False, 1152, norm_modes=True) and not without.refuses(False, 1152)


def test_bad_norm_arguments_are_named():
    x, scale = torch.randn(1, 2, 8), torch.randn(1, 8)
    with pytest.raises(ValueError, match="norm must be 'layer'"):
        ops.adaln_modulate(x, None, scale, norm="batch")
    with pytest.raises(ValueError, match=r"weight \(the norm's gain\) must have shape \[D\] = \[8\]"):
        ops.adaln_modulate(x, None, scale, norm="rms", weight=torch.ones(7))
    with pytest.raises(ValueError, match="norm_weight"):
        ops.final_layer(torch.randn(1, 4, 8), None, scale, torch.randn(12, 8), None, 2, 3, norm="rms",
                        norm_weight=torch.ones(9))


@pytest.mark.parametrize("backend", ["triton", "ext"])
def test_torch_compile_fullgraph_matches_eager(backend):
    """The norm modes through the registered ops (schema, fake kernel, autograd) under torch.compile."""
    need(backend, "gated_residual_adaln")
    t = make_inputs("gated_residual_adaln", 2, 5, 72, torch.float32, False, True, "rms")
    leaves = [t[k].requires_grad_() for k in ("x", "y", "gate", "scale", "weight")]

    def f(x, y, gate, scale, w):
        x_out, h = ops.gated_residual_adaln(x, y, gate, None, scale, norm="rms", weight=w, backend=backend)
        return (ops.adaln_modulate(x_out, None, scale, norm="rms", weight=w, backend=backend) * h).sum()

    want = f(*leaves)
    want_grads = torch.autograd.grad(want, leaves)
    got = torch.compile(f, fullgraph=True)(*leaves)
    grads = torch.autograd.grad(got, leaves)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
