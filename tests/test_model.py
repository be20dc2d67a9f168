"""The fast DiT against the reference DiT: configs, parity, CFG, label dropout, bad input."""
import pytest
import torch

import dit_fast
from dit_fast import reference
from dit_fast.backends import probe
from dit_fast.testing import randomize_weights_
from tolerances import FP32_RTOL, rel_err

BACKENDS = ["torch", "triton", "ext"]


def _skip_unless_runs(backend, device="cpu"):
    ok, why = probe(backend, device)
    if not ok:
        pytest.skip(f"{backend} backend does not run here: {why}")


def expected_params(depth, hidden, patch, in_ch=4, input_size=32, num_classes=1000, learn_sigma=True):
    """Parameter count of a DiT computed from the architecture, independently of any module code."""
    D, out = hidden, in_ch * (2 if learn_sigma else 1)
    T = (input_size // patch) ** 2
    per_block = 18 * D * D + 15 * D  # qkv, proj, fc1, fc2 (mlp_ratio 4), adaLN 6D: weights + biases
    return (
        D * in_ch * patch * patch + D  # patch projection
        + T * D  # pos_embed (a frozen Parameter, counted like the original)
        + 256 * D + D + D * D + D  # timestep MLP
        + (num_classes + 1) * D  # label table with the null class
        + depth * per_block
        + patch * patch * out * D + patch * patch * out  # final linear
        + 2 * D * D + 2 * D  # final adaLN
    )


@pytest.mark.parametrize("name", sorted(reference.CONFIGS))
def test_every_config_builds_with_published_shapes(name):
    depth, hidden, patch, heads = reference.CONFIGS[name]
    with torch.device("meta"):
        ref = reference.DiT_models[name]()
        fast = dit_fast.DiT_models[name]()
    n = sum(p.numel() for p in fast.parameters())
    assert n == sum(p.numel() for p in ref.parameters()) == expected_params(depth, hidden, patch)
    if name == "DiT-XL/2":
        assert n == 675_129_632
    ref_sd, fast_sd = ref.state_dict(), fast.state_dict()
    assert list(ref_sd) == list(fast_sd)
    assert all(ref_sd[k].shape == fast_sd[k].shape for k in ref_sd)
    assert len(fast.blocks) == depth and fast.num_heads == heads and fast.patch_size == patch


def test_published_key_shapes():
    with torch.device("meta"):
        sd = dit_fast.DiT_models["DiT-XL/2"]().state_dict()
    D = 1152
    want = {
        "pos_embed": (1, 256, D),
        "x_embedder.proj.weight": (D, 4, 2, 2),
        "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256),
        "t_embedder.mlp.2.weight": (D, D),
        "y_embedder.embedding_table.weight": (1001, D),
        "blocks.27.attn.qkv.weight": (3 * D, D),
        "blocks.27.attn.proj.weight": (D, D),
        "blocks.0.mlp.fc1.weight": (4 * D, D),
        "blocks.0.mlp.fc2.weight": (D, 4 * D),
        "blocks.0.adaLN_modulation.1.weight": (6 * D, D),
        "final_layer.linear.weight": (32, D),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D),
    }
    for k, shape in want.items():
        assert tuple(sd[k].shape) == shape, k
    assert len(sd) == 1 + 2 + 4 + 1 + 28 * 10 + 4  # pos, x_embedder, t_embedder, y_embedder, blocks, final


def test_official_init_outputs_zero_and_pos_embed_is_frozen():
    model = dit_fast.DiT_models["DiT-S/8"](input_size=16)
    x, t, y = torch.randn(2, 4, 16, 16), torch.rand(2) * 999, torch.randint(0, 1000, (2,))
    assert torch.count_nonzero(model(x, t, y)) == 0  # why every parity test randomizes weights first
    assert not model.pos_embed.requires_grad
    assert torch.equal(
        model.pos_embed[0], reference.get_2d_sincos_pos_embed(384, 2).float()
    )


def _pair(name="DiT-S/2", dtype=torch.float32, depth=None, input_size=8, **kwargs):
    kw = dict(input_size=input_size)
    if depth is not None:
        kw["depth"] = depth
    ref = reference.DiT(**{**_config_kwargs(name), **kw}).to(dtype)
    randomize_weights_(ref)
    fast = dit_fast.from_reference(ref, **kwargs)
    return ref, fast


def _config_kwargs(name, **overrides):
    depth, hidden, patch, heads = reference.CONFIGS[name]
    return {**dict(depth=depth, hidden_size=hidden, patch_size=patch, num_heads=heads), **overrides}


def _inputs(n, model, dtype=torch.float32):
    s = model.input_size
    x = torch.randn(n, model.in_channels, s, s, dtype=dtype, requires_grad=True)
    return x, torch.rand(n) * 999, torch.randint(0, model.num_classes, (n,))


