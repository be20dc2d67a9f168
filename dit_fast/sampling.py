"""dit_fast.sample: the published DiT sampling loop, fast.

Per step it makes one model call on the doubled CFG batch and one fused update kernel
(dit_fast.ops.sampler_step); everything a step needs that changes from step to step (timestep, the
diffusion coefficients) lives in device tensors indexed by a step counter that the step itself
advances on the device. Shapes are static and nothing waits on the host, so on CUDA the whole step
(model + update + counter) is captured once as a CUDA graph and replayed num_steps times.

Noise: the initial latents are one randn [n, C, H, W] and every step draws one randn shaped like the
published loop's x ([2n, C, H, W] with CFG), from `generator` (the global RNG if None), so with the same
seed the result equals

    create_diffusion(str(num_steps)).p_sample_loop(model.forward_with_cfg, z2.shape, z2,
        clip_denoised=False, model_kwargs=dict(y=y2, cfg_scale=cfg_scale))[:n]

(z2 = cat([z, z]), y2 = cat([y, null labels])) to float32 rounding.

cfg_scale <= 1: the published scripts differ. sample.py always doubles the batch (the loop above, at any
cfg_scale: guidance with scale 1 is the conditional model up to rounding, but every step draws [2n]
noise); sample_ddp.py doubles only when cfg_scale > 1 and otherwise runs `model.forward` on [n] (one
randn [n] per step), so the two give different samples for one seed. cfg_mode="always" (the default)
is sample.py, cfg_mode="above_one" is sample_ddp.py; with cfg_scale > 1 they are the same. sample_ddp.py
also draws its labels (`torch.randint`) between the initial latents and the loop: pass noise=z drawn
before the labels to follow its stream exactly.

Any DiT-like module works (dit_fast.DiT, dit_fast.reference.DiT, the published model): it is called as
`model(x, t, y)` on the doubled batch and the guidance of the published `forward_with_cfg` (first 3
channels, or all with guide_all_channels) is applied in the fused update; sizes are read as in
dit_fast.dit_like. The per-step draw goes into a
static buffer right before each graph replay (a separate, tiny launch): the random stream is then
exactly the eager one, with any generator.

Flow models (SiT, LightningDiT, REPA: `returns_sigma = False`, or a module named SiT) are sampled with
sampler="ode" (the default for them) or "sde" through dit_fast.flow_sampling.sample_flow. The initial
noise is drawn as the published SiT sample.py draws it (z = randn [n, C, H, W] on the model's device,
from `generator`, else the device's global generator), the SDE noise as sample_flow draws it (from
`generator`, else the CPU's global generator, as the published sampler does), so after
torch.manual_seed(seed) the result equals, to float32 rounding,

    Sampler(create_transport(path_type, prediction, None, train_eps, sample_eps)).sample_ode(
        sampling_method=..., num_steps=num_steps)(cat([z, z]), model.forward_with_cfg,
        y=cat([y, null labels]), cfg_scale=cfg_scale)[-1][:n]                 (sample_sde for "sde")

cfg_mode as for DDPM: "always" (sample.py) guides on the doubled batch at any cfg_scale (with
cfg_scale <= 1 through an unfused forward_with_cfg, the rare case); "above_one" (sample_ddp.py) runs
fn(z, model.forward, y=y) when cfg_scale <= 1. A DDPM sampler on a flow model, or a flow sampler on a
DiT (`returns_sigma = True`, or a module named DiT), is refused: the other family's sampler gives
wrong samples without failing.

LightningDiT (dit_fast.LightningDiT, or the published module) is a flow model: its published inference.py
is the Euler ODE (250 steps) on the time grid shifted by timestep_shift = 0.3, guided only from
t = cfg_interval_start = 0.11 on (t runs from 0, noise, to 1, data; its forward_with_cfg skips the
guidance while t[0] < cfg_interval_start, comparing in float32: sample_flow's cfg_interval=0.11), with
cfg_scale 10.0 (configs/lightningdit_xl_vavae_f16d32.yaml; the 800-epoch checkpoint's FID 1.35 setting
is cfg_scale 6.7 with cfg_interval_start 0.125). LIGHTNINGDIT_SAMPLING holds these:

    sample(model, labels, **LIGHTNINGDIT_SAMPLING)

equals, after torch.manual_seed(seed), to float32 rounding,

    z = randn(n, C, H, W); fn = Sampler(create_transport("Linear", "velocity")).sample_ode(
        sampling_method="euler", num_steps=250, timestep_shift=0.3)
    fn(cat([z, z]), model.forward_with_cfg, y=cat([y, null labels]), cfg_scale=10.0, cfg_interval=True,
       cfg_interval_start=0.11)[-1][:n]

(with cfg_scale <= 1, fn(z, model.forward, y=y)[-1]: inference.py doubles the batch only when guiding,
cfg_mode="above_one").

The result is in the model's normalized latent space: the published inference de-normalizes it with the
data set's per-channel statistics before decoding (dit_fast.data.LatentStats.denormalize).
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

from .diffusion import ModelVarType, create_diffusion
from .dit_like import read_dit_like
from .flow_sampling import sample_flow
from .ops.sampler_step import NUM_COLS, sampler_step_

__all__ = ["sample", "build_step_table", "SAMPLERS", "FLOW_SAMPLERS", "is_flow_model", "LIGHTNINGDIT_SAMPLING"]

SAMPLERS = ("ddpm", "ddim")  # DDPM-trained models (DiT)
FLOW_SAMPLERS = ("ode", "sde")  # flow / interpolant models (SiT), through dit_fast.flow_sampling
CFG_MODES = ("always", "above_one")  # the published sample.py, sample_ddp.py
# The published LightningDiT inference (configs/lightningdit_xl_vavae_f16d32.yaml, inference.py): sample()'s
# arguments. cfg_interval=s is its cfg_interval_start: guidance for t >= s only.
# With cfg_scale <= 1 it runs model.forward on the undoubled batch: cfg_mode "above_one".
LIGHTNINGDIT_SAMPLING = {"sampler": "ode", "sampling_method": "euler", "num_steps": 250, "timestep_shift": 0.3,
                         "cfg_interval": 0.11, "cfg_scale": 10.0, "cfg_mode": "above_one"}


def build_step_table(diffusion, sampler: str = "ddpm", eta: float = 0.0, dtype=torch.float32, device="cpu"):
    """(table [S, NUM_COLS], model timesteps [S]) in loop order (row 0 is t = S-1).

    Coefficients are gathered in float64 and cast to `dtype` as the published code does; the DDIM
    coefficients are then derived in `dtype` in the published order of operations.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    d = diffusion
    ts = np.arange(d.num_timesteps)[::-1].copy()

    def col(arr):
        return torch.from_numpy(np.asarray(arr, dtype=np.float64)[ts]).to(dtype)

    if d.model_var_type == ModelVarType.FIXED_LARGE:
        min_log = np.log(np.append(d.posterior_variance[1], d.betas[1:]))
    else:  # FIXED_SMALL, and the lower end of LEARNED_RANGE
        min_log = d.posterior_log_variance_clipped
    abar, abar_prev = col(d.alphas_cumprod), col(d.alphas_cumprod_prev)
    sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
    cols = [
        col(d.sqrt_recip_alphas_cumprod),
        col(d.sqrt_recipm1_alphas_cumprod),
        col(d.posterior_mean_coef1),
        col(d.posterior_mean_coef2),
        col(min_log),
        col(np.log(d.betas)),
        torch.from_numpy((ts != 0).astype(np.float64)).to(dtype),
        torch.sqrt(abar_prev),
        torch.sqrt(1 - abar_prev - sigma**2),
        sigma,
    ]
    assert len(cols) == NUM_COLS
    table = torch.stack(cols, dim=1).to(device)
    timestep_map = getattr(d, "timestep_map", list(range(d.num_timesteps)))
    model_t = torch.tensor([timestep_map[i] for i in ts], dtype=torch.long, device=device)
    return table, model_t


