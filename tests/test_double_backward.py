"""Double backward (a gradient of a gradient, as gradient penalties take) on every backend.

A backward run with create_graph=True must give gradients that can be differentiated again; the
kernels' backward passes are first-order, so the backends switch to differentiable formulas then
(dit_fast/ops/differentiable_backward.py). Second derivatives are checked against the torch backend:
in float64 where a backend computes in float64 (bitwise-close), else against float64 by the rules of
tolerances.py; and with gradgradcheck where a call is cheap (torch, ext).
"""
from __future__ import annotations

import pytest
import torch

import dit_fast
import dit_fast.ops as ops
from dit_fast import backends, reference
from dit_fast.testing import randomize_weights_
from tolerances import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6


def need(backend: str, op: str, float64: bool = False) -> None:
    why = backends.why_not(backend, op, DEVICE, float64)
    if why:
        pytest.skip(f"backend {backend!r} cannot run {op} here: {why}")


def op_inputs(op: str, dtype: torch.dtype):
    """Small inputs of `op` (odd D, L=3): tensors to differentiate and the call on a backend."""
    B, L, D = 2, 9, 5
    r = lambda *s: torch.randn(*s, device=DEVICE, dtype=dtype)  # noqa: E731
    if op == "adaln_modulate":
        return [r(B, L, D) + 3, r(B, D), r(B, D)], lambda t, b: ops.adaln_modulate(*t, EPS, backend=b)
    if op == "gated_residual":
        return [r(B, L, D), r(B, L, D), r(B, D)], lambda t, b: ops.gated_residual(*t, backend=b)
    if op == "gated_residual_adaln":
        return [r(B, L, D), r(B, L, D), r(B, D), r(B, D), r(B, D)], (
            lambda t, b: ops.gated_residual_adaln(*t, EPS, backend=b)
        )
    if op == "patch_embed":
        C, p, side = 3, 2, 6
        return [r(B, C, side, side), r(D, C, p, p), r(D), r(1, (side // p) ** 2, D)], (
            lambda t, b: ops.patch_embed(*t, p, backend=b)
        )
    if op == "final_layer":
        p, C = 2, 3
        return [r(B, L, D) + 2, r(B, D), r(B, D), r(p * p * C, D), r(p * p * C)], (
            lambda t, b: ops.final_layer(*t, p, C, EPS, backend=b)
        )
    if op == "linear_gelu_tanh":
        return [r(B, L, D), r(7, D), r(7)], lambda t, b: ops.linear_gelu_tanh(*t, backend=b)
    raise AssertionError(op)


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def second_order_grads(fn, inputs, backend, cotangents, directions):
    """d/d(inputs) of sum(grad(sum(out * cot), inputs) * directions): a Hessian-vector product."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = as_tuple(fn(leaves, backend))
    loss = sum((o * c).sum() for o, c in zip(outs, cotangents))
    grads = torch.autograd.grad(loss, leaves, create_graph=True)
    penalty = sum((g * d).sum() for g, d in zip(grads, directions))
    return torch.autograd.grad(penalty, leaves, allow_unused=True)


@pytest.mark.parametrize("op", backends.OPS)
@pytest.mark.parametrize("backend", ["ext", "triton"])
def test_second_derivatives_match_torch_backend(backend, op):
    backends_float64 = backends.capability(backend, op, DEVICE)
    dtype = torch.float64 if backends_float64 is not None and backends_float64.float64 else torch.float32
    need(backend, op, dtype == torch.float64)
    inputs, fn = op_inputs(op, dtype)
    outs = as_tuple(fn(inputs, "torch"))
    cot = [torch.randn_like(o) for o in outs]
    directions = [torch.randn_like(t) for t in inputs]
    got = second_order_grads(fn, inputs, backend, cot, directions)
    as64 = lambda ts: [t.double() for t in ts]  # noqa: E731
    want = second_order_grads(fn, as64(inputs), "torch", as64(cot), as64(directions))
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None or not w.any():
            assert g is None or not g.any(), f"{backend} {op}: input {i} has a second derivative torch has not"
            continue
        assert g is not None, f"{backend} {op}: second derivative of input {i} is missing"
        assert_close(g, w, torch.float32, name=f"{backend} {op} d2/d(input {i})")


@pytest.mark.parametrize("op", backends.ADALN_OPS)
@pytest.mark.parametrize("backend", ["torch", "ext"])
def test_gradgradcheck(backend, op):
    need(backend, op, float64=True)
    inputs, fn = op_inputs(op, torch.float64)
    # small: gradgradcheck is quadratic in the number of elements
    inputs = [(t[:1, :2] if t.dim() == 3 else t[:1]).detach().requires_grad_() for t in inputs]
    assert torch.autograd.gradgradcheck(lambda *t: fn(list(t), backend), inputs)


def tiny_dit(backend):
    torch.manual_seed(0)  # same weights for every backend (inputs keep the test's fresh seed)
    model = dit_fast.DiT(
        input_size=8, patch_size=2, in_channels=3, hidden_size=40, depth=2, num_heads=2, num_classes=5,
        backend=backend, attn_backend="math",
    )
    return randomize_weights_(model)


@pytest.mark.parametrize("backend", ["ext", "triton"])
def test_gradient_penalty_on_a_tiny_dit(backend):
    for op in ("adaln_modulate", "gated_residual_adaln"):
        need(backend, op)
    seed = torch.initial_seed()
    grads = {}
    for b in ("torch", backend):
        model = tiny_dit(b).to(DEVICE)
        torch.manual_seed(seed)
        x = torch.randn(2, 3, 8, 8, device=DEVICE, requires_grad=True)
        t = torch.rand(2, device=DEVICE) * 999
        y = torch.randint(0, 5, (2,), device=DEVICE)
        grads[b] = _penalty_grads(model, x, t, y)
    _assert_same_penalty_grads(grads[backend], grads["torch"], backend, "the torch backend")


@pytest.mark.parametrize("backend", ["torch", "ext", "triton"])
def test_gradient_penalty_with_default_attention_matches_the_reference(backend):
    """Issue 19 item 10: a gradient penalty through dit_fast.DiT with the default attn_backend="auto" (SDPA's
    fused kernels or FlashAttention, first-order only) gives the published model's gradients."""
    for op in ("adaln_modulate", "gated_residual_adaln"):
        need(backend, op)
    config = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=40, depth=2, num_heads=2, num_classes=5,
                  class_dropout_prob=0.0)  # no label dropout: both models see the same labels
    seed = torch.initial_seed()
    torch.manual_seed(seed)
    ref = randomize_weights_(reference.DiT(**config)).to(DEVICE)
    for block in ref.blocks:  # timm's explicit softmax: the published model's twice-differentiable path
        block.attn.fused_attn = False
    model = dit_fast.DiT(**config, backend=backend).to(DEVICE)
    model.load_state_dict(ref.state_dict())
    assert model.attn_backend == "auto"
    x0 = torch.randn(2, 3, 8, 8, device=DEVICE)
    t = torch.rand(2, device=DEVICE) * 999
    y = torch.randint(0, 5, (2,), device=DEVICE)
    grads = {}
    for name, m in (("reference", ref), (backend, model)):
        x = x0.clone().requires_grad_()
        grads[name] = _penalty_grads(m, x, t, y)
        grads[name]["x"] = x.grad
    _assert_same_penalty_grads(grads[backend], grads["reference"], backend, "the reference")


def _penalty_grads(model, x, t, y) -> dict:
    """Parameter gradients of an R1-style penalty: out.mean() + |d(out^2 mean)/dx|^2 (a double backward)."""
    out = model(x, t, y)
    (dx,) = torch.autograd.grad(out.square().mean(), x, create_graph=True)
    (out.mean() + dx.square().sum()).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _assert_same_penalty_grads(got_grads: dict, want_grads: dict, backend: str, baseline: str) -> None:
    for name, want in want_grads.items():
        if want is None:
            continue
        got = got_grads[name]
        assert got is not None, f"{backend}: {name}.grad is None, {baseline} has one"
        assert_close(got, want, torch.float32, name=f"{backend} penalty grad of {name}")


@pytest.mark.parametrize("attn_backend", ["auto", "sdpa"])
def test_attention_first_and_second_order_grads(attn_backend):
    """The attention op alone: first-order grads equal the kernel's own (no recomputation path), a retained
    graph can be differentiated twice, and create_graph gives the math path's second derivatives."""
    from dit_fast.attention import attention

    qkv = torch.randn(2, 7, 3 * 12, device=DEVICE, dtype=torch.float64)
    dout = torch.randn(2, 7, 12, device=DEVICE, dtype=torch.float64)
    ref = qkv.clone().requires_grad_()
    want = torch.autograd.grad(attention(ref, 3, "math"), ref, dout, create_graph=True)[0]
    want2 = torch.autograd.grad(want.square().sum(), ref)[0]

    leaf = qkv.clone().requires_grad_()
    out = attention(leaf, 3, attn_backend)
    first = torch.autograd.grad(out, leaf, dout, retain_graph=True)[0]
    again = torch.autograd.grad(out, leaf, dout, retain_graph=True)[0]  # the kept graph was freed: recomputed
    torch.testing.assert_close(first, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    (g,) = torch.autograd.grad(out, leaf, dout, create_graph=True)
    torch.testing.assert_close(torch.autograd.grad(g.square().sum(), leaf)[0], want2, rtol=1e-10, atol=1e-12)
