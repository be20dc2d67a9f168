"""The fused sampling step (Triton + torch) against the unfused dit_fast.diffusion path, and dit_fast.sample."""
from __future__ import annotations

import os

import pytest
import torch

import dit_fast
from conftest import DEVICE
from dit_fast import reference
from dit_fast.diffusion import create_diffusion
from dit_fast.ops.sampler_step import NUM_COLS, sampler_step, sampler_step_
from dit_fast.sampling import build_step_table, sample
from dit_fast.testing import randomize_weights_
from tolerances import FP32_RTOL, rel_err


class _FixedOutput(torch.nn.Module):
    """Stands in for a DiT whose forward returns a given tensor (to drive reference.forward_with_cfg)."""

    def __init__(self, out, in_channels):
        super().__init__()
        self.out, self.in_channels = out, in_channels

    def forward(self, x, t, y):
        return self.out


def _unfused(diffusion, sampler, out, x, t_idx, cfg, cfg_scale, guide_all, clip, eta, seed, learn_sigma=True):
    """One step of the published path; returns (new x of the first n rows, the noise it drew)."""
    n, C = x.shape[:2]
    fake = _FixedOutput(out, C)
    x_in = torch.cat([x, torch.randn_like(x)]) if cfg else x  # the unused half: anything

    def model_fn(xx, tt):
        if cfg:
            return reference.forward_with_cfg(fake, xx, tt, None, cfg_scale, guide_all)
        return out

    t = torch.full((x_in.shape[0],), t_idx, dtype=torch.long)
    torch.manual_seed(seed)
    if sampler == "ddpm":
        res = diffusion.p_sample(model_fn, x_in, t, clip_denoised=clip)
    else:
        res = diffusion.ddim_sample(model_fn, x_in, t, clip_denoised=clip, eta=eta)
    torch.manual_seed(seed)
    noise = torch.randn_like(x_in)
    return res["sample"][:n], noise