def _labels(class_labels, num_classes: int, device) -> torch.Tensor:
    if isinstance(class_labels, torch.Tensor):
        y = class_labels.reshape(-1)
    elif isinstance(class_labels, (list, tuple)):
        y = torch.tensor(list(class_labels), dtype=torch.long)
    else:
        raise TypeError(f"class_labels must be a list of ints or an integer tensor, got {type(class_labels).__name__}")
    if y.is_floating_point() or y.dtype == torch.bool or y.numel() == 0:
        raise ValueError(f"class_labels must be a non-empty list of integer labels, got {y.dtype} of {y.numel()}")
    if y.device.type == "cpu" and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"class_labels must lie in [0, {num_classes - 1}], "
                         f"got values in [{int(y.min())}, {int(y.max())}]")
    return y.to(device=device, dtype=torch.long)


def _is_finite_number(value) -> bool:
    if isinstance(value, bool):
        return False
    try:
        return bool(np.isfinite(float(value)))
    except (TypeError, ValueError):
        return False


def _is_compiled(model) -> bool:
    return hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule"


def is_flow_model(model) -> bool | None:
    """True for a flow model (SiT, LightningDiT: `returns_sigma = False`, or a module class named SiT or
    LightningDiT), False for a DDPM one (DiT: `returns_sigma = True`, or named DiT), None when the module
    does not say."""
    base = getattr(model, "_orig_mod", model) if _is_compiled(model) else model
    returns_sigma = getattr(base, "returns_sigma", None)
    if returns_sigma is not None:
        return not returns_sigma
    return {"SiT": True, "LightningDiT": True, "DiT": False}.get(type(base).__name__)


