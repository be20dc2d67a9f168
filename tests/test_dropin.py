"""Drop-in at every level: the fast DiT behaves as the published one wherever user code touches it.

Weights changed by any route (in place, through .data, by assignment, load_state_dict, optimizers,
.to(), functional_call) are always the ones used; inference_mode works; submodules called directly,
hooks and the attributes code reads behave as published. Every check compares with
dit_fast.reference on random weights, on every backend that runs here.
"""
import copy

import pytest
import torch

import dit_fast
import dit_fast.models as models
from dit_fast import ops, reference
from dit_fast.backends import probe
from dit_fast.testing import randomize_weights_
from tolerances import FP32_RTOL, rel_err

BACKENDS = ["torch", "ext", "triton"]


def _skip_unless_runs(backend):
    ok, why = probe(backend, "cpu")
    if not ok:
        pytest.skip(f"{backend} backend does not run here: {why}")


def _pair(backend="torch", batch_adaln=False, depth=3):
    ref = reference.DiT(input_size=8, patch_size=2, hidden_size=48, depth=depth, num_heads=4, num_classes=10)
    randomize_weights_(ref).eval()
    fast = dit_fast.from_reference(ref, backend=backend, batch_adaln=batch_adaln).eval()
    return ref, fast


def _inputs(n=2, num_classes=10):
    return torch.randn(n, 4, 8, 8), torch.rand(n) * 999, torch.randint(0, num_classes, (n,))


def _assert_same(fast, ref, x, t, y, what=""):
    err = rel_err(fast(x, t, y), ref(x, t, y))
    assert err < FP32_RTOL, f"{what}: relative error {err:.2e}"


def _adaln_params(model):
    for o in [*model.blocks, model.final_layer]:
        yield from o.adaLN_modulation[1].parameters()


# -- 1. weights changed by any route ------------------------------------------------------------

ROUTES = ["in_place", "data_copy", "data_lerp", "data_assign", "load_state_dict", "load_assign", "optimizer",
          "to_double"]


def _change_weights(route, model, new_state):
    """Apply new_state's values to model by one route (the same route on both models)."""
    named = dict(model.named_parameters())
    if route == "load_state_dict":
        model.load_state_dict(new_state)
    elif route == "load_assign":
        model.load_state_dict({k: v.clone() for k, v in new_state.items()}, assign=True)
    elif route == "to_double":
        with torch.no_grad():
            for k, p in named.items():
                p.copy_(new_state[k])
        model.double()
    elif route == "optimizer":
        # one SGD step whose gradient moves each weight exactly to its new value
        opt = torch.optim.SGD([p for p in named.values() if p.requires_grad], lr=1.0)
        for k, p in named.items():
            if p.requires_grad:
                p.grad = p.detach() - new_state[k]
        opt.step()
    else:
        for k, p in named.items():
            new = new_state[k]
            if route == "in_place":
                with torch.no_grad():
                    p.copy_(new)
            elif route == "data_copy":
                p.data.copy_(new)
            elif route == "data_lerp":
                p.data.lerp_(new, 1.0)
            elif route == "data_assign":
                p.data = new.clone()


@pytest.mark.parametrize("batch_adaln", [True, False])
@pytest.mark.parametrize("route", ROUTES)
def test_weights_changed_by_any_route_are_used(route, batch_adaln):
    ref, fast = _pair(batch_adaln=batch_adaln)
    x, t, y = _inputs()
    other = randomize_weights_(copy.deepcopy(ref))
    new_state = {k: v.detach().clone() for k, v in other.state_dict().items()}
    with torch.no_grad():
        _assert_same(fast, ref, x, t, y, "before")  # the batched GEMM ran on the old weights
    for m in (ref, fast):
        _change_weights(route, m, new_state)
    if route == "to_double":
        x = x.double()
    with torch.no_grad():
        _assert_same(fast, ref, x, t, y, route)
    with torch.inference_mode():
        _assert_same(fast, ref, x, t, y, route + " (inference_mode)")


