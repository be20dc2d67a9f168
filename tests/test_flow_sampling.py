"""dit_fast.flow_sampling (the fast flow sampler) and its fused update op (dit_fast.ops.flow_step).

The fast sampler must return what the transport API's Sampler loop returns for the same seed (that loop
is itself checked against the published code in test_transport.py) to float32 rounding; the update op
must match a float64 evaluation of its formulas for every stage.
"""
from __future__ import annotations

import itertools
import os
import sys

import pytest
import torch

from conftest import DEVICE, needs_triton
from dit_fast import DiT
from dit_fast.flow_sampling import COL_CFG, COL_DT, COL_T, build_flow_table, sample_flow
from dit_fast.ops.flow_step import NUM_COLS, flow_step_
from dit_fast.testing import randomize_weights_
from dit_fast.transport import Sampler, create_transport
from tolerances import poison_, rel_err

sys.path.insert(0, os.path.dirname(__file__))
from transport_cases import TinyField  # noqa: E402

FLOAT32_ROUNDING = 1e-6  # the fast path equals the loop bit for bit on the CPU; allow a few ulps elsewhere


def with_cfg(model_fn, C, guided=3):
    """The published forward_with_cfg (guidance on the first `guided` channels of SiT's C-channel output),
    with LightningDiT's interval rule: no guidance while t[0] < cfg_interval_start."""
    def fn(x, t, y, cfg_scale, cfg_interval=False, cfg_interval_start=0.0):
        half = x[: len(x) // 2]
        out = model_fn(torch.cat([half, half]), t, y)[:, :C]
        eps, rest = out[:, :guided], out[:, guided:]
        cond, unc = torch.split(eps, len(eps) // 2)
        guided_eps = unc + cfg_scale * (cond - unc)
        if cfg_interval is True and t[0] < cfg_interval_start:
            guided_eps = cond
        return torch.cat([torch.cat([guided_eps, guided_eps]), rest], dim=1)
    return fn


def loop_reference(model_fn, z, y, null, C, *, mode, cfg_scale=1.0, cfg_interval_start=None, path_type="Linear",
                   prediction="velocity", seed=0, guided=3, **kw):
    """The published sampling loop (through dit_fast.transport.Sampler, the published API) on [z; z]."""
    sampler = Sampler(create_transport(path_type, prediction))
    fn = sampler.sample_ode(**kw) if mode == "ode" else sampler.sample_sde(**kw)
    torch.manual_seed(seed)
    n = z.shape[0]
    if cfg_scale > 1:
        extra = {} if cfg_interval_start is None else dict(cfg_interval=True, cfg_interval_start=cfg_interval_start)
        y2 = torch.cat([y, torch.full_like(y, null)])
        return fn(torch.cat([z, z]), with_cfg(model_fn, C, guided), y=y2, cfg_scale=cfg_scale, **extra)[-1][:n]
    return fn(z, lambda x, t, y: model_fn(x, t, y)[:, :C], y=y)[-1]


def fast(model_fn, z, y, *, seed=0, **kw):
    torch.manual_seed(seed)
    return sample_flow(model_fn, z, y, **kw)


TINY = TinyField(C=4, num_classes=5)

ODE_CASES = [
    # (path, prediction, method, cfg_scale, extra kwargs of both)
    ("Linear", "velocity", "euler", 1.0, {}),
    ("Linear", "velocity", "heun2", 4.0, {}),
    ("GVP", "noise", "euler", 4.0, {}),
    ("VP", "score", "heun2", 1.0, {}),
    ("Linear", "velocity", "euler", 6.0, {"timestep_shift": 0.3}),
]
SDE_CASES = [
    ("Linear", "velocity", "Euler", 4.0, {"diffusion_form": "sigma", "last_step": "Mean"}),
    ("Linear", "velocity", "Heun", 1.0, {"diffusion_form": "linear", "last_step": "Tweedie"}),
    ("GVP", "score", "Euler", 1.0, {"diffusion_form": "SBDM", "last_step": "Euler"}),
    ("VP", "noise", "Heun", 4.0, {"diffusion_form": "decreasing", "last_step": None}),
    ("GVP", "velocity", "Heun", 3.0, {"diffusion_form": "sigma", "last_step": "Mean", "diffusion_norm": 0.5}),
]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("mode,case", [("ode", c) for c in ODE_CASES] + [("sde", c) for c in SDE_CASES])
def test_fast_sampler_equals_published_loop(mode, case, backend, one_thread):
    path, pred, method, cfg, extra = case
    z = torch.randn(3, 4, 3, 5)  # odd, non-square latents
    y = torch.randint(0, 5, (3,))
    seed = int(torch.randint(0, 2**31, ()).item())
    kw = dict(sampling_method=method, num_steps=5, **extra)
    ref = loop_reference(TINY, z, y, 5, 4, mode=mode, cfg_scale=cfg, path_type=path, prediction=pred, seed=seed, **kw)
    out = fast(TINY, z, y, mode=mode, cfg_scale=cfg, path_type=path, prediction=pred, null_class=5, seed=seed,
               backend=backend, **kw)
    assert torch.isfinite(ref).all()
    assert out.shape == z.shape and out.dtype == z.dtype
    assert rel_err(out, ref) <= FLOAT32_ROUNDING, f"{rel_err(out, ref):.2e}"


@pytest.mark.parametrize("start", [0.0, 0.4, 0.9])
@pytest.mark.parametrize("mode", ["ode", "sde"])
def test_cfg_interval_as_lightningdit(mode, start, one_thread):
    z, y = torch.randn(2, 4, 2, 2), torch.tensor([1, 3])
    kw = dict(sampling_method="heun2" if mode == "ode" else "Heun", num_steps=6)
    if mode == "sde":
        kw["diffusion_form"] = "sigma"
    ref = loop_reference(TINY, z, y, 5, 4, mode=mode, cfg_scale=6.0, cfg_interval_start=start, seed=3, **kw)
    out = fast(TINY, z, y, mode=mode, cfg_scale=6.0, cfg_interval=start, null_class=5, seed=3, **kw)
    assert rel_err(out, ref) <= FLOAT32_ROUNDING
    # the interval must matter: without it the result differs (unless it covers everything)
    full = fast(TINY, z, y, mode=mode, cfg_scale=6.0, null_class=5, seed=3, **kw)
    assert (rel_err(full, out) > 1e-4) == (start > 0)


def test_guide_all_channels():
    z, y = torch.randn(2, 4, 2, 2), torch.tensor([0, 2])
    ref = loop_reference(TINY, z, y, 5, 4, mode="ode", cfg_scale=3.0, guided=4, sampling_method="euler", num_steps=4)
    out = fast(TINY, z, y, mode="ode", cfg_scale=3.0, guide_all_channels=True, null_class=5, sampling_method="euler",
               num_steps=4)
    assert rel_err(out, ref) <= FLOAT32_ROUNDING


def tiny_dit(learn_sigma=True):
    torch.manual_seed(0)
    model = DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=7,
                learn_sigma=learn_sigma)
    return randomize_weights_(model).eval()


@pytest.mark.parametrize("mode,method", [("ode", "heun2"), ("sde", "Euler")])
def test_fast_sampler_with_a_dit_equals_published_loop(mode, method, one_thread):
    """A DiT with continuous t computes SiT's network; with learn_sigma its extra channels are ignored,
    as SiT's forward cuts them."""
    model = tiny_dit()
    z, y = torch.randn(2, 4, 4, 4), torch.tensor([1, 6])
    kw = dict(sampling_method=method, num_steps=4)
    if mode == "sde":
        kw["diffusion_form"] = "sigma"
    with torch.no_grad():
        ref = loop_reference(model, z, y, 7, 4, mode=mode, cfg_scale=4.0, seed=5, **kw)
    out = fast(model, z, y, mode=mode, cfg_scale=4.0, seed=5, **kw)  # null class: model.num_classes
    assert rel_err(out, ref) <= FLOAT32_ROUNDING


def test_sde_noise_from_a_generator_is_reproducible():
    z, y = torch.randn(2, 4, 2, 2), torch.tensor([0, 1])
    kw = dict(mode="sde", sampling_method="Euler", num_steps=4, null_class=5, cfg_scale=2.0)
    a = sample_flow(TINY, z, y, generator=torch.Generator().manual_seed(1), **kw)
    b = sample_flow(TINY, z, y, generator=torch.Generator().manual_seed(1), **kw)
    c = sample_flow(TINY, z, y, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_float64_state(one_thread):
    z, y = torch.randn(2, 4, 2, 2, dtype=torch.float64), torch.tensor([0, 1])
    kw = dict(sampling_method="Heun", num_steps=4, diffusion_form="sigma")
    ref = loop_reference(TINY, z, y, 5, 4, mode="sde", path_type="GVP", prediction="noise", seed=2, **kw)
    out = fast(TINY, z, y, mode="sde", path_type="GVP", prediction="noise", seed=2, **kw)
    assert out.dtype == torch.float64 and rel_err(out, ref) <= 1e-8


def test_table_rows_and_interval_flags():
    plan = build_flow_table(mode="ode", sampling_method="heun2", num_steps=5, timestep_shift=0.3, cfg_interval=0.11)
    t = plan.table[:, COL_T]
    assert plan.rows_per_step == 2 and plan.table.shape == (8, NUM_COLS)
    grid = torch.linspace(0, 1, 5)
    grid = 0.3 * grid / (1 + (0.3 - 1) * grid)
    torch.testing.assert_close(t[0::2], grid[:-1])
    torch.testing.assert_close(plan.table[0::2, COL_DT], grid.diff())
    assert torch.equal(plan.table[:, COL_CFG], (t >= 0.11).float())
    sde = build_flow_table(mode="sde", sampling_method="Euler", num_steps=5, last_step="Mean")
    assert sde.table.shape == (5, NUM_COLS) and sde.table[-1, COL_T] == pytest.approx(0.96)
    assert sde.table[-1, COL_DT] == pytest.approx(0.04)


def test_bad_arguments_name_themselves():
    z, y = torch.randn(1, 4, 2, 2), torch.tensor([0])
    with pytest.raises(ValueError, match="SBDM"):  # w(0) = inf for a Linear velocity model: published NaN
        sample_flow(TINY, z, y, mode="sde", diffusion_form="SBDM")
    with pytest.raises(ValueError, match="timestep_shift"):
        sample_flow(TINY, z, y, mode="sde", timestep_shift=0.3)
    with pytest.raises(ValueError, match="sampling_method"):
        sample_flow(TINY, z, y, mode="ode", sampling_method="dopri5")
    with pytest.raises(ValueError, match="mode"):
        sample_flow(TINY, z, y, mode="flow")
    with pytest.raises(ValueError, match="cfg_interval"):
        sample_flow(TINY, z, y, cfg_scale=2.0, null_class=5, cfg_interval=(0.8, 0.2))
    with pytest.raises(ValueError, match="y"):
        sample_flow(TINY, z, None, cfg_scale=2.0)
    with pytest.raises(ValueError, match="null_class"):
        sample_flow(lambda x, t, y: TINY(x, t, y), z, y, cfg_scale=2.0)  # no num_classes to default to
    with pytest.raises(ValueError, match="z must"):
        sample_flow(TINY, z.half(), y)
    with pytest.raises(ValueError, match="num_steps"):
        sample_flow(TINY, z, y, num_steps=1)
    with pytest.raises(ValueError, match="divides by"):  # Heun's corrector at t = 1 without a last step
        sample_flow(TINY, z, y, mode="sde", sampling_method="Heun", last_step=None)


# ---------------------------------------------------------------- the fused update op vs float64

def _reference_update(stage, pred, x, xin, out, k, noise, row, n, C, cfg, cfg_scale, guided, use_score, sde):
    """The update's formulas (kernels/flow_step.py's docstring), evaluated in float64."""
    x, xin, out, k, noise, row = (v.double() for v in (x, xin, out, k, noise, row))
    M, V, R, VAR, NS, D, DT, NA, NB, ALPHA, S2A, CFG_ON, HALF_DT = row[1:].tolist()
    if stage == "noise":
        return x + NA * NB * noise[:n], None
    g = out[:n, :C].clone()
    if cfg and CFG_ON:
        g[:, :guided] = out[n:2 * n, :guided] + cfg_scale * (out[:n, :guided] - out[n:2 * n, :guided])
    xe = xin[:n] if stage == "heun2" else x
    score = {"velocity": lambda: (R * g - xe) / VAR, "noise": lambda: g / NS, "score": lambda: g}[pred]()
    drift = g if pred == "velocity" else M * xe + V * score
    if use_score:
        drift = drift + D * score
    if stage == "euler":
        return x + DT * drift + (NA * NB * noise[:n] if sde else 0), None
    if stage == "heun1":
        return x + DT * drift, drift
    if stage == "heun2":
        return (x + HALF_DT * (k + drift) if sde else x + DT * 0.5 * (k + drift)), None
    return x / ALPHA + S2A * score, None


STAGE_CASES = [
    ("noise", "velocity", False, False, True),
    ("euler", "velocity", False, False, False),
    ("euler", "velocity", True, True, True),
    ("euler", "noise", True, True, True),
    ("heun1", "score", False, True, False),
    ("heun1", "velocity", True, True, False),
    ("heun2", "noise", False, False, False),
    ("heun2", "velocity", True, True, True),
    ("tweedie", "velocity", True, False, False),
    ("tweedie", "noise", False, False, False),
]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("stage,pred,cfg,use_score,sde,cfg_on",
                         [c + (1.0,) for c in STAGE_CASES] + [c + (0.0,) for c in STAGE_CASES if c[2]])
def test_flow_step_matches_float64(stage, pred, cfg, use_score, sde, cfg_on, backend):
    n, C, H, W = 3, 5, 3, 7
    B = 2 * n if cfg else n
    dev = DEVICE
    x = torch.randn(n, C, H, W, device=dev)
    xin = torch.randn(B, C, H, W, device=dev)
    xin[:n] = x if stage != "heun2" else torch.randn(n, C, H, W, device=dev)
    out = torch.randn(B, 2 * C, H, W, device=dev)  # learned-sigma width: the extra channels are ignored
    k = torch.randn(n, C, H, W, device=dev)
    noise = torch.randn(B, C, H, W, device=dev)
    table = torch.rand(6, NUM_COLS, device=dev) + 0.5
    table[:, COL_CFG] = cfg_on
    table[:, 3] = torch.rand(6) - 0.5  # R may be negative or zero-crossing; VAR (col 4) stays > 0.5
    step = torch.tensor([2], device=dev)
    rps, off = 2, 1  # row 5
    ref, ref_k = _reference_update(stage, pred, x.cpu(), xin.cpu(), out.cpu(), k.cpu(), noise.cpu(),
                                   table[rps * 2 + off].cpu(), n, C, cfg, 2.5, 3, use_score, sde)
    x_before = x.clone()
    if stage != "heun2":
        poison_(xin)  # every element of the model input must be rewritten
    else:
        poison_(xin[n:])
    if stage == "heun1":
        poison_(k)
    flow_step_(x, xin, out, k, noise, table, step, stage=stage, prediction=pred, rows_per_step=rps, row_offset=off,
               cfg_scale=2.5, guided_channels=3, cfg=cfg, use_score=use_score, sde=sde, backend=backend)
    if stage == "heun1":
        assert torch.equal(x, x_before), "the predictor stage must leave x alone"
        assert rel_err(k, ref_k) <= 1e-5
        assert rel_err(xin[:n], ref) <= 1e-5
    else:
        assert rel_err(x, ref) <= 1e-5
        assert torch.equal(xin[:n], x)
    if cfg:
        assert torch.equal(xin[n:], xin[:n])


def test_flow_step_checks_its_inputs():
    x = torch.randn(2, 4, 2, 2)
    xin, k, noise = torch.randn(4, 4, 2, 2), torch.zeros_like(x), torch.randn(4, 4, 2, 2)
    table, step = torch.zeros(3, NUM_COLS), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="stage"):
        flow_step_(x, xin, xin, k, noise, table, step, stage="leapfrog", cfg=True)
    with pytest.raises(ValueError, match="xin"):
        flow_step_(x, xin[:2], xin, k, noise, table, step, stage="euler", cfg=True)
    with pytest.raises(ValueError, match="model_out"):
        flow_step_(x, xin, xin[:, :2], k, noise, table, step, stage="euler", cfg=True)
    with pytest.raises(ValueError, match="table"):
        flow_step_(x, xin, xin, k, noise, table[:, :5], step, stage="euler", cfg=True)
    with pytest.raises(ValueError, match="prediction"):
        flow_step_(x, xin, xin, k, noise, table, step, stage="euler", cfg=True, prediction="x0")


# ---------------------------------------------------------------- CUDA graphs (GPU only)

@pytest.mark.gpu
@pytest.mark.parametrize("mode,method", [("ode", "euler"), ("ode", "heun2"), ("sde", "Euler"), ("sde", "Heun")])
def test_cuda_graph_path_equals_eager_and_the_loop(mode, method):
    model = tiny_dit().cuda()
    z, y = torch.randn(3, 4, 4, 4, device="cuda"), torch.tensor([1, 6, 0], device="cuda")
    kw = dict(mode=mode, sampling_method=method, num_steps=6, cfg_scale=4.0, cfg_interval=0.2)
    if mode == "sde":
        kw["diffusion_form"] = "sigma"
    graph = fast(model, z, y, seed=11, cuda_graph=True, **kw)
    eager = fast(model, z, y, seed=11, cuda_graph=False, **kw)
    torch_update = fast(model, z, y, seed=11, cuda_graph=True, backend="torch", **kw)
    assert rel_err(graph, eager) <= 1e-6
    assert rel_err(torch_update, eager) <= 1e-5
    loop_kw = {k: v for k, v in kw.items() if k not in ("mode", "cfg_scale", "cfg_interval")}
    with torch.no_grad():
        ref = loop_reference(model, z, y, 7, 4, mode=mode, cfg_scale=4.0, cfg_interval_start=0.2, seed=11, **loop_kw)
    assert rel_err(graph, ref) <= 1e-4


@pytest.mark.gpu
def test_sde_graph_noise_from_a_cuda_generator():
    model = tiny_dit().cuda()
    z, y = torch.randn(2, 4, 4, 4, device="cuda"), torch.tensor([1, 2], device="cuda")
    kw = dict(mode="sde", sampling_method="Heun", num_steps=5, cfg_scale=2.0)
    a = sample_flow(model, z, y, generator=torch.Generator("cuda").manual_seed(3), **kw)
    b = sample_flow(model, z, y, generator=torch.Generator("cuda").manual_seed(3), cuda_graph=False, **kw)
    assert rel_err(a, b) <= 1e-6


def test_every_case_list_is_consistent():
    # guards against a silently shrinking parametrization
    assert len(ODE_CASES) == 5 and len(SDE_CASES) == 5 and len(STAGE_CASES) == 10
    assert {c[2] for c in ODE_CASES} == {"euler", "heun2"} and {c[2] for c in SDE_CASES} == {"Euler", "Heun"}
    assert set(itertools.chain.from_iterable([c[0]] for c in STAGE_CASES)) == {"noise", "euler", "heun1", "heun2",
                                                                                 "tweedie"}