# Arguments of one family's samplers, with their defaults: given to the other family's, they are refused.
DDPM_ONLY = {"eta": 0.0, "timestep_respacing": None, "clip_denoised": False}
FLOW_ONLY = {"sampling_method": None, "timestep_shift": 0.0, "cfg_interval": None, "diffusion_form": "sigma",
             "diffusion_norm": 1.0, "last_step": "Mean", "last_step_size": 0.04, "path_type": "Linear",
             "prediction": "velocity", "train_eps": None, "sample_eps": None}
SDE_ONLY = ("diffusion_form", "diffusion_norm", "last_step", "last_step_size")


def _resolve_sampler(model, sampler, given: dict) -> str:
    """The sampler to run: the model's family's default for None; a sampler of the other family, or an
    argument only the other family's samplers take, is a ValueError."""
    flow = is_flow_model(model)
    name = type(getattr(model, "_orig_mod", model) if _is_compiled(model) else model).__name__
    if sampler is None:
        sampler = "ode" if flow else "ddpm"
    elif sampler not in SAMPLERS + FLOW_SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS} (DiT) or {FLOW_SAMPLERS} (SiT), got {sampler!r}")
    if flow is True and sampler in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is a DDPM sampler, but the model ({name}) is a flow model "
                         f"(returns_sigma=False, SiT): use sampler='ode' or 'sde'")
    if flow is False and sampler in FLOW_SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is a flow sampler, but the model ({name}) is a DDPM model "
                         f"(returns_sigma=True, DiT): use sampler='ddpm' or 'ddim'")
    foreign = FLOW_ONLY if sampler in SAMPLERS else DDPM_ONLY
    family = "flow samplers ('ode', 'sde')" if sampler in SAMPLERS else "DDPM samplers ('ddpm', 'ddim')"
    if sampler == "ode":  # the SDE's options would be ignored by the ODE
        foreign, family = DDPM_ONLY | {k: FLOW_ONLY[k] for k in SDE_ONLY}, "DDPM samplers or sampler='sde'"
    wrong = [k for k, default in foreign.items() if not _same(given[k], default)]
    if wrong:
        raise ValueError(f"{', '.join(f'{k}={given[k]!r}' for k in wrong)}: only the {family} take "
                         f"{'this' if len(wrong) == 1 else 'these'}, but sampler={sampler!r}")
    return sampler


def _same(value, default) -> bool:
    """value is the default (an int for a float default counts: 0 for 0.0)."""
    if default is None or isinstance(default, (bool, str)):
        return value is default or (type(value) is type(default) and value == default)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == default