def test_batched_adaln_runs_one_gemm_while_its_views_are_intact(monkeypatch):
    ref, fast = _pair(batch_adaln=True)
    x, t, y = _inputs()
    calls = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(models.F, "linear", lambda i, w, b=None: calls.append(w.shape) or linear(i, w, b))
    rows = sum(lin.weight.shape[0] for lin in fast._adaln_linears())
    with torch.no_grad():
        fast(x, t, y)
        assert (rows, 48) in calls  # the fused GEMM over every block's projection
        calls.clear()
        blk = fast.blocks[1].adaLN_modulation[1]
        blk.weight.data = blk.weight.data.clone() * 2  # new storage: the views are broken
        ref.blocks[1].adaLN_modulation[1].weight.data *= 2
        _assert_same(fast, ref, x, t, y, "after p.data = new")
        assert (rows, 48) not in calls
    # in training with autograd, every projection runs on its own weight (its gradient must reach it)
    fast.train()
    calls.clear()
    fast.fuse_adaln_weights()
    fast(x, t, y, force_drop_ids=torch.zeros(2, dtype=torch.long))
    assert (rows, 48) not in calls


def test_fused_adaln_survives_deepcopy_and_dtype_moves():
    ref, fast = _pair(batch_adaln=True)
    x, t, y = _inputs()
    ema = copy.deepcopy(fast)
    assert ema._fused_adaln_intact()
    with torch.no_grad():
        for p in _adaln_params(ema):
            p.mul_(0.5)  # must not touch the original's weights
    with torch.no_grad():
        _assert_same(fast, ref, x, t, y, "original after changing its deepcopy")
    fast.double()
    assert fast._fused_adaln_intact()
    ref.double()
    with torch.no_grad():
        _assert_same(fast, ref, x.double(), t, y, "after .double()")


def test_functional_call_uses_the_given_weights():
    ref, fast = _pair(batch_adaln=True)
    x, t, y = _inputs()
    other = randomize_weights_(copy.deepcopy(ref))
    params = dict(other.named_parameters())
    with torch.no_grad():
        out_f = torch.func.functional_call(fast, params, (x, t, y))
        err = rel_err(out_f, other(x, t, y))
        assert err < FP32_RTOL
        _assert_same(fast, ref, x, t, y, "own weights after functional_call")


# -- 2. inference_mode --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_adaln", [True, False])
def test_inference_mode_built_and_or_run(backend, batch_adaln):
    _skip_unless_runs(backend)
    ref, _ = _pair()
    x, t, y = _inputs()
    with torch.no_grad():
        expected = ref(x, t, y)
    with torch.inference_mode():
        built_inside = dit_fast.from_reference(ref, backend=backend, batch_adaln=batch_adaln).eval()
        assert rel_err(built_inside(x, t, y), expected) < FP32_RTOL
    with torch.no_grad():
        assert rel_err(built_inside(x, t, y), expected) < FP32_RTOL
    built_outside = dit_fast.from_reference(ref, backend=backend, batch_adaln=batch_adaln).eval()
    with torch.inference_mode():
        assert rel_err(built_outside(x, t, y), expected) < FP32_RTOL
        assert rel_err(built_outside.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]), 4.0),
                       ref.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]), 4.0)) < FP32_RTOL
    # and the same model still trains afterwards
    built_outside.train()
    out = built_outside(x, t, y, force_drop_ids=torch.zeros(2, dtype=torch.long))
    out.square().mean().backward()
    assert all(p.grad is not None for p in built_outside.parameters() if p.requires_grad)


# -- 3. submodules, hooks, attributes -----------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_submodules_called_directly_compute_the_published_modules(backend):
    _skip_unless_runs(backend)
    ref, fast = _pair(backend)
    x, t, y = _inputs()
    tokens = torch.randn(2, 16, 48)
    c = torch.randn(2, 48)
    with torch.no_grad():
        assert rel_err(fast.x_embedder(x), ref.x_embedder(x)) < FP32_RTOL
        assert rel_err(fast.t_embedder(t), ref.t_embedder(t)) < FP32_RTOL
        assert torch.equal(fast.y_embedder(y, False), ref.y_embedder(y, False))
        for i in range(len(ref.blocks)):
            assert rel_err(fast.blocks[i](tokens, c), ref.blocks[i](tokens, c)) < FP32_RTOL, f"block {i}"
        assert rel_err(fast.final_layer(tokens, c), ref.final_layer(tokens, c)) < FP32_RTOL
        assert rel_err(fast.blocks[0].attn(tokens), ref.blocks[0].attn(tokens)) < FP32_RTOL
        assert rel_err(fast.blocks[0].mlp(tokens), ref.blocks[0].mlp(tokens)) < FP32_RTOL
    # with autograd too (a block is the unit of feature-alignment losses)
    tok = tokens.clone().requires_grad_()
    g_f = torch.autograd.grad(fast.blocks[1](tok, c).sum(), tok)[0]
    g_r = torch.autograd.grad(ref.blocks[1](tok, c).sum(), tok)[0]
    assert rel_err(g_f, g_r) < FP32_RTOL


