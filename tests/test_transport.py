"""dit_fast.transport against the published SiT / LightningDiT code (golden outputs made once from it, see
tests/data/README.md) and against independent float64 formulas."""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch

from dit_fast import transport as T
from dit_fast.transport import Sampler, create_transport
from dit_fast.transport.integrators import ODE

sys.path.insert(0, os.path.dirname(__file__))
from transport_cases import TinyField, cases  # noqa: E402

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "transport_golden.pt")
# The Done-when bounds of issue 21 (on this machine the results are bit-identical).
LOSS_RTOL, SAMPLER_RTOL = 1e-5, 1e-4


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


CASES = cases()


def _check_case(name, golden):
    if "dopri5" in name:
        pytest.importorskip("torchdiffeq")  # the adaptive solvers' optional dependency (the test extra has it)
    _, run = CASES[name]
    want = golden["cases"][name]
    got = run(T)
    assert set(got) == set(want), f"{name}: terms {sorted(got)} != published {sorted(want)}"
    bound = LOSS_RTOL if name.startswith("loss") else SAMPLER_RTOL
    for key, ref in want.items():
        if key in ("rng_after", "np_after", "num_states"):
            assert torch.equal(got[key], ref), f"{name}: {key} differs: the random draws or the step count diverged"
            continue
        assert got[key].dtype == ref.dtype and got[key].shape == ref.shape, f"{name}/{key}: dtype or shape"
        err = rel(got[key], ref)
        assert err <= bound, f"{name}/{key}: relative difference {err:.2e} from the published code > {bound:.0e}"


@pytest.mark.parametrize("name", sorted(n for n in CASES if n.startswith("loss")))
def test_training_losses_match_published(name, golden):
    _check_case(name, golden)


@pytest.mark.parametrize("name", sorted(n for n in CASES if not n.startswith("loss")))
def test_samplers_match_published(name, golden, one_thread):
    _check_case(name, golden)


def test_golden_covers_the_grid(golden):
    """Every path x prediction x weighting, every sampler family, LightningDiT's extensions."""
    names = set(golden["cases"])
    assert names == set(CASES)
    for p in ("Linear", "GVP", "VP"):
        for m in ("velocity", "noise", "score"):
            assert {f"loss/{p}/{m}/{w}" for w in (None, "velocity", "likelihood")} <= names
            assert {f"sde/{p}/{m}/Euler", f"sde/{p}/{m}/Heun", f"ode/{p}/{m}/euler"} <= names


# ---------------------------------------------------------------- float64 checks of the formulas

PATHS = {"Linear": T.LinearPath(), "GVP": T.GVPPath(), "VP": T.VPPath()}


@pytest.mark.parametrize("name", PATHS)
def test_path_derivatives_match_finite_differences(name):
    path = PATHS[name]
    t = torch.rand(64, dtype=torch.float64) * 0.9 + 0.05
    h = 1e-6
    for fn in (path.compute_alpha_t, path.compute_sigma_t):
        value, deriv = fn(t)
        fd = (fn(t + h)[0] - fn(t - h)[0]) / (2 * h)
        deriv = deriv * torch.ones_like(t)
        assert torch.allclose(deriv, fd, rtol=1e-6, atol=1e-8), f"{name} {fn.__name__}"
    alpha, d_alpha = path.compute_alpha_t(t)
    assert torch.allclose(path.compute_d_alpha_alpha_ratio_t(t) * torch.ones_like(t), d_alpha / alpha, rtol=1e-10)
    sigma, _ = path.compute_sigma_t(t)
    assert torch.allclose(alpha * torch.ones_like(t), {"Linear": t, "GVP": torch.sin(math.pi * t / 2),
                                                       "VP": alpha}[name])
    if name != "Linear":  # variance preserving
        assert torch.allclose(alpha ** 2 + sigma ** 2, torch.ones_like(t), atol=1e-12)


