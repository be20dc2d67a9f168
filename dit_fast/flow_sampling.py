"""Fast sampling of flow models (SiT, LightningDiT, REPA): the published transport samplers with one
model call and one fused update per model evaluation, CUDA-graph replayed.

    x = sample_flow(model, z, y, mode="ode", sampling_method="euler", num_steps=250, cfg_scale=4.0)

equals, with the same seed, to float32 rounding (bit for bit on the CPU where the model is deterministic),

    from dit_fast.transport import create_transport, Sampler
    sampler = Sampler(create_transport(path_type, prediction, None, train_eps, sample_eps))
    fn = sampler.sample_ode(sampling_method=..., num_steps=..., timestep_shift=...)        # mode="ode"
    fn = sampler.sample_sde(sampling_method=..., diffusion_form=..., diffusion_norm=...,
                            last_step=..., last_step_size=..., num_steps=...)             # mode="sde"
    fn(cat([z, z]), model.forward_with_cfg, y=cat([y, null]), cfg_scale=cfg_scale)[-1][:n]

(the same code the published SiT loop runs; with cfg_scale <= 1: fn(z, model, y=y)[-1]). cfg_interval
guides only the evaluations whose t lies in [low, high] (LightningDiT's cfg_interval_start s is
cfg_interval=s, i.e. [s, 1]); elsewhere the conditional output is used as is, as LightningDiT does.

What is faster than the published loop: a velocity model's SDE drift and score come from one model call
(the published code calls the model twice per SDE evaluation); every step's coefficients are precomputed
in a device table indexed by a step counter the step advances itself, so the whole step (model +
update) is captured once as a CUDA graph; the update (CFG combine, drift, integrator, writing both
halves of the next model input) is one kernel (dit_fast.ops.flow_step).

Noise (mode="sde"): each step draws one randn shaped like the published loop's x ([2n, C, H, W] with
CFG), from `generator`, or with generator=None from the CPU's global generator (copied to the
device), which is where the published sampler draws it.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch

from .ops.flow_step import NUM_COLS, flow_step_
from .transport import PATH_TYPES, PREDICTIONS, create_transport
from .transport.choices import check_choice
from .transport.integrators import shift_timesteps
from .transport.paths import DIFFUSION_FORMS

__all__ = ["sample_flow", "build_flow_table", "FlowPlan", "ODE_METHODS", "SDE_METHODS", "LAST_STEPS"]

ODE_METHODS = ("euler", "heun2")
SDE_METHODS = ("Euler", "Heun")
LAST_STEPS = (None, "Mean", "Tweedie", "Euler")

# Table columns (kernels/flow_step.py documents them).
(COL_T, COL_M, COL_V, COL_R, COL_VAR, COL_NS, COL_D, COL_DT, COL_NA, COL_NB, COL_ALPHA, COL_S2A, COL_CFG,
 COL_HALF_DT) = range(NUM_COLS)
_COL_NAMES = ("t", "M (drift mean / x)", "V (drift variance)", "R (alpha / d alpha)", "VAR (velocity->score)",
              "-sigma", "w(t) (diffusion)", "dt", "sqrt(2 w(t))", "sqrt(dt)", "alpha", "sigma^2 / alpha", "cfg",
              "dt / 2")


class FlowPlan:
    """What one sampling run evaluates: the table [rows, NUM_COLS] (one row per model evaluation,
    rows_per_step per step, then the last step's row), the loop's step count and the stage kinds."""

    def __init__(self, table, rows_per_step, num_loop_steps, mode, method, last_step, prediction):
        self.table, self.rows_per_step, self.num_loop_steps = table, rows_per_step, num_loop_steps
        self.mode, self.method, self.last_step, self.prediction = mode, method, last_step, prediction


def _coefficients(path, t: torch.Tensor, diffusion_form: str, diffusion_norm: float) -> dict:
    """Per-time scalars, computed with the path's own formulas on a [1] tensor in t's dtype (the order of
    operations the published sampler uses per element)."""
    one = torch.ones_like(t)
    mean, var = path.compute_drift(one, t)
    alpha_t, d_alpha_t = path.compute_alpha_t(t)
    sigma_t, d_sigma_t = path.compute_sigma_t(t)
    r = alpha_t / d_alpha_t
    diffusion = path.compute_diffusion(one, t, form=diffusion_form, norm=diffusion_norm)
    return {COL_M: -mean, COL_V: var, COL_R: r, COL_VAR: sigma_t ** 2 - r * d_sigma_t * sigma_t, COL_NS: -sigma_t,
            COL_D: diffusion, COL_NA: torch.sqrt(2 * diffusion), COL_ALPHA: alpha_t, COL_S2A: (sigma_t ** 2) / alpha_t}


def build_flow_table(
    *, mode: str = "ode", sampling_method: str | None = None, num_steps: int = 250, path_type: str = "Linear",
    prediction: str = "velocity", train_eps=None, sample_eps=None, timestep_shift: float = 0.0,
    diffusion_form: str = "sigma", diffusion_norm: float = 1.0, last_step: str | None = "Mean",
    last_step_size: float = 0.04, cfg_interval=None, dtype=torch.float32, device="cpu",
) -> FlowPlan:
    """The plan of a sample_flow run (arguments as there). Raises ValueError where a coefficient the run
    uses is not finite (e.g. diffusion_form="SBDM" on a Linear velocity model at t = 0, where the
    published sampler returns NaN)."""
    if mode not in ("ode", "sde"):
        raise ValueError(f"mode must be 'ode' or 'sde', got {mode!r}")
    methods = ODE_METHODS if mode == "ode" else SDE_METHODS
    method = sampling_method if sampling_method is not None else methods[0]
    if method not in methods:
        raise ValueError(f"sampling_method for mode={mode!r} must be one of {methods} here (the fast sampler), "
                         f"got {method!r}; dit_fast.transport.Sampler runs the others")
    if not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an int >= 2 (grid times including both ends), got {num_steps!r}")
    check_choice("path_type", path_type, PATH_TYPES)
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("diffusion_form", diffusion_form, DIFFUSION_FORMS)
    check_choice("last_step", last_step, LAST_STEPS)
    if mode == "sde" and timestep_shift > 0:
        raise ValueError(f"timestep_shift applies to mode='ode' (LightningDiT shifts the ODE grid), got "
                         f"timestep_shift={timestep_shift} with mode='sde'")
    low, high = _cfg_range(cfg_interval)

    transport = create_transport(path_type, prediction, None, train_eps, sample_eps)
    path = transport.path_sampler
    sde = mode == "sde"
    if sde and last_step is None:
        last_step_size = 0.0
    t0, t1 = transport.check_interval(transport.train_eps, transport.sample_eps, diffusion_form=diffusion_form,
                                      sde=sde, eval=True, reverse=False, last_step_size=last_step_size if sde else 0.0)
    grid = torch.linspace(t0, t1, num_steps)
    if not sde:
        grid = shift_timesteps(grid, timestep_shift)
    # The published ODE hands the model float32 times; the SDE, times in the state's dtype.
    t_dtype = dtype if sde else torch.float32
    heun = method in ("heun2", "Heun")
    rows = []  # (model t [1], dt [1]) per evaluation

    def row(t, dt):
        rows.append((t.reshape(1), dt.reshape(1)))

    sde_dt = grid[1] - grid[0]
    for i in range(num_steps - 1):
        t_i = grid[i].to(t_dtype)
        dt = sde_dt if sde else grid[i + 1] - grid[i]
        row(t_i, dt)
        if heun:
            row(t_i + dt * 1.0 if not sde else t_i + sde_dt, dt)
    if sde and last_step is not None:  # the published last step's t is float32 whatever the state's dtype
        row(torch.ones(1) * t1, torch.tensor(float(last_step_size)))

    table = torch.zeros(len(rows), NUM_COLS, dtype=torch.float64)
    for j, (t, dt) in enumerate(rows):
        coef = _coefficients(path, t, diffusion_form, diffusion_norm)
        for col, value in coef.items():
            table[j, col] = value.reshape(-1)[0].double()
        table[j, COL_T] = t.double()
        table[j, COL_DT] = dt.double()
        table[j, COL_NB] = torch.sqrt(dt).double()
        table[j, COL_HALF_DT] = (0.5 * dt).double()
        t32 = t.float()
        table[j, COL_CFG] = float(bool((t32 >= low) & (t32 <= high)))

    rps = 2 if heun else 1
    _check_finite(table, rps, num_steps - 1, sde, heun, prediction, last_step,
                  dict(path_type=path_type, prediction=prediction, mode=mode, diffusion_form=diffusion_form))
    return FlowPlan(table.to(dtype).to(device), rps, num_steps - 1, mode, method, last_step if sde else None,
                    prediction)


def _cfg_range(cfg_interval):
    if cfg_interval is None:
        return float("-inf"), float("inf")
    if isinstance(cfg_interval, (int, float)):
        return float(cfg_interval), float("inf")
    if isinstance(cfg_interval, (tuple, list)) and len(cfg_interval) == 2 and cfg_interval[0] <= cfg_interval[1]:
        return float(cfg_interval[0]), float(cfg_interval[1])
    raise ValueError(f"cfg_interval must be None, a start time s (guide for t >= s, LightningDiT's "
                     f"cfg_interval_start) or a (low, high) pair with low <= high, got {cfg_interval!r}")


def _check_finite(table, rps, loop_steps, sde, heun, prediction, last_step, config) -> None:
    need = [COL_T, COL_DT]
    if prediction != "velocity":
        need += [COL_M, COL_V] + ([COL_NS] if prediction == "noise" else [])
    if sde:
        need += [COL_D] + ([COL_HALF_DT] if heun else [])
        if prediction == "velocity":
            need += [COL_R, COL_VAR]
    divisors = [COL_NS] if prediction == "noise" else [COL_VAR] if sde and prediction == "velocity" else []
    loop = table[: loop_steps * rps]
    checked = loop[:, need].clone()
    if sde:  # the noise scale is read on each step's first row only (Heun's corrector adds no noise)
        noise_cols = loop[::rps][:, [COL_NA, COL_NB]]
        checked[::rps] = torch.where(torch.isfinite(noise_cols).all(1, keepdim=True), checked[::rps], float("nan"))
    bad = (~torch.isfinite(checked)).nonzero()
    zero = (loop[:, divisors] == 0).nonzero()
    if zero.numel():
        r, c = zero[0].tolist()
        raise ValueError(f"the sampler divides by {_COL_NAMES[divisors[c]]} = 0 at t = {loop[r, COL_T].item()} for "
                         f"{config} (the published sampler returns NaN here); sample on an interval that avoids it "
                         "(last_step_size > 0, or sample_eps)")
    last_need = []
    if last_step == "Tweedie":
        last_need = [COL_ALPHA, COL_S2A] + ([COL_R, COL_VAR] if prediction == "velocity" else [])
    if bad.numel() == 0 and last_need:
        last_row = table[loop_steps * rps:][:, last_need]
        if not torch.isfinite(last_row).all() or (last_row[:, :1] == 0).any():
            raise ValueError(f"last_step='Tweedie' has a zero or non-finite coefficient at t = "
                             f"{table[-1, COL_T].item()} for {config}")
    if bad.numel():
        r, c = bad[0].tolist()
        what = f"{_COL_NAMES[need[c]]} is {loop[r, need[c]].item()}"
        if torch.isfinite(loop[r, need]).all():
            what = f"noise scale sqrt(2 w(t)) is {loop[r, COL_NA].item()}"
        raise ValueError(f"the sampler's {what} at t = {table[r, COL_T].item()} "
                         f"for {config} (the published sampler returns NaN here); e.g. diffusion_form='SBDM' needs "
                         "t > 0: use diffusion_form='sigma' (the published sample.py default)")


def _is_compiled(model) -> bool:
    return hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule"


@torch.no_grad()
def sample_flow(
    model,
    z: torch.Tensor,
    y: torch.Tensor | Sequence[int] | None,
    *,
    mode: str = "ode",
    sampling_method: str | None = None,
    num_steps: int = 250,
    cfg_scale: float = 1.0,
    cfg_interval=None,
    guide_all_channels: bool = False,
    timestep_shift: float = 0.0,
    path_type: str = "Linear",
    prediction: str = "velocity",
    train_eps=None,
    sample_eps=None,
    diffusion_form: str = "sigma",
    diffusion_norm: float = 1.0,
    last_step: str | None = "Mean",
    last_step_size: float = 0.04,
    null_class: int | None = None,
    generator: torch.Generator | None = None,
    cuda_graph: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Samples x1 [n, C, H, W] from the initial noise z [n, C, H, W] (float32 or float64; the state's dtype).

    model: called as model(x, t, y) (model(x, t) with y=None) on the doubled batch [x; x] with
    [y; null_class] when cfg_scale > 1, t a [B] tensor of times in [0, 1]; it returns [B, >= C, H, W]
    (a learned-sigma DiT's extra channels are ignored, as SiT's forward drops them). null_class defaults
    to model.num_classes. mode "ode" (sampling_method "euler" | "heun2", timestep_shift) or "sde"
    ("Euler" | "Heun", diffusion_form / diffusion_norm, last_step None | "Mean" | "Tweedie" | "Euler" of
    size last_step_size); path_type / prediction / train_eps / sample_eps as create_transport's. CFG on the
    first 3 channels as published (all with guide_all_channels). backend: the update's ("auto",
    "triton", "torch"). cuda_graph: on CUDA capture one step (model + update) and replay it.
    """
    if not isinstance(z, torch.Tensor) or z.dim() != 4 or z.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"z must be a float32/float64 noise tensor [n, C, H, W], got "
                         f"{z.dtype if isinstance(z, torch.Tensor) else type(z).__name__} "
                         f"{list(z.shape) if isinstance(z, torch.Tensor) else ''}")
    n, C, H, W = z.shape
    device = z.device
    cfg = cfg_scale > 1.0
    if y is None:
        if cfg:
            raise ValueError(f"cfg_scale={cfg_scale} needs class labels y, got y=None")
        y_in = None
    else:
        y = torch.as_tensor(y, device=device).reshape(-1)
        if y.numel() != n or y.is_floating_point() or y.dtype == torch.bool:
            raise ValueError(f"y must hold {n} integer class labels (one per noise sample), got {y.dtype} {y.numel()}")
        if cfg:
            if null_class is None:
                null_class = getattr(model, "num_classes", None)
                if null_class is None:
                    raise ValueError("cfg_scale > 1 needs the null class label: pass null_class= (the model has no "
                                     "num_classes attribute)")
            y_in = torch.cat([y, torch.full_like(y, int(null_class))])
        else:
            y_in = y
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator must be on z's device {device}, got one on {generator.device}")
    if getattr(model, "training", False):
        warnings.warn("dit_fast.sample_flow: the model is in training mode (label dropout is on, and it draws random "
                      "numbers); call model.eval() first", stacklevel=2)

    plan = build_flow_table(mode=mode, sampling_method=sampling_method, num_steps=num_steps, path_type=path_type,
                            prediction=prediction, train_eps=train_eps, sample_eps=sample_eps,
                            timestep_shift=timestep_shift, diffusion_form=diffusion_form,
                            diffusion_norm=diffusion_norm, last_step=last_step, last_step_size=last_step_size,
                            cfg_interval=cfg_interval, dtype=z.dtype, device=device)
    sde = plan.mode == "sde"
    heun = plan.method in ("heun2", "Heun")
    B = 2 * n if cfg else n
    x = z.detach().clone(memory_format=torch.contiguous_format)
    xin = torch.cat([x, x]) if cfg else x.clone()
    k = torch.zeros_like(x)
    noise = torch.zeros(B if sde else n, C, H, W, dtype=x.dtype, device=device)  # read only by SDE updates
    t_col = plan.table[:, COL_T].to(x.dtype if sde else torch.float32).reshape(-1, 1)
    rps = plan.rows_per_step
    t_rows = t_col[: plan.num_loop_steps * rps].reshape(plan.num_loop_steps, rps)
    t_in = torch.empty(B, dtype=t_col.dtype, device=device)
    step = torch.zeros(1, dtype=torch.long, device=device)
    update = dict(prediction=plan.prediction, rows_per_step=rps, cfg_scale=float(cfg_scale),
                  guided_channels=C if guide_all_channels else 3, cfg=cfg, backend=backend)

    def evaluate():
        return model(xin, t_in, y_in) if y_in is not None else model(xin, t_in)

    def one_step():
        if sde and heun:
            flow_step_(x, xin, xin, k, noise, plan.table, step, stage="noise", row_offset=0, **update)
        t_in.copy_(t_rows.index_select(0, step)[0, 0].expand(B))
        out = evaluate()
        if heun:
            flow_step_(x, xin, out, k, noise, plan.table, step, stage="heun1", row_offset=0, use_score=sde, **update)
            t_in.copy_(t_rows.index_select(0, step)[0, 1].expand(B))
            out = evaluate()
            flow_step_(x, xin, out, k, noise, plan.table, step, stage="heun2", row_offset=1, use_score=sde, sde=sde,
                       **update)
        else:
            flow_step_(x, xin, out, k, noise, plan.table, step, stage="euler", row_offset=0, use_score=sde, sde=sde,
                       **update)
        step.add_(1)

    def draw_noise():
        # float32 draws, converted: the published step draws torch.randn(x.size()).to(x)
        if generator is None:
            noise.copy_(torch.randn(noise.shape))
        else:
            noise.copy_(torch.randn(noise.shape, generator=generator, device=generator.device))

    compiled = _is_compiled(model)
    use_graph = cuda_graph and device.type == "cuda" and not compiled
    if cuda_graph and device.type == "cuda" and compiled:
        warnings.warn("dit_fast.sample_flow: the model is torch.compile'd; its own CUDA graphs "
                      "(mode='reduce-overhead') are used instead of capturing one here", stacklevel=2)
    graph = _capture(one_step, (x, xin, k), step) if use_graph and plan.num_loop_steps > 0 else None
    for _ in range(plan.num_loop_steps):
        if sde:
            draw_noise()
        if graph is not None:
            graph.replay()
        else:
            if compiled and device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            one_step()

    if plan.last_step is not None:  # one more evaluation at t1, without noise; step == num_loop_steps here
        t_in.copy_(t_col[plan.num_loop_steps * rps, 0].expand(B))
        out = evaluate()
        if plan.last_step == "Tweedie":
            flow_step_(x, xin, out, k, noise, plan.table, step, stage="tweedie", **update)
        else:  # "Mean": a noiseless Euler step of the SDE drift; "Euler": of the probability-flow drift
            flow_step_(x, xin, out, k, noise, plan.table, step, stage="euler", use_score=plan.last_step == "Mean",
                       **update)
    return x


def _capture(one_step, state, step: torch.Tensor) -> torch.cuda.CUDAGraph:
    """Warm up on a side stream (lazy inits, cuBLAS workspaces, Triton compiles), restore the state the
    warm-up advanced, then capture one step."""
    saved = [s.clone() for s in state]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step.zero_()
            one_step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        one_step()
    for s, v in zip(state, saved):  # capturing records without running; the warm-up did run: undo it
        s.copy_(v)
    step.zero_()
    return graph