@pytest.mark.parametrize("cls", [reference.DiT, dit_fast.DiT])
def test_published_attributes_exist(cls):
    m = cls(input_size=8, patch_size=2, hidden_size=48, depth=2, num_heads=4, num_classes=10)
    assert isinstance(m.blocks[0].norm1, torch.nn.LayerNorm) and isinstance(m.blocks[0].norm2, torch.nn.LayerNorm)
    assert m.blocks[0].norm1.eps == 1e-6 and not m.blocks[0].norm1.elementwise_affine
    assert isinstance(m.final_layer.norm_final, torch.nn.LayerNorm)
    assert m.blocks[0].attn.head_dim == 12 and m.blocks[0].attn.num_heads == 4
    assert isinstance(m.blocks[0].mlp.act, torch.nn.GELU) and m.blocks[0].mlp.act.approximate == "tanh"
    assert m.x_embedder.patch_size == (2, 2) and m.x_embedder.patch_size[0] == 2
    assert m.x_embedder.num_patches == 16 and m.x_embedder.grid_size == (4, 4)
    assert callable(m.t_embedder.timestep_embedding)
    assert not any("norm" in k for k in m.state_dict() if "norm" in k and "weight" in k)  # no new keys


def _capture_block_outputs(model):
    seen = []
    handles = [b.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone())) for b in model.blocks]
    return seen, handles


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_hooks_see_each_block_output(backend):
    _skip_unless_runs(backend)
    ref, fast = _pair(backend)
    x, t, y = _inputs()
    seen_r, _ = _capture_block_outputs(ref)
    seen_f, _ = _capture_block_outputs(fast)
    with torch.no_grad():
        _assert_same(fast, ref, x, t, y, "with observing hooks")
    assert len(seen_f) == len(seen_r) == 3
    for a, b in zip(seen_f, seen_r):
        assert isinstance(a, torch.Tensor) and rel_err(a, b) < FP32_RTOL


