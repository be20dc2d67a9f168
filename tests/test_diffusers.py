"""Conversion to and from diffusers' DiTTransformer2DModel, checked against diffusers' own forward.

diffusers' DiT differs from the official one in its timestep frequencies (and, with its default
config, the pre-MLP LayerNorm eps): those differences are measured here, then neutralized so that
everything else is compared exactly (float64, to rounding).
"""
import math
import re
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers.models.embeddings import get_timestep_embedding  # noqa: E402

import dit_fast  # noqa: E402
from dit_fast import reference  # noqa: E402
from dit_fast.checkpoint import StateDictMismatchError, load_checkpoint  # noqa: E402
from dit_fast.convert_diffusers import (  # noqa: E402
    diffusers_config,
    dit_from_diffusers,
    dit_to_diffusers,
    from_diffusers,
    to_diffusers,
)
from dit_fast.testing import randomize_weights_  # noqa: E402
from tolerances import rel_err  # noqa: E402

HEADS, HEAD_DIM, DEPTH, SIZE = 4, 16, 2, 8
DIT_KWARGS = dict(input_size=SIZE, patch_size=2, in_channels=4, hidden_size=HEADS * HEAD_DIM, depth=DEPTH,
                  num_heads=HEADS, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True)
EXACT = 1e-12  # float64 on both sides


def _diffusers_dit(norm_eps=1e-6):
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8, num_layers=DEPTH,
        sample_size=SIZE, patch_size=2, num_embeds_ada_norm=1000, norm_eps=norm_eps,
    )
    torch.nn.Module.to(model, torch.float64)
    randomize_weights_(model)
    # One set of embedders, as in every converted official checkpoint: copy block 0's into the others.
    with torch.no_grad():
        emb0 = model.transformer_blocks[0].norm1.emb
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(emb0.state_dict())
    return model.eval()


def _official_frequencies(model):
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return model


def _inputs():
    x = torch.randn(3, 4, SIZE, SIZE, dtype=torch.float64)
    t = torch.tensor([0.0, 37.0, 999.0])
    y = torch.tensor([1, 999, 1000])  # 1000: the null class
    return x, t, y


def _reference_from(sd, config):
    model = reference.DiT(**config).double().eval()
    load_checkpoint(model, sd, strict=True)
    return model


@torch.no_grad()
def test_timestep_embedding_difference_is_what_is_documented():
    t = torch.arange(1000, dtype=torch.float32)
    official = reference.timestep_embedding(t, 256)
    # diffusers' DiT: Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)
    theirs = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=1)
    assert torch.equal(official, get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0))
    rel = (theirs - official).norm(dim=1) / official.norm(dim=1)
    for step, documented in [(1, 1.3e-3), (10, 0.013), (100, 0.13), (999, 1.01)]:
        assert rel[step].item() == pytest.approx(documented, rel=0.03), step
    assert rel.mean().item() == pytest.approx(0.57, rel=0.02)
    assert (theirs - official).abs().max().item() == pytest.approx(1.98, rel=0.01)
    i = torch.arange(128, dtype=torch.float64)
    ratio = torch.exp(-math.log(1e4) * i / 127) / torch.exp(-math.log(1e4) * i / 128)
    assert ratio[0] == 1 and ratio.min().item() == pytest.approx(0.931, abs=5e-4)


@torch.no_grad()
def test_converted_reference_matches_diffusers_forward():
    theirs = _diffusers_dit()
    sd, config = from_diffusers(theirs.state_dict(), theirs.config)
    assert config == DIT_KWARGS
    ours = _reference_from(sd, config)
    x, t, y = _inputs()
    want_diffusers = theirs(x, t, y).sample
    got = ours(x, t, y)
    assert got.abs().max() > 0.1
    # As they are, the two differ by the timestep frequencies only ...
    assert rel_err(got, want_diffusers) > 1e-3
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reference, "timestep_embedding", lambda t, dim=256: get_timestep_embedding(
            t, dim, flip_sin_to_cos=True, downscale_freq_shift=1))
        assert rel_err(ours(x, t, y), want_diffusers) < EXACT
    # ... and with diffusers set to the official frequencies everything agrees.
    assert rel_err(got, _official_frequencies(theirs)(x, t, y).sample) < EXACT