CASES = [
    # sampler, cfg, guide_all, clip, eta, learn_sigma
    ("ddpm", True, False, False, 0.0, True),
    ("ddpm", True, True, True, 0.0, True),
    ("ddpm", False, False, False, 0.0, True),
    ("ddpm", False, False, True, 0.0, False),
    ("ddim", True, False, False, 0.0, True),
    ("ddim", True, False, True, 1.0, True),
    ("ddim", False, False, False, 0.5, False),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_step_matches_unfused(backend, case, dtype):
    sampler, cfg, guide_all, clip, eta, learn_sigma = case
    diffusion = create_diffusion("10", learn_sigma=learn_sigma)
    n, C, H, W = (1, 4, 3, 5) if cfg else (2, 3, 3, 3)  # odd spatial sizes, batch 1
    cfg_scale = 4.0
    x = torch.randn(n, C, H, W, dtype=dtype)
    out = torch.randn(2 * n if cfg else n, 2 * C if learn_sigma else C, H, W, dtype=dtype)
    if clip:
        x = x * 3  # so that x0 leaves [-1, 1] and the clamp matters
    table, _ = build_step_table(diffusion, sampler, eta, dtype)
    seed = int(torch.randint(0, 2**31, ()).item())
    for k in (0, 4, 9):  # first, middle and the last (noise-free) step
        t_idx = diffusion.num_timesteps - 1 - k
        ref, noise = _unfused(diffusion, sampler, out, x, t_idx, cfg, cfg_scale, guide_all, clip, eta, seed,
                              learn_sigma)
        got = sampler_step(x, out, noise, table, torch.tensor([k]), cfg_scale=cfg_scale,
                           guided_channels=C if guide_all else 3, cfg=cfg, learn_sigma=learn_sigma,
                           clip=clip, ddim=sampler == "ddim", backend=backend)
        assert got.dtype == dtype and not torch.isnan(got).any()
        # float64: the published path rounds each coefficient to float32 (ours stays float64)
        bound = 2e-6 if dtype == torch.float64 else FP32_RTOL
        err = rel_err(got, ref.double())
        assert err <= bound, f"step {k}: relative error {err:.3e} > {bound:.1e}"


def test_fused_step_float32_against_float64_reference():
    d = create_diffusion("10")
    x, out = torch.randn(2, 4, 4, 4, dtype=torch.float64), torch.randn(4, 8, 4, 4, dtype=torch.float64)
    ref, noise = _unfused(d, "ddpm", out, x, 6, True, 4.0, False, False, 0.0, 0)
    table32, _ = build_step_table(d, "ddpm", 0.0, torch.float32)
    for backend in ("torch", "triton"):
        got = sampler_step(x.float(), out.float(), noise.float(), table32, torch.tensor([3]), cfg_scale=4.0,
                           cfg=True, backend=backend)
        assert rel_err(got, ref) <= FP32_RTOL


def test_bf16_model_output():
    d = create_diffusion("10")
    x, out = torch.randn(1, 4, 4, 4), torch.randn(2, 8, 4, 4).bfloat16()
    table, _ = build_step_table(d, "ddpm")
    noise = torch.randn(2, 4, 4, 4)
    a = sampler_step(x, out, noise, table, torch.tensor([2]), cfg_scale=1.5, cfg=True, backend="torch")
    b = sampler_step(x, out, noise, table, torch.tensor([2]), cfg_scale=1.5, cfg=True, backend="triton")
    ref = sampler_step(x.double(), out.double(), noise.double(), build_step_table(d, "ddpm", dtype=torch.float64)[0],
                       torch.tensor([2]), cfg_scale=1.5, cfg=True, backend="torch")
    # the torch twin guides in bf16 like forward_with_cfg; the kernel in float32: both near the float64 value
    assert rel_err(b, ref) <= FP32_RTOL
    assert rel_err(a, ref) <= 1e-2


def test_in_place_and_step_counter_on_device():
    d = create_diffusion("4")
    table, _ = build_step_table(d, "ddpm")
    x = torch.randn(1, 4, 2, 2)
    x_before = x.clone()
    out, noise, step = torch.randn(1, 8, 2, 2), torch.randn(1, 4, 2, 2), torch.tensor([1])
    new = sampler_step(x, out, noise, table, step, backend="torch")
    assert torch.equal(x, x_before)  # functional form
    r = sampler_step_(x, out, noise, table, step, backend="torch")
    assert r is x and torch.equal(x, new)


def test_bad_arguments_are_named():
    d = create_diffusion("4")
    table, _ = build_step_table(d, "ddpm")
    x, noise, step = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2), torch.tensor([0])
    with pytest.raises(ValueError, match="model_out must be .*\\[2, 8, 2, 2\\]"):
        sampler_step(x, torch.randn(1, 8, 2, 2), noise, table, step, cfg=True)
    with pytest.raises(ValueError, match="noise must be"):
        sampler_step(x, torch.randn(1, 8, 2, 2), noise[:, :3], table, step)
    with pytest.raises(ValueError, match="table must be"):
        sampler_step(x, torch.randn(1, 8, 2, 2), noise, table[:, :5], step)
    with pytest.raises(ValueError, match="step must be"):
        sampler_step(x, torch.randn(1, 8, 2, 2), noise, table, torch.tensor([0.0]))
    with pytest.raises(ValueError, match="backend must be"):
        sampler_step(x, torch.randn(1, 8, 2, 2), noise, table, step, backend="cuda")
    with pytest.raises(ValueError, match="sampler must be"):
        build_step_table(d, "euler")


def test_table_width_matches_kernel():
    from dit_fast.kernels import sampler_step as K

    assert K.NUM_COLS == NUM_COLS


# --------------------------------------------------------------------------- dit_fast.sample
def tiny(fast=True, device="cpu"):
    cls = dit_fast.DiT if fast else reference.DiT
    kw = dict(backend="torch") if fast else {}
    model = cls(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10, **kw)
    return randomize_weights_(model).to(device).eval()


def _published(model, labels, num_steps, cfg_scale, seed, sampler="ddpm"):
    torch.manual_seed(seed)
    n = len(labels)
    z = torch.randn(n, 4, 8, 8)
    y = torch.tensor(labels)
    d = create_diffusion(str(num_steps))
    if cfg_scale > 1:
        z, y = torch.cat([z, z]), torch.cat([y, torch.full_like(y, 10)])
        fn, kw = model.forward_with_cfg, dict(y=y, cfg_scale=cfg_scale)
    else:
        fn, kw = model.forward, dict(y=y)
    loop = d.p_sample_loop if sampler == "ddpm" else d.ddim_sample_loop
    return loop(fn, z.shape, z, clip_denoised=False, model_kwargs=kw, device="cpu")[:n]