@torch.no_grad()
def sample(
    model,
    class_labels: Sequence[int] | torch.Tensor,
    num_steps: int = 250,
    cfg_scale: float = 4.0,
    sampler: str | None = None,
    generator: torch.Generator | None = None,
    cuda_graph: bool = True,
    *,
    eta: float = 0.0,
    timestep_respacing: str | None = None,
    guide_all_channels: bool = False,
    clip_denoised: bool = False,
    noise: torch.Tensor | None = None,
    backend: str = "auto",
    progress: bool = False,
    cfg_mode: str = "always",
    latent_size: int | tuple[int, int] | None = None,
    sampling_method: str | None = None,
    timestep_shift: float = 0.0,
    cfg_interval: float | tuple[float, float] | None = None,
    diffusion_form: str = "sigma",
    diffusion_norm: float = 1.0,
    last_step: str | None = "Mean",
    last_step_size: float = 0.04,
    path_type: str = "Linear",
    prediction: str = "velocity",
    train_eps: float | None = None,
    sample_eps: float | None = None,
) -> torch.Tensor:
    """Latents [n, C, H, W] for n = len(class_labels), sampled as the published DiT (or SiT) sample.py does.

    Classifier-free guidance on the first 3 channels (all with guide_all_channels=True), on the batch
    doubled with null labels. cfg_mode="always" (sample.py): guidance at any cfg_scale;
    cfg_mode="above_one" (sample_ddp.py): cfg_scale <= 1 samples conditionally without the null batch
    (a different noise stream: see the module doc). latent_size: the latents' size (int or (H, W))
    when the model does not state it (x_embedder.img_size, grid_size * patch_size, input_size).
    noise: initial latents (default: one randn from `generator`). cuda_graph: on CUDA, capture model +
    update as one graph (skipped for a torch.compile'd model, which makes its own with
    mode="reduce-overhead"); on the CPU the same loop runs eagerly. backend: the fused update's.

    sampler: None picks the model's family's: "ddpm" for a DiT (and a module that does not say), "ode"
    for a flow model (SiT); the other family's samplers are refused.
    DDPM ("ddpm": ancestral, learned variance; "ddim": eta): the process is respaced to num_steps
    evenly spaced steps (timestep_respacing overrides, e.g. "ddim50"); clip_denoised; progress: a bar (the
    flow samplers show none).
    Flow ("ode", "sde"; dit_fast.flow_sampling.sample_flow, whose arguments these are): num_steps grid
    times (>= 2, the published num_sampling_steps); sampling_method "euler" | "heun2" (ode, default
    euler) or "Euler" | "Heun" (sde, default Euler); timestep_shift (ode); cfg_interval: guide only for
    t in [low, high] (a number s: [s, 1]); diffusion_form / diffusion_norm, last_step None | "Mean" |
    "Tweedie" | "Euler" and last_step_size (sde; defaults of the published sample.py); path_type,
    prediction, train_eps, sample_eps: the transport the model was trained with (create_transport's).
    An argument of the other family's samplers is refused.
    """
    given = dict(eta=eta, timestep_respacing=timestep_respacing, clip_denoised=clip_denoised,
                 sampling_method=sampling_method, timestep_shift=timestep_shift, cfg_interval=cfg_interval,
                 diffusion_form=diffusion_form, diffusion_norm=diffusion_norm, last_step=last_step,
                 last_step_size=last_step_size, path_type=path_type, prediction=prediction, train_eps=train_eps,
                 sample_eps=sample_eps)
    sampler = _resolve_sampler(model, sampler, given)
    flow = sampler in FLOW_SAMPLERS
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < (2 if flow else 1):
        raise ValueError(f"num_steps must be an int >= {2 if flow else 1}"
                         f"{' (grid times including both ends)' if flow else ''}, got {num_steps!r}")
    # A NaN/inf scale or eta turns every latent into NaN (and cfg_scale=nan would skip guidance silently).
    if not _is_finite_number(cfg_scale):
        raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale!r}")
    if not _is_finite_number(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    if cfg_mode not in CFG_MODES:
        raise ValueError(f"cfg_mode must be one of {CFG_MODES} (the published sample.py, sample_ddp.py), "
                         f"got {cfg_mode!r}")
    C, (H, W), num_classes, learn_sigma = read_dit_like(model, latent_size)
    if getattr(model, "training", False):
        warnings.warn("dit_fast.sample: the model is in training mode (label dropout is on, and it draws random "
                      "numbers); call model.eval() first, as the published sample.py does", stacklevel=2)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator must be on the model's device {device}, got one on {generator.device}")

    y = _labels(class_labels, num_classes, device)
    n = y.numel()
    if flow:
        z = _initial_noise(noise, (n, C, H, W), device, generator)
        flow_args = {k: given[k] for k in FLOW_ONLY}
        return _sample_flow_model(model, z, y, num_classes, mode=sampler, num_steps=num_steps, cfg_scale=cfg_scale,
                                  cfg_mode=cfg_mode, guide_all_channels=guide_all_channels, generator=generator,
                                  cuda_graph=cuda_graph, backend=backend, **flow_args)
    cfg = cfg_mode == "always" or cfg_scale > 1.0
    diffusion = create_diffusion(timestep_respacing or str(num_steps), learn_sigma=learn_sigma)
    table, model_t = build_step_table(diffusion, sampler, eta, torch.float32, device)

    x = _initial_noise(noise, (n, C, H, W), device, generator)
    B = 2 * n if cfg else n
    y_in = torch.cat([y, torch.full_like(y, num_classes)]) if cfg else y
    noise_buf = torch.empty(B, C, H, W, device=device)
    step = torch.zeros(1, dtype=torch.long, device=device)
    t_full = torch.empty(B, dtype=torch.long, device=device)
    update = dict(cfg_scale=float(cfg_scale), guided_channels=C if guide_all_channels else 3, cfg=cfg,
                  learn_sigma=learn_sigma, clip=clip_denoised, ddim=sampler == "ddim", backend=backend)
    compiled = _is_compiled(model)

    def one_step():
        t_full.copy_(model_t.index_select(0, step).expand(B))
        x_in = torch.cat([x, x]) if cfg else x
        out = model(x_in, t_full, y_in)
        sampler_step_(x, out, noise_buf, table, step, **update)
        step.add_(1)

    def draw_noise():
        torch.randn(noise_buf.shape, generator=generator, device=device, out=noise_buf)

    steps = range(diffusion.num_timesteps)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(steps), desc="sampling", leave=False)

    use_graph = cuda_graph and device.type == "cuda"
    if use_graph and compiled:
        warnings.warn("dit_fast.sample: the model is torch.compile'd; its own CUDA graphs (mode='reduce-overhead') "
                      "are used instead of capturing one here", stacklevel=2)
        use_graph = False
    if use_graph:
        graph = _capture(one_step, x, step)
        for _ in steps:
            draw_noise()
            graph.replay()
            if bar is not None:
                bar.update()
    else:
        for _ in steps:
            draw_noise()
            if compiled and device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            one_step()
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return x


