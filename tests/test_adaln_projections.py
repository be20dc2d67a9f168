"""ops.adaln_projections (every adaLN projection as one GEMM, with autograd) against the layer-by-layer
F.linear + chunk it replaces, and the packed QKV gradient of attention.unbind_packed."""
import pytest
import torch
import torch.nn.functional as F

import dit_fast
from dit_fast.attention import _UnbindPacked, packed_grad
from dit_fast.ops import adaln_projections
from tolerances import assert_close


def _layers(D=24, depth=3, dtype=torch.float32, requires_grad=True):
    outs = [6 * D] * depth + [2 * D]
    ws = [(torch.randn(n, D, dtype=dtype) * D**-0.5).requires_grad_(requires_grad) for n in outs]
    bs = [(torch.randn(n, dtype=dtype) * 0.1).requires_grad_(requires_grad) for n in outs]
    return ws, bs, [6] * depth + [2]


def _per_layer(silu_c, ws, bs, chunks):
    return [F.linear(silu_c, w, b).chunk(k, dim=1) for w, b, k in zip(ws, bs, chunks)]


def _fwd_bwd(fn, silu_c, ws, bs, chunks, seeds):
    """Outputs and the gradients of silu_c, weights and biases for a loss that weighs every chunk, one
    chunk left unused (its gradient is None: it must count as zeros)."""
    for t in [silu_c, *ws, *bs]:
        t.grad = None
    groups = fn(silu_c, ws, bs, chunks)
    flat = [c for g in groups for c in g]
    loss = sum((c.double() * s).sum() for c, s in zip(flat[:-1], seeds))
    loss.backward()
    grads = [silu_c.grad] + [t.grad for t in [*ws, *bs]]
    return [c.detach() for c in flat], grads


