"""LightningDiT on the DiT engine: the published configs, constructor, module tree and state_dict keys (the
RoPE buffers included), forward and forward_with_cfg with the CFG interval, the fused path on for the stock
modules and the published calls for replaced ones, and the recipe's training losses.

dit_fast.reference.LightningDiT is the yardstick: it was checked bit-exact against the official
hustvl/LightningDiT models (forward, guidance with and without the interval, init, module names and order,
state_dict keys and RoPE buffers) on random weights; see the closing note of the session that added it.
"""
import collections
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

import dit_fast
from dit_fast import ops, reference
from dit_fast.lightning_modules import RMSNorm, SwiGLUFFN, VisionRotaryEmbeddingFast, rotate_half
from dit_fast.testing import randomize_weights_
from dit_fast.transport import create_transport
from model_pairs import assert_same_step
from tolerances import FP32_RTOL, assert_same_grads, rel_err

COMMON = dict(input_size=4, in_channels=6, hidden_size=32, depth=3, num_heads=2, num_classes=10)
RECIPES = {
    "xl1-recipe": dict(use_swiglu=True, use_rope=True, use_rmsnorm=True, patch_size=1),
    "qknorm-wo-shift": dict(use_qknorm=True, use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=True,
                            patch_size=1),
    "plain-p2-sigma": dict(patch_size=2, learn_sigma=True),
    "layernorm-qknorm-rope": dict(use_qknorm=True, use_rope=True, patch_size=2),
}


def _pair(recipe, backend):
    ref = reference.LightningDiT(**COMMON, **RECIPES[recipe])
    randomize_weights_(ref).eval()
    return ref, dit_fast.from_reference(ref, backend=backend).eval()


def _inputs(n=2):
    return torch.randn(n, 6, 4, 4), torch.rand(n), torch.randint(0, 10, (n,))


def test_the_published_configs_and_constructor():
    names = ["LightningDiT-B/1", "LightningDiT-B/2", "LightningDiT-L/2", "LightningDiT-XL/1", "LightningDiT-XL/2",
             "LightningDiT-1p0B/1", "LightningDiT-1p0B/2", "LightningDiT-1p6B/1", "LightningDiT-1p6B/2"]
    assert sorted(dit_fast.LightningDiT_models) == sorted(names)
    with torch.device("meta"):
        model = dit_fast.LightningDiT_models["LightningDiT-XL/1"](input_size=16, use_swiglu=True, use_rope=True,
                                                                  use_rmsnorm=True)
    assert (model.in_channels, model.out_channels, model.learn_sigma) == (32, 32, False)
    assert (len(model.blocks), model.hidden_size, model.patch_size, model.num_heads) == (28, 1152, 1, 16)
    assert model.blocks[0].mlp.w12.out_features == 2 * 3072
    assert tuple(model.feat_rope.freqs_cos.shape) == (256, 72)
    with pytest.raises(ValueError, match="head_dim .* divisible by 4"):
        dit_fast.LightningDiT(hidden_size=36, num_heads=2, use_rope=True)


@pytest.mark.parametrize("recipe", RECIPES)
def test_module_tree_and_state_dict_keys_are_the_published_ones(recipe):
    ref, fast = _pair(recipe, "torch")
    kinds = lambda m: [(n, type(s).__name__) for n, s in m.named_modules()]  # noqa: E731
    assert kinds(fast) == kinds(ref)
    assert list(fast.state_dict()) == list(ref.state_dict())
    if RECIPES[recipe].get("use_rope"):
        assert "feat_rope.freqs_cos" in fast.state_dict() and "feat_rope.freqs_sin" in fast.state_dict()
    else:
        assert fast.feat_rope is None