def _initial_noise(noise, shape: tuple, device, generator) -> torch.Tensor:
    """The initial latents: `noise` (checked, copied as float32) or one randn of `shape` from `generator`
    (the device's global generator when None), as the published sample.py draws z."""
    if noise is None:
        return torch.randn(shape, device=device, generator=generator)
    if tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise must have shape {list(shape)}, got {list(noise.shape)}")
    return noise.to(device=device, dtype=torch.float32).clone(memory_format=torch.contiguous_format)


def _sample_flow_model(model, z, y, num_classes: int, *, cfg_scale, cfg_mode, guide_all_channels, **flow_args):
    """sample_flow on the published SiT loop's batch: guided on [z; z] with [y; null] when cfg_scale > 1
    (sample_flow fuses the guidance), conditional on z when cfg_mode="above_one" and cfg_scale <= 1
    (sample_ddp.py), and with cfg_mode="always" and cfg_scale <= 1 the doubled batch through an unfused
    forward_with_cfg (sample.py guides at any scale: its state and its SDE noise are [2n])."""
    guided = z.shape[1] if guide_all_channels else 3
    with warnings.catch_warnings():  # sample() has said so already
        warnings.filterwarnings("ignore", message="dit_fast.sample_flow: the model is in training mode")
        if cfg_scale > 1.0 or cfg_mode == "above_one":
            return sample_flow(model, z, y, cfg_scale=float(cfg_scale), null_class=num_classes,
                               guide_all_channels=guide_all_channels, **flow_args)
        n = z.shape[0]
        y2 = torch.cat([y, torch.full_like(y, num_classes)])
        with_cfg = _ForwardWithCfg(model, float(cfg_scale), guided, z.shape[1])
        return sample_flow(with_cfg, torch.cat([z, z]), y2, cfg_scale=1.0, **flow_args)[:n]


class _ForwardWithCfg:
    """The published forward_with_cfg of any SiT-like module: the model on [x[:n]; x[:n]], the first
    `guided` channels of its first `channels` output channels guided, both halves given the result."""

    def __init__(self, model, cfg_scale: float, guided: int, channels: int):
        self.model, self.cfg_scale, self.guided, self.channels = model, cfg_scale, guided, channels

    def __call__(self, x, t, y):
        half = x[: len(x) // 2]
        out = self.model(torch.cat([half, half]), t, y)[:, : self.channels]
        eps, rest = out[:, : self.guided], out[:, self.guided:]
        cond, uncond = torch.split(eps, len(eps) // 2)
        half_eps = uncond + self.cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)


def _capture(one_step, x: torch.Tensor, step: torch.Tensor) -> torch.cuda.CUDAGraph:
    """Warm up on a side stream (lazy inits, cuBLAS workspaces, Triton compiles), restore the state the
    warm-up advanced, then capture one step."""
    x0 = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step.zero_()  # stay on row 0: a 1-step table has no row 1
            one_step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        one_step()
    # Capturing records kernels without running them; the warm-up did run: undo it.
    x.copy_(x0)
    step.zero_()
    return graph