@torch.no_grad()
def test_diffusers_default_norm_eps_is_warned_and_is_the_only_other_difference():
    theirs = _official_frequencies(_diffusers_dit(norm_eps=1e-5))
    with pytest.warns(UserWarning, match="norm_eps=1e-05"):
        sd, config = from_diffusers(theirs.state_dict(), theirs.config)
    ours = _reference_from(sd, config)
    x, t, y = _inputs()
    got = ours(x, t, y)
    err = rel_err(got, theirs(x, t, y).sample)
    assert 1e-8 < err < 1e-4  # documented: ~1e-6 with unit-variance activations
    for block in theirs.transformer_blocks:
        assert block.norm1.norm.eps == 1e-6 and block.norm3.eps == 1e-5
        block.norm3.eps = 1e-6
    assert theirs.norm_out.eps == 1e-6
    assert rel_err(got, theirs(x, t, y).sample) < EXACT


@torch.no_grad()
def test_dit_from_diffusers_gives_the_fast_model():
    theirs = _official_frequencies(_diffusers_dit())
    fast = dit_from_diffusers(theirs, backend="torch")
    assert isinstance(fast, dit_fast.DiT) and not fast.training
    assert fast.pos_embed.dtype == torch.float64 and not fast.pos_embed.requires_grad
    x, t, y = _inputs()
    assert rel_err(fast(x, t, y), theirs(x, t, y).sample) < EXACT


@pytest.mark.parametrize("kind", ["reference", "fast"])
@torch.no_grad()
def test_dit_to_diffusers_matches(kind):
    ref = randomize_weights_(reference.DiT(**DIT_KWARGS)).double().eval()
    model = ref if kind == "reference" else dit_fast.from_reference(ref, backend="torch")
    theirs = dit_to_diffusers(model)
    assert isinstance(theirs, diffusers.DiTTransformer2DModel) and not theirs.training
    assert theirs.config.norm_eps == 1e-6 and theirs.dtype == torch.float64
    native = diffusers.DiTTransformer2DModel(**diffusers_config(DIT_KWARGS))
    assert {k: v.shape for k, v in theirs.state_dict().items()} == {k: v.shape for k, v in native.state_dict().items()}
    x, t, y = _inputs()
    assert rel_err(_official_frequencies(theirs)(x, t, y).sample, ref(x, t, y)) < EXACT


def test_round_trips_are_exact():
    ref = randomize_weights_(reference.DiT(**DIT_KWARGS))
    sd = ref.state_dict()
    as_diffusers = to_diffusers(sd, DIT_KWARGS)
    back, config = from_diffusers(as_diffusers, diffusers_config(DIT_KWARGS))
    assert config == DIT_KWARGS
    assert list(back) == list(sd)  # same keys, same order
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    again = to_diffusers(back, config)
    assert set(again) == set(as_diffusers) and all(torch.equal(again[k], as_diffusers[k]) for k in again)
    # No shared storage (replicated embedders, split qkv): the result can go straight to safetensors.
    ptrs = [v.untyped_storage().data_ptr() for v in as_diffusers.values()]
    assert len(set(ptrs)) == len(ptrs)


def test_qkv_split_and_embedder_replication():
    sd = randomize_weights_(reference.DiT(**DIT_KWARGS)).state_dict()
    out = to_diffusers(sd)
    D = HEADS * HEAD_DIM
    qkv = sd["blocks.1.attn.qkv.weight"]
    for j, name in enumerate(("to_q", "to_k", "to_v")):
        assert torch.equal(out[f"transformer_blocks.1.attn1.{name}.weight"], qkv[j * D:(j + 1) * D])
    for i in range(DEPTH):
        assert torch.equal(out[f"transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight"],
                           sd["y_embedder.embedding_table.weight"])
        assert torch.equal(out[f"transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_2.bias"],
                           sd["t_embedder.mlp.2.bias"])


def test_diverged_embedders_are_an_error_or_a_warning():
    sd = to_diffusers(randomize_weights_(reference.DiT(**DIT_KWARGS)).state_dict())
    key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.weight"
    sd[key] = sd[key] + 1e-3
    with pytest.raises(ValueError, match=re.escape(key) + " differs"):
        from_diffusers(sd, num_heads=HEADS, input_size=SIZE)
    with pytest.warns(UserWarning, match="using block 0's copies"):
        back, _ = from_diffusers(sd, num_heads=HEADS, input_size=SIZE, strict_embedders=False)
    assert torch.equal(back["t_embedder.mlp.0.weight"], sd[key.replace("blocks.1.", "blocks.0.")])


