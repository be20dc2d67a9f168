"""dit_fast.sample with any DiT-like module (sizes read as the published model states them), and the
two published noise streams for cfg_scale <= 1 (sample.py doubles the batch always, sample_ddp.py not)."""
from __future__ import annotations

import pytest
import torch

import dit_fast
from dit_fast import reference
from dit_fast.diffusion import create_diffusion
from dit_fast.dit_like import read_dit_like
from dit_fast.sampling import sample
from dit_fast.testing import randomize_weights_
from tolerances import FP32_RTOL, rel_err

N_CLASSES, C, S = 10, 4, 8


def tiny(fast: bool):
    cls = dit_fast.DiT if fast else reference.DiT
    kw = dict(backend="torch") if fast else {}
    model = cls(input_size=S, patch_size=2, in_channels=C, hidden_size=32, depth=1, num_heads=2,
                num_classes=N_CLASSES, **kw)
    return randomize_weights_(model).eval()


def published_like(model):
    """The attributes the published DiT has: no input_size, no num_classes (x_embedder and y_embedder say)."""
    del model.input_size, model.num_classes
    return model


def _sample_py(model, labels, steps, cfg_scale, seed):
    """The published sample.py: randn [n], doubled with null labels at any cfg_scale, forward_with_cfg."""
    torch.manual_seed(seed)
    z = torch.randn(len(labels), C, S, S)
    y = torch.tensor(labels)
    z2, y2 = torch.cat([z, z]), torch.cat([y, torch.full_like(y, N_CLASSES)])
    out = create_diffusion(str(steps)).p_sample_loop(model.forward_with_cfg, z2.shape, z2, clip_denoised=False,
                                                     model_kwargs=dict(y=y2, cfg_scale=cfg_scale), device="cpu")
    return out[: len(labels)]


def _sample_ddp_py(model, n, steps, seed):
    """The published sample_ddp.py with cfg_scale <= 1: randn [n], then randint labels, then model.forward."""
    torch.manual_seed(seed)
    z = torch.randn(n, C, S, S)
    y = torch.randint(0, N_CLASSES, (n,))
    out = create_diffusion(str(steps)).p_sample_loop(model.forward, z.shape, z, clip_denoised=False,
                                                     model_kwargs=dict(y=y), device="cpu")
    return out, y


def test_read_dit_like_from_published_attributes():
    model = published_like(tiny(fast=False))
    assert read_dit_like(model) == (C, (S, S), N_CLASSES, True)
    model.x_embedder.img_size = None  # timm with dynamic sizes: grid_size * patch_size
    assert read_dit_like(model).latent_hw == (S, S)
    del model.in_channels, model.learn_sigma  # x_embedder.proj.in_channels; out_channels = 2 * in_channels
    assert read_dit_like(model) == (C, (S, S), N_CLASSES, True)
    model.x_embedder.grid_size = None
    with pytest.raises(TypeError, match="latent size of DiT is unknown.*pass latent_size="):
        read_dit_like(model)
    assert read_dit_like(model, latent_size=(6, 10)).latent_hw == (6, 10)
    with pytest.raises(ValueError, match="latent_size must be a positive int or a pair of them, got 0"):
        read_dit_like(model, latent_size=0)
    with pytest.raises(TypeError, match="neither in_channels nor x_embedder.proj.in_channels"):
        read_dit_like(torch.nn.Linear(2, 2))
    del model.y_embedder
    with pytest.raises(TypeError, match="neither num_classes nor y_embedder.num_classes"):
        read_dit_like(model, latent_size=8)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sample_takes_a_published_like_model(sampler):
    model = published_like(tiny(fast=False))
    seed = int(torch.randint(0, 2**31, ()).item())
    torch.manual_seed(seed)
    z = torch.randn(2, C, S, S)
    d = create_diffusion("3")
    y2 = torch.tensor([3, 7, N_CLASSES, N_CLASSES])
    loop = d.p_sample_loop if sampler == "ddpm" else d.ddim_sample_loop
    ref = loop(model.forward_with_cfg, (4, C, S, S), torch.cat([z, z]), clip_denoised=False,
               model_kwargs=dict(y=y2, cfg_scale=4.0), device="cpu")[:2]
    torch.manual_seed(seed)
    got = sample(model, [3, 7], num_steps=3, cfg_scale=4.0, sampler=sampler, backend="torch")
    assert got.shape == (2, C, S, S) and rel_err(got, ref) <= FP32_RTOL

    model.x_embedder.img_size = model.x_embedder.grid_size = None  # the size only from the argument
    with pytest.raises(TypeError, match="pass latent_size="):
        sample(model, [3, 7], num_steps=3, backend="torch")
    torch.manual_seed(seed)
    again = sample(model, [3, 7], num_steps=3, cfg_scale=4.0, sampler=sampler, backend="torch", latent_size=S)
    assert torch.equal(again, got)


@pytest.mark.parametrize("cfg_scale", [1.0, 0.5])
def test_cfg_mode_always_is_sample_py(cfg_scale):
    model = tiny(fast=True)
    seed = int(torch.randint(0, 2**31, ()).item())
    ref = _sample_py(model, [1, 8, 5], 4, cfg_scale, seed)
    torch.manual_seed(seed)
    got = sample(model, [1, 8, 5], num_steps=4, cfg_scale=cfg_scale, backend="torch")  # the default: "always"
    assert rel_err(got, ref) <= FP32_RTOL


def test_cfg_mode_above_one_is_sample_ddp_py():
    model = tiny(fast=True)
    seed = int(torch.randint(0, 2**31, ()).item())
    ref, labels = _sample_ddp_py(model, 3, 4, seed)
    torch.manual_seed(seed)
    z = torch.randn(3, C, S, S)  # sample_ddp.py's order: latents, then labels, then the loop
    y = torch.randint(0, N_CLASSES, (3,))
    assert torch.equal(y, labels)
    got = sample(model, y, num_steps=4, cfg_scale=1.0, noise=z, cfg_mode="above_one", backend="torch")
    assert rel_err(got, ref) <= FP32_RTOL

    # the two streams differ at cfg_scale 1 (so the tests above tell them apart) ...
    torch.manual_seed(seed)
    always = sample(model, y, num_steps=4, cfg_scale=1.0, noise=z, backend="torch")
    assert rel_err(always, got) > 1e-2
    # ... and agree when guidance is on
    outs = []
    for mode in ("always", "above_one"):
        torch.manual_seed(seed)
        outs.append(sample(model, y, num_steps=4, cfg_scale=3.0, noise=z, cfg_mode=mode, backend="torch"))
    assert torch.equal(outs[0], outs[1])


def test_cfg_mode_is_checked():
    with pytest.raises(ValueError, match="cfg_mode must be one of \\('always', 'above_one'\\).*got 'ddp'"):
        sample(tiny(fast=True), [1], num_steps=2, cfg_mode="ddp")


@pytest.mark.gpu
def test_published_like_model_cuda_graph_gpu():
    model = published_like(tiny(fast=False)).cuda()
    seed = int(torch.randint(0, 2**31, ()).item())
    out = {}
    for graph in (False, True):
        for cfg_scale in (4.0, 1.0):
            g = torch.Generator("cuda").manual_seed(seed)
            out[graph, cfg_scale] = sample(model, [1, 2, 3], num_steps=8, cfg_scale=cfg_scale, generator=g,
                                           cuda_graph=graph)
    for cfg_scale in (4.0, 1.0):
        assert out[True, cfg_scale].shape == (3, C, S, S)
        assert rel_err(out[True, cfg_scale], out[False, cfg_scale]) <= FP32_RTOL