def _forward_backward(model, x, t, y):
    out = model(x, t, y)
    grad_out = torch.randn_like(out)
    gx, *gp = torch.autograd.grad(out, [x, *[p for p in model.parameters() if p.requires_grad]], grad_out)
    return out, gx, gp, grad_out


@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_fp32_forward_backward(backend):
    _skip_unless_runs(backend)
    depth = 12 if backend == "torch" else 2  # interpreted Triton is slow: fewer blocks, same code path
    ref, fast = _pair("DiT-S/2", depth=depth, input_size=16 if backend == "torch" else 8, backend=backend)
    ref.eval(), fast.eval()
    x, t, y = _inputs(3, ref)
    out_r = ref(x, t, y)
    g = torch.randn_like(out_r)
    params_r = [p for p in ref.parameters() if p.requires_grad]
    grads_r = torch.autograd.grad(out_r, [x, *params_r], g)
    out_f = fast(x, t, y)
    params_f = [p for p in fast.parameters() if p.requires_grad]
    grads_f = torch.autograd.grad(out_f, [x, *params_f], g)
    assert rel_err(out_f, out_r) < FP32_RTOL
    names = ["x"] + [n for n, p in ref.named_parameters() if p.requires_grad]
    for name, gf, gr in zip(names, grads_f, grads_r):
        assert rel_err(gf, gr) < FP32_RTOL, name


def test_parity_float64_is_exact_to_rounding():
    ref, fast = _pair("DiT-B/4", dtype=torch.float64, depth=3, input_size=16, backend="torch")
    x, t, y = _inputs(2, ref, torch.float64)
    ref.eval(), fast.eval()
    assert rel_err(fast(x, t, y), ref(x, t, y)) < 1e-12


def test_from_reference_shares_or_copies_weights():
    ref, copy = _pair("DiT-S/4", depth=2, backend="torch")
    shared = dit_fast.from_reference(ref, share_weights=True, backend="torch")
    p_ref = ref.blocks[0].attn.qkv.weight
    assert shared.blocks[0].attn.qkv.weight is p_ref
    assert copy.blocks[0].attn.qkv.weight is not p_ref
    assert torch.equal(copy.blocks[0].attn.qkv.weight, p_ref)
    ref.eval(), shared.eval()
    x, t, y = _inputs(2, ref)
    assert rel_err(shared(x, t, y), ref(x, t, y)) < FP32_RTOL


def test_state_dict_round_trip_strict():
    ref, _ = _pair("DiT-S/4", depth=2)
    fast = dit_fast.DiT(**_config_kwargs("DiT-S/4", depth=2, input_size=8))
    fast.load_state_dict(ref.state_dict(), strict=True)
    back = reference.DiT(**_config_kwargs("DiT-S/4", depth=2, input_size=8))
    back.load_state_dict(fast.state_dict(), strict=True)
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


@pytest.mark.parametrize("guide_all", [False, True])
def test_forward_with_cfg_matches_reference(guide_all):
    ref, fast = _pair("DiT-S/4", depth=2, backend="torch")
    ref.eval(), fast.eval()
    n = 4
    x, t, _ = _inputs(n, ref)
    y = torch.tensor([3, 7, 1000, 1000])  # conditional labels, then the null class
    scale = 4.0
    out_r = ref.forward_with_cfg(x, t, y, scale, guide_all_channels=guide_all)
    out_f = fast.forward_with_cfg(x, t, y, scale, guide_all_channels=guide_all)
    assert rel_err(out_f, out_r) < FP32_RTOL
    # Semantics: only the first half of x is used; guided channels combine cond/uncond; the rest pass through.
    raw = ref(torch.cat([x[:2], x[:2]]), t, y)
    g = 4 if guide_all else 3
    cond, uncond = raw[:2, :g], raw[2:, :g]
    want = uncond + scale * (cond - uncond)
    assert torch.allclose(out_r[:2, :g], want, atol=1e-6) and torch.allclose(out_r[2:, :g], want, atol=1e-6)
    assert torch.equal(out_r[:, g:], raw[:, g:])