def test_num_heads_and_input_size_come_from_arguments_config_or_standard_table():
    sd = to_diffusers(randomize_weights_(reference.DiT(**DIT_KWARGS)).state_dict())
    with pytest.raises(ValueError, match="num_heads is needed"):
        from_diffusers(sd, input_size=SIZE)
    with pytest.raises(ValueError, match="input_size is needed"):
        from_diffusers(sd, num_heads=HEADS)
    with pytest.raises(ValueError, match="num_heads=8 disagrees with config num_attention_heads=4"):
        from_diffusers(sd, {"num_attention_heads": 4}, num_heads=8, input_size=SIZE)
    with pytest.raises(ValueError, match="positive divisor"):
        from_diffusers(sd, num_heads=3, input_size=SIZE)
    assert from_diffusers(sd, num_heads=8, input_size=SIZE)[1]["num_heads"] == 8
    # A standard config (DiT-S: depth 12, width 384) is recognised, with a warning; zeros keep it cheap.
    with torch.device("meta"):
        shapes = reference.DiT_models["DiT-S/8"](input_size=16).state_dict()
    small = {k: torch.zeros(v.shape) for k, v in shapes.items()}
    small["pos_embed"] = reference.get_2d_sincos_pos_embed(384, 2).float().unsqueeze(0)
    with pytest.warns(UserWarning, match="assuming 6, the DiT-S value"):
        _, config = from_diffusers(to_diffusers(small), input_size=16)
    assert config["num_heads"] == 6 and config["depth"] == 12 and config["patch_size"] == 8


def test_bad_state_dicts_and_configs():
    sd = randomize_weights_(reference.DiT(**DIT_KWARGS)).state_dict()
    theirs = to_diffusers(sd)
    cfg = diffusers_config(DIT_KWARGS)
    broken = dict(theirs)
    del broken["transformer_blocks.1.ff.net.2.bias"]
    broken["transformer_blocks.1.norm3.weight"] = torch.ones(HEADS * HEAD_DIM)
    want = r"(?s)missing keys \(1\): transformer_blocks\.1\.ff\.net\.2\.bias.*unexpected keys \(1\): "
    with pytest.raises(StateDictMismatchError, match=want + r"transformer_blocks\.1\.norm3\.weight"):
        from_diffusers(broken, cfg)
    with pytest.raises(ValueError, match=r"num_attention_heads x attention_head_dim = 4 x 8"):
        from_diffusers(theirs, {**cfg, "attention_head_dim": 8})
    with pytest.raises(ValueError, match=r"num_layers=3, but the state_dict's shapes give 2"):
        from_diffusers(theirs, {**cfg, "num_layers": 3})
    with pytest.raises(ValueError, match=r"activation_fn='gelu'.*'gelu-approximate'"):
        from_diffusers(theirs, {**cfg, "activation_fn": "gelu"})
    with pytest.raises(ValueError, match="pos_embed is not the fixed 2D sin-cos table"):
        to_diffusers({**sd, "pos_embed": sd["pos_embed"] + 1e-3})
    with pytest.raises(ValueError, match="depth=3, but the state_dict's shapes give 2"):
        to_diffusers(sd, {**DIT_KWARGS, "depth": 3})
    with pytest.raises(ValueError, match="num_classes=10 means a label table of 11 rows, .* has 1001"):
        to_diffusers(sd, {**DIT_KWARGS, "num_classes": 10})
    with pytest.raises(ValueError, match="class_dropout_prob=0"):
        to_diffusers(sd, {**DIT_KWARGS, "class_dropout_prob": 0.0})
    with pytest.raises(ValueError, match="mlp_ratio=2.0"):
        diffusers_config({**DIT_KWARGS, "mlp_ratio": 2.0})
    with pytest.raises(StateDictMismatchError, match="x_embedder.proj.weight' is missing"):
        to_diffusers(theirs)
    with pytest.raises(StateDictMismatchError, match="pos_embed.proj.weight' is missing"):
        from_diffusers(sd)


def test_missing_diffusers_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match=r"pip install dit_fast\[diffusers\]"):
        dit_to_diffusers(reference.DiT(**DIT_KWARGS))