@pytest.mark.parametrize("B", [1, 5])
def test_matches_layer_by_layer_in_float32_and_float64(B):
    torch.manual_seed(0)
    ws, bs, chunks = _layers()
    silu_c = F.silu(torch.randn(B, 24)).requires_grad_()
    seeds = [torch.randn(B, w.shape[0] // k, dtype=torch.float64) for w, k in zip(ws, chunks) for _ in range(k)]
    out, grads = _fwd_bwd(adaln_projections, silu_c, ws, bs, chunks, seeds)
    ref = [t.detach().double().requires_grad_() for t in [silu_c, *ws, *bs]]
    n = len(ws)
    out64, grads64 = _fwd_bwd(_per_layer, ref[0], ref[1 : 1 + n], ref[1 + n :], chunks, seeds)
    for a, b in zip(out, out64):
        assert a.dtype == torch.float32
        assert_close(a, b, torch.float32, name="modulation")
    for a, b in zip(grads, grads64):
        assert a is not None and a.dtype == torch.float32
        assert_close(a, b, torch.float32, name="grad")
    # float64 in: the same function to the last bits
    out_d, grads_d = _fwd_bwd(adaln_projections, ref[0], ref[1 : 1 + n], ref[1 + n :], chunks, seeds)
    for a, b in zip(out_d + grads_d, out64 + grads64):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_under_autocast_matches_layer_by_layer_autocast():
    torch.manual_seed(1)
    ws, bs, chunks = _layers()
    silu_c = F.silu(torch.randn(4, 24)).requires_grad_()
    seeds = [torch.randn(4, w.shape[0] // k, dtype=torch.float64) for w, k in zip(ws, chunks) for _ in range(k)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _fwd_bwd(adaln_projections, silu_c, ws, bs, chunks, seeds)
        ref_out, ref_grads = _fwd_bwd(_per_layer, silu_c, ws, bs, chunks, seeds)
    ref = [t.detach().double().requires_grad_() for t in [silu_c, *ws, *bs]]
    n = len(ws)
    out64, grads64 = _fwd_bwd(_per_layer, ref[0], ref[1 : 1 + n], ref[1 + n :], chunks, seeds)
    for a, r, b in zip(out, ref_out, out64):
        assert a.dtype == r.dtype == torch.bfloat16
        assert_close(a, b, torch.bfloat16, eager_lowp=r, name="autocast modulation")
    for a, r, b in zip(grads, ref_grads, grads64):
        assert a.dtype == r.dtype == torch.float32  # the parameters' own dtype, as autocast's cast gives
        assert_close(a, b, torch.bfloat16, eager_lowp=r, name="autocast grad")


def test_parameter_grads_are_row_blocks_of_one_gradient():
    # one GEMM for all weight gradients, handed to .grad without a copy per parameter
    torch.manual_seed(2)
    ws, bs, chunks = _layers(D=8, depth=2)
    silu_c = torch.randn(3, 8)
    sum(c.sum() for g in adaln_projections(silu_c, ws, bs, chunks) for c in g).backward()
    ptrs = [w.grad.data_ptr() for w in ws]
    step = [w.numel() * w.element_size() for w in ws]
    assert all(ptrs[i + 1] - ptrs[i] == step[i] for i in range(len(ws) - 1))


def test_frozen_inputs_get_no_gradient():
    torch.manual_seed(3)
    ws, bs, chunks = _layers(D=8, depth=2)
    ws[0].requires_grad_(False)
    for b in bs:
        b.requires_grad_(False)
    silu_c = torch.randn(3, 8)  # no gradient wanted
    sum(c.sum() for g in adaln_projections(silu_c, ws, bs, chunks) for c in g).backward()
    assert ws[0].grad is None and all(b.grad is None for b in bs) and ws[1].grad is not None
    expected = torch.ones(3, ws[1].shape[0]).t() @ silu_c
    torch.testing.assert_close(ws[1].grad, expected)


def test_bad_arguments_are_named():
    ws, bs, chunks = _layers(D=8, depth=2)
    with pytest.raises(ValueError, match="weights"):
        adaln_projections(torch.randn(2, 8), ws, bs[:-1], chunks)
    with pytest.raises(ValueError, match="chunks"):
        adaln_projections(torch.randn(2, 8), ws, bs, [5] * len(ws))
    with pytest.raises(TypeError, match="dtype"):
        adaln_projections(torch.randn(2, 8, dtype=torch.float64), ws, bs, chunks)


def _tiny(**kw):
    torch.manual_seed(4)
    model = dit_fast.DiT(input_size=8, patch_size=2, hidden_size=32, depth=3, num_heads=2, num_classes=10,
                         backend="torch", **kw)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)  # the published init zeroes adaLN: gradients would be zero
    return model


@pytest.mark.parametrize("batch_adaln", [False, True])
def test_model_training_step_runs_every_projection_as_one_gemm(batch_adaln):
    """A training forward calls ops.adaln_projections once (no per-layer adaLN Linear forward), and its
    gradients are those of the published per-layer computation (float64 model)."""
    model = _tiny(batch_adaln=batch_adaln).double()
    x, t, y = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([3, 700]), torch.tensor([1, 2])
    calls = []
    lin_calls = []
    handles = []
    real = dit_fast.ops.adaln_projections

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    dit_fast.models.ops.adaln_projections = counting
    try:
        model(x, t, y).square().mean().backward()
    finally:
        dit_fast.models.ops.adaln_projections = real
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert calls == [1]
    # the same model, adaLN forced per layer by a looking-only hook on every block's projection Linear
    model.zero_grad(set_to_none=True)
    for blk in model.blocks:
        handles.append(blk.adaLN_modulation[1].register_forward_hook(lambda m, i, o: lin_calls.append(1)))
    model(x, t, y).square().mean().backward()
    for h in handles:
        h.remove()
    assert len(lin_calls) == len(model.blocks)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(fast_grads[n], p.grad, rtol=1e-12, atol=1e-14, msg=n)


def test_model_float64_weights_under_autocast_stay_per_layer_float64():
    # autocast leaves float64 alone; a batched GEMM in the autocast dtype would not
    model = _tiny().double()
    x, t, y = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([3, 700]), torch.tensor([1, 2])
    ref = model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


# -- the packed QKV gradient -------------------------------------------------------------------------


def test_packed_grad_recognizes_slices_of_one_packed_tensor():
    buf = torch.randn(2, 5, 3, 4, 8)
    dq, dk, dv = buf.unbind(2)
    packed = packed_grad(dq, dk, dv)
    assert packed is not None and packed.data_ptr() == buf.data_ptr() and torch.equal(packed, buf)
    assert packed_grad(dq, dv, dk) is None  # out of order
    assert packed_grad(dq.clone(), dk, dv) is None  # separate storage
    assert packed_grad(dq, dk, None) is None
    overlapping = torch.randn(2, 5, 4, 8)
    assert packed_grad(overlapping, overlapping, overlapping) is None  # one tensor three times


class _PackedKernel(torch.autograd.Function):
    """Stands in for an attention kernel whose backward allocates packed gradients (as PyTorch's
    memory-efficient SDPA does for packed q, k, v), or separate ones."""

    @staticmethod
    def forward(ctx, q, k, v, packed):
        ctx.packed = packed
        return q * 1 + 2 * k + 3 * v

    @staticmethod
    def backward(ctx, g):
        if not ctx.packed:
            return g.clone(), 2 * g, 3 * g, None
        buf = torch.empty(*g.shape[:2], 3, *g.shape[2:])
        buf[:, :, 0], buf[:, :, 1], buf[:, :, 2] = g, 2 * g, 3 * g
        _PackedKernel.buf = buf
        return (*buf.unbind(2), None)


@pytest.mark.parametrize("packed", [True, False])
def test_unbind_packed_backward_hands_back_the_packed_gradient(packed):
    qkv5 = torch.randn(2, 5, 3, 4, 8, requires_grad=True)
    q, k, v = _UnbindPacked.apply(qkv5)
    g = torch.randn(2, 5, 4, 8)
    (_PackedKernel.apply(q, k, v, packed) * g).sum().backward()
    torch.testing.assert_close(qkv5.grad, torch.stack([g, 2 * g, 3 * g], dim=2))
    if packed:  # no copy: the kernel's own buffer became qkv's gradient
        assert qkv5.grad.data_ptr() == _PackedKernel.buf.data_ptr()


def test_torch_func_transforms_take_the_published_computation():
    """torch.func.grad / jvp trace the published per-layer projections and plain unbind (the custom
    Functions define no transform rules): results equal autograd's and finite differences."""
    model = _tiny(attn_backend="math").double()
    x, t, y = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([3, 700]), torch.tensor([1, 2])
    drop = torch.zeros(2, dtype=torch.long)  # no random label dropout: the same function every call
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(ps):
        return torch.func.functional_call(model, ps, (x, t, y), {"force_drop_ids": drop}).square().mean()

    grads = torch.func.grad(loss)(params)
    model(x, t, y, force_drop_ids=drop).square().mean().backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-10, atol=1e-13, msg=n)
    v = torch.randn_like(x)
    _, tangent = torch.func.jvp(lambda xx: model(xx, t, y, force_drop_ids=drop), (x,), (v,))
    with torch.no_grad():
        fd = (model(x + 1e-6 * v, t, y, force_drop_ids=drop) - model(x - 1e-6 * v, t, y, force_drop_ids=drop)) / 2e-6
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-8)