@pytest.mark.parametrize("fast", [True, False], ids=["dit_fast", "reference"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sample_equals_published_loop(fast, sampler):
    model = tiny(fast)
    seed = int(torch.randint(0, 2**31, ()).item())
    ref = _published(model, [3, 1, 4], 6, 4.0, seed, sampler)
    torch.manual_seed(seed)
    got = sample(model, [3, 1, 4], num_steps=6, cfg_scale=4.0, sampler=sampler, backend="torch")
    assert got.shape == (3, 4, 8, 8)
    assert rel_err(got, ref) <= FP32_RTOL


def test_sample_triton_backend_and_no_cfg():
    model = tiny()
    seed = int(torch.randint(0, 2**31, ()).item())
    ref = _published(model, [2], 3, 1.0, seed)
    torch.manual_seed(seed)
    got = sample(model, [2], num_steps=3, cfg_scale=1.0, backend="triton", cfg_mode="above_one")
    assert rel_err(got, ref) <= FP32_RTOL


def test_sample_generator_and_inference_mode():
    model = tiny()
    g = torch.Generator().manual_seed(123)
    a = sample(model, torch.tensor([0, 9]), num_steps=3, generator=g)
    with torch.inference_mode():
        b = sample(model, torch.tensor([0, 9]), num_steps=3, generator=torch.Generator().manual_seed(123))
    c = sample(model, torch.tensor([0, 9]), num_steps=3, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sample_bad_arguments():
    model = tiny()
    with pytest.raises(ValueError, match="class_labels must lie in \\[0, 9\\]"):
        sample(model, [10], num_steps=2)
    with pytest.raises(ValueError, match="sampler must be"):
        sample(model, [1], num_steps=2, sampler="euler")
    with pytest.raises(ValueError, match="num_steps"):
        sample(model, [1], num_steps=0)
    with pytest.raises(ValueError, match="noise must have shape"):
        sample(model, [1], num_steps=2, noise=torch.randn(2, 4, 8, 8))
    with pytest.raises(TypeError, match="in_channels"):
        sample(torch.nn.Linear(2, 2), [1], num_steps=2)


@pytest.mark.slow
def test_sample_with_compiled_model():
    if DEVICE == "cpu" and os.cpu_count() and os.cpu_count() < 2:
        pytest.skip("torch.compile of a DiT takes too long on one CPU core")
    model = tiny()
    compiled = torch.compile(model, mode="reduce-overhead")
    seed = int(torch.randint(0, 2**31, ()).item())
    torch.manual_seed(seed)
    a = sample(model, [1, 2], num_steps=3, backend="torch")
    torch.manual_seed(seed)
    b = sample(compiled, [1, 2], num_steps=3, backend="torch")
    assert rel_err(b, a) <= 1e-5


@pytest.mark.gpu
def test_sample_cuda_graph_equals_eager_gpu():
    model = tiny(device="cuda")
    seed = int(torch.randint(0, 2**31, ()).item())
    out = {}
    for graph in (False, True):
        g = torch.Generator("cuda").manual_seed(seed)
        out[graph] = sample(model, [1, 2, 3], num_steps=20, generator=g, cuda_graph=graph)
    assert rel_err(out[True], out[False]) <= FP32_RTOL
    torch.manual_seed(seed)
    ref = sample(model, [1, 2, 3], num_steps=20, cuda_graph=False, backend="torch")
    torch.manual_seed(seed)
    torch.cuda.manual_seed(seed)
    z = torch.randn(3, 4, 8, 8, device="cuda")
    d = create_diffusion("20")
    y = torch.tensor([1, 2, 3, 10, 10, 10], device="cuda")
    pub = d.p_sample_loop(model.forward_with_cfg, (6, 4, 8, 8), torch.cat([z, z]), clip_denoised=False,
                          model_kwargs=dict(y=y, cfg_scale=4.0), device="cuda")[:3]
    assert rel_err(ref, pub) <= FP32_RTOL


def test_sampling_bench_smoke_cpu():
    from dit_fast.bench.flops import DiTShape
    from dit_fast.bench.sampling import run_sampling_bench

    shape = DiTShape(depth=1, hidden_size=32, patch_size=2, num_heads=2, input_size=4)
    rows = run_sampling_bench(shape, device=torch.device("cpu"), batches=(1,), num_steps=2, rounds=2, backend="torch")
    names = [r["contender"] for r in rows]
    assert names == ["reference", "dit_fast"]
    for r in rows:
        assert r["error"] is None, r["error"]
        assert r["median_ms"] > 0 and r["images_per_s"] > 0 and r["batch"] == 1 and r["num_steps"] == 2
    assert rows[1]["speedup_vs_reference"] > 0