def test_rope_buffers_are_eva_2d_interleaved_pairs():
    head_dim, grid = 8, 3
    rope = VisionRotaryEmbeddingFast(head_dim // 2, grid)
    freqs = 1.0 / 10000 ** (np.arange(0, head_dim // 2, 2) / (head_dim // 2))  # per axis: head_dim / 4
    for token in range(grid * grid):
        r, c = divmod(token, grid)
        angles = np.concatenate([np.repeat(r * freqs, 2), np.repeat(c * freqs, 2)])
        np.testing.assert_allclose(rope.freqs_cos[token].numpy(), np.cos(angles), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(rope.freqs_sin[token].numpy(), np.sin(angles), rtol=1e-6, atol=1e-6)
    x = torch.arange(4.0)
    assert torch.equal(rotate_half(x), torch.tensor([-1.0, 0.0, -3.0, 2.0]))


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_forward_gradients_and_guidance_match_the_published_model(recipe, backend, one_thread):
    ref, fast = _pair(recipe, backend)
    x, t, y = _inputs()
    out, want = fast(x, t, y), ref(x, t, y)
    assert out.shape == (2, 6, 4, 4)
    assert rel_err(out, want) < FP32_RTOL
    g = torch.randn_like(want)
    (out * g).sum().backward()
    (want * g).sum().backward()
    assert_same_grads(fast, ref)
    with torch.no_grad():
        for interval in (None, True):
            tt = torch.full((2,), 0.05)
            a = fast.forward_with_cfg(x, tt, y, 4.0, interval, 0.11)
            b = ref.forward_with_cfg(x, tt, y, 4.0, interval, 0.11)
            assert rel_err(a, b) < FP32_RTOL


def test_the_stock_recipe_runs_the_fused_ops(monkeypatch):
    calls = collections.Counter()
    for name in ("swiglu", "qk_norm_rope", "adaln_modulate", "gated_residual_adaln", "final_layer"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, real=real, name=name, **k: calls.update(
            [name + ("[rms]" if k.get("norm") == "rms" else "")]) or real(*a, **k))
    _, fast = _pair("qknorm-wo-shift", "triton")
    fast(*_inputs())
    assert calls == {"adaln_modulate[rms]": 1, "qk_norm_rope[rms]": 3, "gated_residual_adaln[rms]": 5,
                     "swiglu": 3, "final_layer[rms]": 1}


class ScaledRMSNorm(RMSNorm):
    def forward(self, x):
        return super().forward(x) * 1.5


class Wrapper(nn.Module):
    def __init__(self, inner, scale=3.0, offset=1.0):
        super().__init__()
        self.inner, self.scale, self.offset = inner, scale, offset

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs) * self.scale + self.offset


def _edits():
    yield "norm1 subclass", lambda m: setattr(m.blocks[1].norm1, "__class__", ScaledRMSNorm)
    yield "norm2 wrapped", lambda m: setattr(m.blocks[1], "norm2", Wrapper(m.blocks[1].norm2))
    yield "q_norm wrapped", lambda m: setattr(m.blocks[1].attn, "q_norm", Wrapper(m.blocks[1].attn.q_norm, 4.0, 2.0))
    yield "mlp wrapped", lambda m: setattr(m.blocks[1], "mlp", Wrapper(m.blocks[1].mlp))
    yield "w12 wrapped", lambda m: setattr(m.blocks[1].mlp, "w12", Wrapper(m.blocks[1].mlp.w12))
    yield "w3 wrapped", lambda m: setattr(m.blocks[1].mlp, "w3", Wrapper(m.blocks[1].mlp.w3))
    yield "rope wrapped", lambda m: setattr(m, "feat_rope", Wrapper(m.feat_rope))
    yield "norm_final subclass", lambda m: setattr(m.final_layer.norm_final, "__class__", ScaledRMSNorm)
    yield "mlp swapped for SwiGLUFFN subclass", lambda m: setattr(
        m.blocks[2].mlp, "__class__", type("MySwiGLU", (SwiGLUFFN,), {}))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_replaced_lightning_modules_are_honored(backend, one_thread):
    base, _ = _pair("qknorm-wo-shift", backend)
    x, t, y = _inputs()
    with torch.no_grad():
        stock = base(x, t, y)
    for what, edit in _edits():
        ref = copy.deepcopy(base)
        fast = dit_fast.from_reference(ref, backend=backend).eval()
        edit(ref)
        edit(fast)
        with torch.no_grad():
            want = ref(x, t, y)
            assert rel_err(fast(x, t, y), want) < FP32_RTOL, what
        if "subclass" in what and "SwiGLUFFN" not in what or "wrapped" in what:
            assert rel_err(want, stock) > 10 * FP32_RTOL, f"{what}: the edit changed nothing (the test is blind)"


def test_use_checkpoint_recomputes_every_block_with_the_same_gradients():
    ref = reference.LightningDiT(**COMMON, **RECIPES["xl1-recipe"], use_checkpoint=True)
    randomize_weights_(ref).train()
    fast = dit_fast.from_reference(ref, backend="torch").train()
    assert fast.use_checkpoint and fast.checkpoint_every == 1
    x, t, y = _inputs()
    assert_same_step(fast, ref, x, t, y, seed=3)


@pytest.mark.parametrize("cosine_lognorm", [True, False])
def test_the_recipe_training_losses_match_the_published_model(cosine_lognorm, one_thread):
    """Linear path, velocity, with LightningDiT's cosine loss and logit-normal t (NumPy's global generator)."""
    ref, fast = _pair("xl1-recipe", "auto")
    ref.train()
    fast.train()
    x, y = torch.randn(3, 6, 4, 4), torch.randint(0, 10, (3,))
    transport = create_transport("Linear", "velocity", use_cosine_loss=cosine_lognorm, use_lognorm=cosine_lognorm)
    terms = []
    for model in (fast, ref):
        torch.manual_seed(11)
        np.random.seed(11)
        terms.append(transport.training_losses(model, x, dict(y=y)))
    got, want = terms
    assert rel_err(got["loss"], want["loss"]) < FP32_RTOL
    if cosine_lognorm:
        assert rel_err(got["cos_loss"], want["cos_loss"]) < FP32_RTOL