@pytest.mark.parametrize("name", PATHS)
def test_conversions_recover_the_true_fields(name):
    """For data at one point x1, x_t = alpha x1 + sigma x0 has velocity u = alpha' x1 + sigma' x0, score
    -x0 / sigma and noise x0; each conversion must map one to the other, and the SDE drift's variance
    must make the probability-flow drift equal u."""
    path = PATHS[name]
    x1, x0 = torch.randn(5, 3, 2, 2, dtype=torch.float64), torch.randn(5, 3, 2, 2, dtype=torch.float64)
    t = torch.rand(5, dtype=torch.float64) * 0.9 + 0.05
    _, xt, ut = path.plan(t, x0, x1)
    sigma = path.compute_sigma_t(T.expand_t_like_x(t, xt))[0]
    score = -x0 / sigma
    torch.testing.assert_close(path.get_score_from_velocity(ut, xt, t), score, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(path.get_noise_from_velocity(ut, xt, t), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(path.get_velocity_from_score(score, xt, t), ut, rtol=1e-9, atol=1e-9)


def test_training_draws_and_targets_float64():
    """x0 = randn_like(x1), then t = rand(N) on the CPU generator; x_t and u_t from the path formulas."""
    x1 = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    seen = {}

    def model(xt, t, y):
        seen.update(xt=xt, t=t)
        return torch.zeros_like(xt)

    torch.manual_seed(7)
    x0 = torch.randn_like(x1)
    t = torch.rand(4).double()
    for name, path in (("Linear", "velocity"), ("GVP", "noise"), ("VP", "score")):
        tr = create_transport(name, path)
        t0, t1 = tr.check_interval(tr.train_eps, tr.sample_eps)
        torch.manual_seed(7)
        terms = tr.training_losses(model, x1, dict(y=None))
        t_want = (t.float() * (t1 - t0) + t0).double()
        torch.testing.assert_close(seen["t"], t_want)
        a, _ = tr.path_sampler.compute_alpha_t(T.expand_t_like_x(t_want, x1))
        s, _ = tr.path_sampler.compute_sigma_t(T.expand_t_like_x(t_want, x1))
        torch.testing.assert_close(seen["xt"], a * x1 + s * x0)
        if path == "velocity":
            _, _, ut = tr.path_sampler.plan(t_want, x0, x1)
            torch.testing.assert_close(terms["loss"], (ut ** 2).mean(dim=(1, 2, 3)))
        elif path == "noise":
            torch.testing.assert_close(terms["loss"], (x0 ** 2).mean(dim=(1, 2, 3)))
        else:
            torch.testing.assert_close(terms["loss"], (x0 ** 2).mean(dim=(1, 2, 3)))  # (0 * sigma + x0)^2


def test_lognorm_times_follow_numpy_global_generator():
    tr = create_transport(use_lognorm=True)
    np.random.seed(3)
    z = np.random.standard_normal(6)
    seen = {}

    def model(x, t):
        seen["t"] = t
        return torch.zeros_like(x)

    np.random.seed(3)
    tr.training_losses(model, torch.randn(6, 2, 2, 2))
    torch.testing.assert_close(seen["t"], torch.tensor(1 / (1 + np.exp(-z)), dtype=torch.float32))


@pytest.mark.parametrize("method,order", [("euler", 1), ("midpoint", 2), ("heun2", 2), ("heun3", 3), ("rk4", 4)])
def test_fixed_step_ode_on_a_linear_field_matches_closed_form(method, order):
    """dx/dt = a x: one step of an order-p Runge-Kutta method multiplies by the degree-p Taylor polynomial
    of exp(a dt); every fixed-step method runs natively (no torchdiffeq)."""
    a, n = -1.3, 7
    x0 = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    ode = ODE(lambda x, t, model: a * x, t0=0.0, t1=1.0, sampler_type=method, num_steps=n + 1, atol=0, rtol=0,
              backend="native")
    out = ode.sample(x0, None)
    assert out.shape == (n + 1, *x0.shape)
    dt = torch.linspace(0.0, 1.0, n + 1).diff().double()  # the float32 grid's steps
    growth = 1.0
    for h in (a * dt).tolist():
        growth *= sum(h ** k / math.factorial(k) for k in range(order + 1))
    torch.testing.assert_close(out[-1], x0 * growth, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(out[0], x0)


@pytest.mark.parametrize("method", ["euler", "heun2", "rk4", "midpoint"])
def test_native_fixed_step_equals_torchdiffeq(method):
    pytest.importorskip("torchdiffeq")
    field = TinyField()
    x = torch.randn(2, 4, 2, 2)
    y = torch.tensor([0, 3])
    kw = dict(t0=1.0, t1=0.001, sampler_type=method, num_steps=6, atol=1e-6, rtol=1e-3, timestep_shift=0.0)
    tr = create_transport("GVP", "noise")
    drift = tr.get_drift()
    native = ODE(drift, backend="native", **kw).sample(x, field, y=y)
    ref = ODE(drift, backend="torchdiffeq", **kw).sample(x, field, y=y)
    assert torch.equal(native, ref)


def test_dopri5_on_a_linear_field_matches_exp():
    pytest.importorskip("torchdiffeq")
    x0 = torch.randn(2, 3, dtype=torch.float64)
    out = ODE(lambda x, t, model: -0.7 * x, t0=0.0, t1=1.0, sampler_type="dopri5", num_steps=3, atol=1e-10,
              rtol=1e-10).sample(x0, None)
    torch.testing.assert_close(out[-1], x0 * math.exp(-0.7), rtol=1e-8, atol=1e-10)


def test_timestep_shift_formula():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    for s in (0.3, 1.0, 3.0):
        got = T.shift_timesteps(t, s)
        torch.testing.assert_close(got, s * t / (1 + (s - 1) * t))
        assert got[0] == 0 and abs(got[-1].item() - 1) < 1e-15 and (got.diff() > 0).all()
    assert torch.equal(T.shift_timesteps(t, 0.0), t)


def test_sde_heun_on_a_linear_drift_without_noise():
    """diffusion_form='linear' with diffusion_norm=0 removes the noise: stochastic Heun becomes the
    trapezoid rule, whose step multiplies by 1 + h + h^2/2 for dx/dt = a x (velocity model a x)."""
    a = 0.8
    tr = create_transport("Linear", "velocity")
    fn = Sampler(tr).sample_sde(sampling_method="Heun", diffusion_form="linear", diffusion_norm=0.0,
                                last_step="Euler", last_step_size=0.04, num_steps=5)
    x0 = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    states = fn(x0, lambda x, t: a * x)
    assert len(states) == 5
    grid = torch.linspace(0.0, 0.96, 5)
    h = a * (grid[1] - grid[0]).item()
    heun = x0 * (1 + h + h * h / 2) ** 4
    torch.testing.assert_close(states[-2], heun, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(states[-1], heun * (1 + a * 0.04), rtol=1e-6, atol=1e-12)  # the last Euler step


def test_constant_diffusion_form_runs():
    """The published code returns a bare float for 'constant' and then fails on th.sqrt; ours runs."""
    fn = Sampler(create_transport("VP", "noise")).sample_sde(diffusion_form="constant", num_steps=4)
    out = fn(torch.randn(2, 4, 2, 2), TinyField())
    assert torch.isfinite(out[-1]).all()


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="path_type"):
        create_transport("Cosine")
    with pytest.raises(ValueError, match="prediction"):
        create_transport("Linear", "x0")
    with pytest.raises(ValueError, match="loss_weight"):
        create_transport("Linear", "noise", "snr")
    s = Sampler(create_transport())
    with pytest.raises(ValueError, match="sampling_method"):
        s.sample_ode(sampling_method="rk45")
    with pytest.raises(ValueError, match="sampling_method"):
        s.sample_sde(sampling_method="Milstein")
    with pytest.raises(ValueError, match="diffusion_form"):
        s.sample_sde(diffusion_form="cosine")
    with pytest.raises(ValueError, match="last_step"):
        s.sample_sde(last_step="Median")
    with pytest.raises(ValueError, match="num_steps"):
        s.sample_sde(num_steps=1)
    with pytest.raises(ValueError, match="shaped like x_t"):
        create_transport().training_losses(lambda x, t: x[:, :1], torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match="x1"):
        create_transport().training_losses(lambda x, t: x, torch.arange(4))


def test_missing_torchdiffeq_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchdiffeq", None)
    fn = Sampler(create_transport()).sample_ode(sampling_method="dopri5", num_steps=3)
    with pytest.raises(ImportError, match="torchdiffeq"):
        fn(torch.randn(1, 2), lambda x, t: x)
    # the fixed-step methods need no torchdiffeq
    fn = Sampler(create_transport()).sample_ode(sampling_method="heun2", num_steps=3)
    out = fn(torch.randn(1, 2), lambda x, t: x)
    assert out.shape == (3, 1, 2)
