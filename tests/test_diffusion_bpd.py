"""The variational bound (calc_bpd_loop, _prior_bpd), the continuous likelihood and the timestep samplers.

Formulas against independent float64 derivations; random draws against golden values of the published
DiT code (facebookresearch/DiT, diffusion/timestep_sampler.py, run once with NumPy 2 after replacing
its `np.int` by `np.int64`).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import dit_fast
from dit_fast.diffusion import create_diffusion
from dit_fast.diffusion import timestep_sampler as ts
from dit_fast.diffusion.losses import continuous_gaussian_log_likelihood
from dit_fast.testing import randomize_weights_
from tolerances import FP32_RTOL, rel_err

LN2 = math.log(2.0)
# The prior term KL(q(x_T | x_0) || N(0, I)) is ~1e-5 bits, and as published its variance part
# (-1 - log v + v, with v = 1 - alpha_bar_T near 1) is computed in float32 even for float64 x_0 (the
# gathered log variance is float32 and the 0-dim float64 zero does not promote it): a few float32 ulps
# of absolute error, far above 1e-5 relative. Checked absolutely.
PRIOR_ATOL_BITS = 4 * torch.finfo(torch.float32).eps / LN2


# --------------------------------------------------------------------------- likelihood terms
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_continuous_gaussian_log_likelihood_float64(dtype):
    x = torch.randn(3, 5, 7, dtype=torch.float64) * 2
    means = torch.randn(3, 5, 7, dtype=torch.float64)
    log_scales = torch.randn(1, 5, 1, dtype=torch.float64)  # broadcasts
    # As published: the standard-normal density of the standardized x, i.e. log N(x; m, s) + log s.
    ref = torch.distributions.Normal(means, log_scales.exp()).log_prob(x) + log_scales
    got = continuous_gaussian_log_likelihood(x.to(dtype), means=means.to(dtype), log_scales=log_scales.to(dtype))
    assert got.dtype == dtype and got.shape == ref.shape
    assert rel_err(got, ref) <= (1e-12 if dtype == torch.float64 else FP32_RTOL)


def test_published_module_names_import():
    from dit_fast.diffusion.diffusion_utils import (  # noqa: F401
        approx_standard_normal_cdf,
        continuous_gaussian_log_likelihood,
        discretized_gaussian_log_likelihood,
        normal_kl,
    )
    from dit_fast.diffusion.gaussian_diffusion import GaussianDiffusion, mean_flat  # noqa: F401
    from dit_fast.diffusion.respace import SpacedDiffusion, space_timesteps  # noqa: F401
    from dit_fast.diffusion.timestep_sampler import create_named_schedule_sampler  # noqa: F401

    assert GaussianDiffusion is dit_fast.diffusion.GaussianDiffusion


# --------------------------------------------------------------------------- the bound, in float64
def _tables(diffusion):
    """alpha_bar, alpha_bar_prev, beta and the clipped posterior log variance, derived here in float64."""
    betas = np.asarray(diffusion.betas, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    post_log_var = np.log(np.concatenate([[post_var[1]], post_var[1:]]))
    return abar, abar_prev, betas, post_log_var


def _approx_cdf(x):
    return 0.5 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _bound_float64(diffusion, model_fn, x0, noises, clip, timestep_map):
    """calc_bpd_loop from the formulas, in float64 numpy; noises[j] is the draw at loop index j."""
    abar, abar_prev, betas, post_log_var = _tables(diffusion)
    T = len(betas)
    x0 = x0.astype(np.float64)
    axes = tuple(range(1, x0.ndim))
    vb, xstart_mse, mse = [], [], []
    for j, t in enumerate(range(T - 1, -1, -1)):
        eps = noises[j]
        x_t = math.sqrt(abar[t]) * x0 + math.sqrt(1 - abar[t]) * eps
        eps_hat, v = model_fn(x_t, timestep_map[t])
        pred_x0 = (x_t - math.sqrt(1 - abar[t]) * eps_hat) / math.sqrt(abar[t])
        if clip:
            pred_x0 = np.clip(pred_x0, -1, 1)

        def post_mean(start, t=t, x_t=x_t):
            return (math.sqrt(abar_prev[t]) * betas[t] * start
                    + math.sqrt(1 - betas[t]) * (1 - abar_prev[t]) * x_t) / (1 - abar[t])

        frac = (v + 1) / 2
        model_log_var = frac * math.log(betas[t]) + (1 - frac) * post_log_var[t]
        model_mean = post_mean(pred_x0)
        if t > 0:
            lv1, lv2 = post_log_var[t], model_log_var
            kl = 0.5 * (-1 + lv2 - lv1 + np.exp(lv1 - lv2) + (post_mean(x0) - model_mean) ** 2 * np.exp(-lv2))
            vb.append(kl.mean(axis=axes) / LN2)
        else:
            inv_std = np.exp(-0.5 * model_log_var)
            hi = _approx_cdf(inv_std * (x0 - model_mean + 1 / 255))
            lo = _approx_cdf(inv_std * (x0 - model_mean - 1 / 255))
            logp = np.where(x0 < -0.999, np.log(np.maximum(hi, 1e-12)),
                            np.where(x0 > 0.999, np.log(np.maximum(1 - lo, 1e-12)),
                                     np.log(np.maximum(hi - lo, 1e-12))))
            vb.append(-logp.mean(axis=axes) / LN2)
        xstart_mse.append(((pred_x0 - x0) ** 2).mean(axis=axes))
        eps_from_x0 = (x_t / math.sqrt(abar[t]) - pred_x0) / math.sqrt(1 / abar[t] - 1)
        mse.append(((eps_from_x0 - eps) ** 2).mean(axis=axes))
    m, lv = math.sqrt(abar[-1]) * x0, math.log(1 - abar[-1])
    prior = (0.5 * (-1 - lv + math.exp(lv) + m**2)).mean(axis=axes) / LN2
    vb = np.stack(vb, axis=1)
    return {"total_bpd": vb.sum(axis=1) + prior, "prior_bpd": prior, "vb": vb,
            "xstart_mse": np.stack(xstart_mse, axis=1), "mse": np.stack(mse, axis=1)}


def _fake_model_torch(x, t, scale):
    """eps | v from x and t (a function of both, so a wrong timestep or x_t shows)."""
    tt = t.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return torch.cat([scale * x + 0.01 * tt, torch.tanh(x - 0.002 * tt)], dim=1)


def _fake_model_numpy(x, t, scale):
    return scale * x + 0.01 * t, np.tanh(x - 0.002 * t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spacing,clip", [("", True), ("", False), ("4", False)])
def test_calc_bpd_loop_matches_float64_derivation(dtype, spacing, clip):
    diffusion = create_diffusion(spacing, noise_schedule="squaredcos_cap_v2", diffusion_steps=9)
    T = diffusion.num_timesteps
    x0 = torch.rand(3, 2, 3, 5, dtype=torch.float64) * 2 - 1
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0], dtype=torch.float64)  # the outermost bins
    scale = float(torch.empty(()).uniform_(0.2, 0.8))
    calls = []

    def model(x, t, **kw):
        calls.append((int(t[0]), torch.is_grad_enabled(), kw))
        return _fake_model_torch(x, t, scale)

    seed = int(torch.randint(0, 2**31, ()).item())
    torch.manual_seed(seed)
    got = diffusion.calc_bpd_loop(model, x0.to(dtype), clip_denoised=clip, model_kwargs=dict(y="label"))
    torch.manual_seed(seed)  # the published stream: one randn like x_start per timestep, T-1 first
    noises = [torch.randn_like(x0.to(dtype)).double().numpy() for _ in range(T)]
    timestep_map = getattr(diffusion, "timestep_map", list(range(T)))
    ref = _bound_float64(diffusion, lambda x, t: _fake_model_numpy(x, t, scale), x0.numpy(), noises, clip,
                         timestep_map)

    assert list(got) == ["total_bpd", "prior_bpd", "vb", "xstart_mse", "mse"]
    assert [c[0] for c in calls] == timestep_map[::-1]  # original timesteps, T-1 first
    assert not any(c[1] for c in calls) and all(c[2] == dict(y="label") for c in calls)
    # The coefficients are rounded to float32 as published (also for float64 inputs): measured <= 3.1e-6. Float32
    # inputs add float32 rounding inside the KL terms of nearly equal Gaussians, where log-variances and means
    # cancel: measured up to 1.05e-4 over seeds (DIT_FAST_SEED=170173498), so float32 gets 1e-3.
    bound = FP32_RTOL if dtype == torch.float64 else 1e-3
    for key, want in ref.items():
        value = got[key]
        assert value.shape == want.shape == ((3,) if key.endswith("bpd") else (3, T)), key
        assert value.dtype == dtype and torch.isfinite(value).all(), key
        if key == "prior_bpd":
            diff = (value.double() - torch.from_numpy(want)).abs().max().item()
            assert diff <= PRIOR_ATOL_BITS, f"prior_bpd: absolute error {diff:.3e} > {PRIOR_ATOL_BITS:.1e} bits"
            continue
        err = rel_err(value, torch.from_numpy(want))
        assert err <= bound, f"{key}: relative error {err:.3e} > {bound:.0e}"


def test_prior_bpd_float64():
    diffusion = create_diffusion("")
    x0 = torch.randn(4, 3, 2, 2, dtype=torch.float64) * 3
    abar_T = np.prod(1.0 - np.asarray(diffusion.betas, dtype=np.float64))
    m, v = math.sqrt(abar_T) * x0.numpy(), 1 - abar_T
    ref = (0.5 * (-1 - math.log(v) + v + m**2)).mean(axis=(1, 2, 3)) / LN2
    got = diffusion._prior_bpd(x0.float())
    assert got.shape == (4,) and got.dtype == torch.float32
    assert (got.double() - torch.from_numpy(ref)).abs().max().item() <= PRIOR_ATOL_BITS
    assert rel_err(got, torch.from_numpy(ref)) <= 1e-3  # ~3e-4 bits: the float32 variance part is below 1e-3


def test_calc_bpd_loop_with_a_dit():
    model = randomize_weights_(dit_fast.DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1,
                                            num_heads=2, num_classes=10, backend="torch")).eval()
    diffusion = create_diffusion("", noise_schedule="squaredcos_cap_v2", diffusion_steps=5)
    x0 = torch.rand(2, 4, 4, 4) * 2 - 1
    out = diffusion.calc_bpd_loop(model, x0, model_kwargs=dict(y=torch.tensor([1, 7])))
    assert out["vb"].shape == (2, 5) and torch.isfinite(out["total_bpd"]).all()
    assert torch.allclose(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"])
    with pytest.raises(ValueError, match="x_start must be a tensor"):
        diffusion.calc_bpd_loop(model, x0[:0])


# --------------------------------------------------------------------------- timestep samplers
def test_uniform_sampler_golden():
    sampler = ts.create_named_schedule_sampler("uniform", create_diffusion(""))
    assert isinstance(sampler, ts.UniformSampler)
    np.random.seed(0)
    t, w = sampler.sample(8, "cpu")
    # published UniformSampler(create_diffusion("")).sample(8, "cpu") after np.random.seed(0)
    assert t.tolist() == [548, 715, 602, 544, 423, 645, 437, 891]
    assert t.dtype == torch.int64 and w.dtype == torch.float32 and torch.equal(w, torch.ones(8))


# published LossSecondMomentResampler(SimpleNamespace(num_timesteps=5), history_per_term=2, uniform_prob=0.1)
# after update_with_all_losses(_TS, _LOSSES):
_TS = [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0]
_LOSSES = [0.5, 1.0, 2.0, 4.0, 8.0, 0.25, 1.5, 2.5, 3.0, 1.0, 0.75]
_GOLDEN_COLD = [2, 3, 3, 2, 2, 3]  # sample(6) after np.random.seed(0), before the update (uniform)
_GOLDEN_WARM = ([1, 4, 3, 4, 4, 3, 3, 1, 2, 3, 4, 4],  # sample(12) after np.random.seed(7), after the update
                [1.8860546350479126, 0.4940844178199768, 0.773287296295166, 0.4940844178199768,
                 0.4940844178199768, 0.773287296295166, 0.773287296295166, 1.8860546350479126,
                 1.1573963165283203, 0.773287296295166, 0.4940844178199768, 0.4940844178199768])


def test_loss_second_moment_resampler_golden_and_float64():
    sampler = ts.LossSecondMomentResampler(SimpleNamespace(num_timesteps=5), history_per_term=2, uniform_prob=0.1)
    np.random.seed(0)
    t, w = sampler.sample(6, "cpu")
    assert t.tolist() == _GOLDEN_COLD and torch.equal(w, torch.ones(6))
    sampler.update_with_local_losses(torch.tensor(_TS), torch.tensor(_LOSSES))
    np.random.seed(7)
    t, w = sampler.sample(12, "cpu")
    assert t.tolist() == _GOLDEN_WARM[0] and w.tolist() == _GOLDEN_WARM[1]

    # the weights from their definition: the last 2 losses per step (the third loss at t=0 pushed out 0.5)
    history = {0: [0.25, 0.75], 1: [1.0, 1.5], 2: [2.0, 2.5], 3: [4.0, 3.0], 4: [8.0, 1.0]}
    rms = np.array([math.sqrt(sum(v * v for v in history[k]) / 2) for k in range(5)])
    p = 0.9 * rms / rms.sum() + 0.1 / 5
    assert np.allclose(sampler.weights(), p, rtol=1e-14, atol=0)
    assert torch.allclose(w.double(), torch.from_numpy(1 / (5 * p[t.numpy()])), rtol=1e-7)


def test_loss_second_moment_resampler_stays_uniform_until_every_step_is_full():
    sampler = ts.create_named_schedule_sampler("loss-second-moment", create_diffusion("ddim4"))
    assert isinstance(sampler, ts.LossSecondMomentResampler) and sampler._loss_counts.dtype == np.int64
    T = 4
    for k in range(sampler.history_per_term):
        for t in range(T - 1 if k == sampler.history_per_term - 1 else T):  # the last step stays one short
            sampler.update_with_all_losses([t], [float(t + 1)])
    assert np.array_equal(sampler.weights(), np.ones(T))
    sampler.update_with_all_losses([T - 1], [float(T)])
    w = sampler.weights()
    assert not np.allclose(w, w[0]) and w.sum() == pytest.approx(1.0, rel=1e-12) and np.argmax(w) == T - 1


def test_timestep_sampler_bad_inputs():
    with pytest.raises(NotImplementedError, match="name must be one of .*'uniform'.*got 'cosine'"):
        ts.create_named_schedule_sampler("cosine", create_diffusion(""))
    with pytest.raises(TypeError, match="num_timesteps"):
        ts.UniformSampler(object())
    sampler = ts.LossSecondMomentResampler(SimpleNamespace(num_timesteps=3))
    with pytest.raises(ValueError, match="batch_size must be a non-negative int, got -1"):
        sampler.sample(-1, "cpu")
    with pytest.raises(ValueError, match="local_ts must be a 1-D integer tensor"):
        sampler.update_with_local_losses(torch.tensor([0.0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="local_losses must be .* one loss per timestep"):
        sampler.update_with_local_losses(torch.tensor([0, 1]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="ts must lie in \\[0, 2\\], got 3"):
        sampler.update_with_all_losses([3], [1.0])
    with pytest.raises(ValueError, match="history_per_term"):
        ts.LossSecondMomentResampler(SimpleNamespace(num_timesteps=3), history_per_term=0)

    class Negative(ts.ScheduleSampler):
        def weights(self):
            return np.array([1.0, -1.0])

    with pytest.raises(ValueError, match="Negative.weights\\(\\) must be .* positive"):
        Negative().sample(2, "cpu")


_WORKER = textwrap.dedent("""
    import sys
    from types import SimpleNamespace
    import numpy as np
    import torch
    import torch.distributed as dist
    from dit_fast.diffusion.timestep_sampler import LossSecondMomentResampler
    rank, init, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    sampler = LossSecondMomentResampler(SimpleNamespace(num_timesteps=4), history_per_term=3)
    g = torch.Generator().manual_seed(rank)
    for step in range(6):
        n = 2 + rank + step % 3  # the ranks' batch sizes differ
        sampler.update_with_local_losses(torch.randint(0, 4, (n,), generator=g), torch.rand(n, generator=g))
    np.savez(out, history=sampler._loss_history, counts=sampler._loss_counts)
    dist.destroy_process_group()
""")


@pytest.mark.distributed
def test_update_with_local_losses_gathers_unequal_batches(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    init = f"file://{tmp_path / 'rendezvous'}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), init, str(tmp_path / f"r{r}.npz")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-3000:]

    expected = ts.LossSecondMomentResampler(SimpleNamespace(num_timesteps=4), history_per_term=3)
    gens = [torch.Generator().manual_seed(r) for r in range(2)]
    for step in range(6):
        pairs = []
        for r in range(2):  # rank order, as all_gather returns them
            n = 2 + r + step % 3
            pairs.append((torch.randint(0, 4, (n,), generator=gens[r]), torch.rand(n, generator=gens[r])))
        expected.update_with_all_losses([v for t, _ in pairs for v in t.tolist()],
                                        [v for _, loss in pairs for v in loss.tolist()])
    for r in range(2):
        got = np.load(tmp_path / f"r{r}.npz")
        assert np.array_equal(got["counts"], expected._loss_counts), f"rank {r}"
        assert np.array_equal(got["history"], expected._loss_history), f"rank {r}"