def _count_adaln_modulate(monkeypatch):
    calls = []
    real = ops.adaln_modulate
    monkeypatch.setattr(ops, "adaln_modulate", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_observing_hooks_keep_the_carried_norm(monkeypatch):
    """Without hooks, and with hooks that only look, the next norm rides on the residual: one
    stand-alone adaln_modulate per forward (block 0's)."""
    ref, fast = _pair()
    x, t, y = _inputs()
    calls = _count_adaln_modulate(monkeypatch)
    with torch.no_grad():
        fast(x, t, y)
        assert len(calls) == 1
        _capture_block_outputs(fast)
        calls.clear()
        fast(x, t, y)
        assert len(calls) == 1


def _in_place(method):
    # An in-place change of a tensor autograd needs would raise; in grad mode those cases check only
    # that the hook runs. tanh: LayerNorm is blind to affine changes, so they could not show a stale norm.
    if not method.__self__.requires_grad:
        method()


HOOK_CASES = [("torch", mode, how) for mode in ("no_grad", "inference_mode", "grad")
              for how in ("return", "in_place", "pre_hook", "pre_hook_in_place")]
# The carry logic is backend-independent; the kernels' backends get the cases that exercise it most.
HOOK_CASES += [(b, mode, how) for b in ("ext", "triton")
               for mode, how in (("inference_mode", "in_place"), ("grad", "return"), ("no_grad", "pre_hook_in_place"))]


@pytest.mark.parametrize("backend, mode, how", HOOK_CASES)
def test_hooks_that_change_a_block_output_are_honored(backend, mode, how):
    _skip_unless_runs(backend)
    ref, fast = _pair(backend)
    x, t, y = _inputs()
    for m in (ref, fast):
        if how == "return":
            m.blocks[1].register_forward_hook(lambda mod, args, out: torch.tanh(out))
        elif how == "in_place":
            m.blocks[1].register_forward_hook(lambda mod, args, out: _in_place(out.tanh_))
        elif how == "pre_hook":
            m.blocks[1].register_forward_pre_hook(lambda mod, args: (torch.tanh(args[0]), args[1]))
        else:
            m.blocks[1].register_forward_pre_hook(lambda mod, args: _in_place(args[0].tanh_))
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": torch.enable_grad}[mode]
    with ctx():
        _assert_same(fast, ref, x, t, y, f"{how} under {mode}")


def test_hook_skipping_a_block_and_backward_hooks():
    """A caching accelerator returns a block's input (skips it); a full backward hook sees the
    gradient of the block's output as on the published model."""
    ref, fast = _pair()
    x, t, y = _inputs()
    for m in (ref, fast):
        m.blocks[2].register_forward_hook(lambda mod, args, out: args[0])
    with torch.no_grad():
        _assert_same(fast, ref, x, t, y, "skipped block")
    ref, fast = _pair()
    grads = {}
    for name, m in (("ref", ref), ("fast", fast)):
        m.blocks[1].register_full_backward_hook(lambda mod, gin, gout, name=name: grads.update({name: gout[0].clone()}))
        xx = x.clone().requires_grad_()
        m(xx, t, y).square().sum().backward()
    assert rel_err(grads["fast"], grads["ref"]) < FP32_RTOL


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_hooks_on_bypassed_submodules_fire(backend):
    """Hooks on modules the fast path fuses away (norms, fc1, act, SiLU, x_embedder, final_layer; on
    Triton also attn.proj and mlp.fc2, whose biases go to the gated residual) fire as on the published
    model, and see the same values."""
    _skip_unless_runs(backend)
    ref, fast = _pair(backend)
    x, t, y = _inputs()
    names = ["blocks.0.norm1", "blocks.1.norm2", "blocks.0.mlp.fc1", "blocks.2.mlp.act", "blocks.1.adaLN_modulation.0",
             "x_embedder", "final_layer", "final_layer.norm_final", "blocks.0.attn.proj", "blocks.2.mlp.fc2",
             "blocks.1.attn", "blocks.1.mlp"]
    seen = {"ref": {}, "fast": {}}
    for key, m in (("ref", ref), ("fast", fast)):
        for n in names:
            m.get_submodule(n).register_forward_hook(lambda mod, a, o, n=n, key=key: seen[key].setdefault(n, o.clone()))
    with torch.no_grad():
        _assert_same(fast, ref, x, t, y, "hooks on fused-away submodules")
    for n in names:
        assert n in seen["fast"], f"hook on {n} did not fire"
        assert rel_err(seen["fast"][n], seen["ref"][n]) < FP32_RTOL, n


def _linear_calls_with_bias(model, x, t, y):
    """How many GEMMs of the forward add a bias in their epilogue (aten addmm), and the output."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Record():
        out = model(x, t, y)
    return calls.count("addmm"), out


def test_triton_blocks_hand_the_projection_biases_to_the_gated_residual(monkeypatch):
    """On Triton, attn.proj and mlp.fc2 run without their bias (the gated residual adds it and sums its
    gradient): 2 fewer biased GEMMs per block, same result; a wrapped (non-plain) submodule keeps the
    published call."""
    _skip_unless_runs("triton")
    ref, fast = _pair("triton")
    x, t, y = _inputs()
    with_bias_triton, out_triton = _linear_calls_with_bias(fast, x, t, y)
    with monkeypatch.context() as m:
        m.setattr(models, "fuses_bias", lambda *a: False)
        with_bias_unfused, out_torch = _linear_calls_with_bias(fast, x, t, y)
    assert with_bias_unfused - with_bias_triton == 2 * len(fast.blocks)
    assert rel_err(out_triton, out_torch) < FP32_RTOL
    assert rel_err(out_triton, ref(x, t, y)) < FP32_RTOL

    class Wrapped(torch.nn.Module):  # what a checkpoint or FSDP wrapper looks like from the block
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, h):
            return self.inner(h)

    for block in fast.blocks:
        block.attn = Wrapped(block.attn)
    with_bias_wrapped, out_wrapped = _linear_calls_with_bias(fast, x, t, y)
    assert with_bias_wrapped - with_bias_triton == len(fast.blocks)
    assert rel_err(out_wrapped, out_torch) < FP32_RTOL


# -- 4. timesteps ---------------------------------------------------------------------------------


def test_one_timestep_broadcasts_over_the_batch():
    ref, fast = _pair()
    x, _, y = _inputs(3)
    t = torch.tensor([417.0])
    with torch.no_grad():
        _assert_same(fast, ref, x, t, y, "t of shape [1]")
        _assert_same(fast, ref, x, t.expand(3).contiguous(), y, "t repeated")
    for bad in (torch.tensor([True, False, True]), torch.ones(3, dtype=torch.complex64)):
        with pytest.raises(TypeError, match="t must hold"):
            fast(x, bad, y)
    with pytest.raises(ValueError, match=r"t must be a tensor of shape \[3\]"):
        fast(x, torch.ones(2), y)


@pytest.mark.parametrize("cls", [reference.DiT, dit_fast.DiT])
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(depth=0), "depth must be an int >= 1"),
        (dict(patch_size=0), "patch_size must be an int >= 1"),
        (dict(num_classes=0), "num_classes must be an int >= 1"),
        (dict(class_dropout_prob=1.5), r"class_dropout_prob must be a number in \[0, 1\]"),
        (dict(class_dropout_prob=-0.1), r"class_dropout_prob must be a number in \[0, 1\]"),
        (dict(hidden_size=50), "divisible by num_heads"),
        (dict(mlp_ratio=0), "mlp_ratio must be"),
    ],
)
def test_constructor_refuses_impossible_configs(cls, kwargs, match):
    base = dict(input_size=8, patch_size=2, hidden_size=48, depth=2, num_heads=4, num_classes=10)
    with pytest.raises(ValueError, match=match):
        cls(**{**base, **kwargs})


# -- workflows ------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_adaln", [True, False])
def test_workflow_validation_then_ema_sampling(batch_adaln):
    """Train a few steps, validate with the raw weights under no_grad, swap the EMA weights in by
    .data.copy_ (as EMA helpers do), sample under inference_mode, swap back: every output matches
    the reference model put through the same steps."""
    ref, fast = _pair(batch_adaln=batch_adaln)
    models_ = {"ref": ref, "fast": fast}
    emas = {k: copy.deepcopy(m).requires_grad_(False) for k, m in models_.items()}
    # SGD: AdamW would amplify fp32 rounding differences in near-zero gradients into lr-sized steps
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9) for k, m in models_.items()}
    x, t, y = _inputs()
    for step in range(3):
        for k, m in models_.items():
            m.train()
            torch.manual_seed(step)  # the same label dropout draw for both models
            loss = m(x, t, y).square().mean()
            opts[k].zero_grad()
            loss.backward()
            opts[k].step()
            with torch.no_grad():
                for pe, p in zip(emas[k].parameters(), m.parameters()):
                    pe.lerp_(p, 0.1)
    outs = {}
    for k, m in models_.items():
        m.eval()
        with torch.no_grad():
            val = m(x, t, y)
        backup = [p.detach().clone() for p in m.parameters()]
        for p, pe in zip(m.parameters(), emas[k].parameters()):
            p.data.copy_(pe.data)  # diffusers' EMAModel.copy_to does this
        with torch.inference_mode():
            xt = x.clone()
            for step in (900.0, 500.0, 100.0):
                xt = xt - 0.1 * m(xt, torch.full((2,), step), y)[:, :4]
        for p, b in zip(m.parameters(), backup):
            p.data.copy_(b)  # EMAModel.restore
        with torch.no_grad():
            val_again = m(x, t, y)
        outs[k] = (val, xt, val_again)
    for name, a, b in zip(("validation", "EMA samples", "validation after restore"), outs["fast"], outs["ref"]):
        assert rel_err(a, b) < FP32_RTOL, name
    assert rel_err(outs["fast"][0], outs["fast"][2]) < 1e-7