def test_label_dropout():
    ref = reference.DiT(**_config_kwargs("DiT-S/8", depth=1, input_size=16, class_dropout_prob=1.0))
    randomize_weights_(ref)
    fast = dit_fast.from_reference(ref, backend="torch")
    x, t, y = _inputs(3, ref)
    null = torch.full_like(y, 1000)
    fast.train(), ref.train()
    with torch.no_grad():
        # p=1: every label becomes the null class in training...
        assert torch.allclose(fast(x, t, y), fast.eval()(x, t, null), atol=1e-6)
        fast.train()
        # ...forced drops apply in eval too, per element
        force = torch.tensor([1, 0, 1])
        fast.eval()
        mixed = torch.where(force == 1, null, y)
        assert torch.allclose(fast(x, t, y, force_drop_ids=force), fast(x, t, mixed), atol=1e-6)
        # in eval without forced drops, labels are kept
        assert not torch.allclose(fast(x, t, y), fast(x, t, null), atol=1e-4)
    # drop rate statistics at p=0.1
    emb = reference.LabelEmbedder(1000, 8, 0.1)
    labels = torch.zeros(20000, dtype=torch.long)
    dropped = (emb.token_drop(labels) == 1000).float().mean().item()
    assert 0.08 < dropped < 0.12


def test_bad_inputs_give_clear_errors():
    model = dit_fast.DiT(**_config_kwargs("DiT-S/8", depth=1, input_size=16, backend="torch"))
    x, t, y = torch.randn(2, 4, 16, 16), torch.rand(2), torch.tensor([1, 2])
    cases = [
        ((torch.randn(4, 16, 16), t, y), "x must have shape"),
        ((torch.randn(2, 3, 16, 16), t, y), "in_channels=4"),
        ((torch.randn(2, 4, 8, 8), t, y), "input_size=16"),
        ((x.long(), t, y), "floating-point"),
        ((x, torch.rand(3), y), "t must be a tensor of shape [2]"),
        ((x, t, torch.tensor([1, 2, 3])), "y must be an integer tensor of shape [2]"),
        ((x, t, torch.tensor([1.0, 2.0])), "y must be an integer tensor"),
        ((x, t, torch.tensor([1, 1001])), "got values in [1, 1001]"),
        ((x, t, torch.tensor([-1, 0])), "class labels in [0, 999] or 1000 (the null class)"),
    ]
    for args, msg in cases:
        with pytest.raises((ValueError, TypeError)) as e:
            model(*args)
        assert msg in str(e.value), (msg, str(e.value))
    with pytest.raises(ValueError, match="even batch"):
        model.forward_with_cfg(torch.randn(3, 4, 16, 16), torch.rand(3), torch.tensor([1, 2, 1000]), 4.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        dit_fast.DiT(depth=1, backend="cuda-magic")
    with pytest.raises(KeyError, match="unknown DiT config 'DiT-XXL/2'; known configs: DiT-XL/2, "):
        dit_fast.DiT_models["DiT-XXL/2"]


def test_no_null_class_without_dropout():
    model = dit_fast.DiT(**_config_kwargs("DiT-S/8", depth=1, input_size=16, class_dropout_prob=0.0))
    assert model.y_embedder.embedding_table.num_embeddings == 1000
    with pytest.raises(ValueError, match=r"in \[0, 999\], got"):
        model(torch.randn(1, 4, 16, 16), torch.rand(1), torch.tensor([1000]))


def test_env_var_overrides_auto(monkeypatch):
    from dit_fast import backends

    monkeypatch.setenv(backends.ENV_VAR, "torch")
    monkeypatch.setattr(backends, "_resolved", {})
    assert backends.resolve("auto", "adaln_modulate", "cpu") == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    monkeypatch.setattr(backends, "_resolved", {})
    with pytest.raises(ValueError, match="DIT_FAST_BACKEND must be one of"):
        backends.resolve("auto", "adaln_modulate", "cpu")


def test_sharded_block_path_matches(monkeypatch):
    """With FSDP2 each block must use only its own weights: the self-contained block path."""
    import dit_fast.models as models

    ref, fast = _pair("DiT-S/4", depth=3, backend="torch")
    ref.eval(), fast.eval()
    x, t, y = _inputs(2, ref)
    monkeypatch.setattr(models, "_is_sharded", lambda p: True)
    calls = []
    for block in fast.blocks:
        block.register_forward_pre_hook(lambda m, a: calls.append(m))  # FSDP2 gathers weights in such a hook
    out = fast(x, t, y)
    assert len(calls) == 3
    assert rel_err(out, ref(x, t, y)) < FP32_RTOL


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_same_gradients(every):
    ref, fast = _pair("DiT-S/4", depth=3, backend="torch")
    ckpt = dit_fast.from_reference(ref, backend="torch", checkpoint_every=every)
    x, t, y = _inputs(2, ref)
    fast.train(), ckpt.train()
    force = torch.zeros(2, dtype=torch.long)  # no random label dropout: both see the same labels
    g = torch.randn(2, 8, 8, 8)
    grads = []
    for m in (fast, ckpt):
        out = m(x, t, y, force_drop_ids=force)
        grads.append(torch.autograd.grad(out, [p for p in m.parameters() if p.requires_grad], g))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
