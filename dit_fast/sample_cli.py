"""`dit-fast sample`: class-conditional samples from a DiT, SiT or LightningDiT, as a PNG grid and an FID-ready .npz.

    dit-fast sample --model DiT-XL/2 --ckpt DiT-XL-2-256x256.pt --vae ema --out samples/
    torchrun --nproc_per_node=8 -m dit_fast sample --ckpt ... --num-samples 50000 --out fid50k/
    dit-fast sample --model SiT-XL/2 --ckpt SiT-XL-2-256x256.pt --mode sde --sampling-method Euler --out sit/

DiT models sample with --sampler ddpm | ddim (DDPM, respaced); SiT models (flow matching, the
transport of --path-type / --prediction) with --mode ode (--sampling-method euler | heun2,
--timestep-shift) or sde (Euler | Heun, --diffusion-form, --last-step, --last-step-size), optionally
guided only inside --cfg-interval; an option of the other family is refused. A SiT's learned-sigma
head is read off its checkpoint (published SiT-XL/2 256: yes; published sample.py assumes no for a
custom --ckpt, train.py's SiT checkpoints have one).

LightningDiT models sample as the published inference.py does by default (configs/
lightningdit_xl_vavae_f16d32.yaml): --mode ode, euler, 250 steps, --timestep-shift 0.3, --cfg-scale 10
guided from t = 0.11 on (--cfg-interval 0.11: its cfg_interval_start; t runs from 0, noise, to 1, data),
the XL/1 recipe's model (--[no-]use-swiglu, --[no-]use-rope, --[no-]use-rmsnorm, --[no-]use-qknorm,
--[no-]wo-shift change it). The sampled latents are de-normalized with the training data's per-channel
statistics as inference.py does before decoding, x * std / --latent-multiplier + mean:
--latent-stats FILE (the published latents_stats.pt, or a .pt/.safetensors of "mean" and "std" per
channel; dit_fast.data.LatentStats), or --latent-stats none to keep the model's normalized latents.
The VA-VAE tokenizer is not a diffusers model and cannot be downloaded here, so --vae defaults to none:
OUT/latents.npz (arr_0: float32 [N, 32, h, w], de-normalized, ready for the VA-VAE decoder; labels).
With --vae DIR (a local diffusers AutoencoderKL with as many latent channels as the model, e.g. a
converted VA-VAE) the de-normalized latents are decoded as given (no 0.18215 scaling, as VA-VAE's
decode_to_images) into samples.npz and grid.png. run.json records the recipe settings, the model options
and the statistics' digest; a train.py checkpoint trained with other statistics or model options is
refused.

The sample set is cut into batches of --batch-size; batch j is sampled with seed --seed + j (so the
result does not depend on the number of ranks), by rank j mod WORLD_SIZE, and written atomically to
OUT/shards/batch_JJJJJJ.npz. A rerun with the same arguments skips the batches already on disk
(resume). When every batch exists, rank 0 writes OUT/samples.npz (arr_0: uint8 [N, H, W, 3], the
layout of the ADM / guided-diffusion FID suite; labels: [N]) and OUT/grid.png. With --vae none the
latents are kept: OUT/latents.npz (arr_0: float32 [N, C, h, w]).

A resumed run must be the same run. OUT/run.json (written once the VAE and the weights have loaded)
records the settings and the SHA-256 of the --ckpt file's content; a rerun whose settings or weights
differ (the checkpoint at the same path was replaced) is refused, naming both. Each shard records
the run's id and its batch index; a shard that does not hold its batch of this run (truncated, the
wrong row count, shape, dtype or labels, another run's) is sampled again, saying why, and the merge
reads every shard in full before writing the result.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import zipfile

import numpy as np
import torch

from .atomic import atomic_write, remove_stale_temporaries, write_text
from .cli_args import converted, finite_float, non_negative_float, positive_int

# The labels of the published sample.py (a demo grid).
DEMO_LABELS = (207, 360, 387, 974, 88, 979, 417, 279)
LATENT_SCALE = 0.18215  # the SD VAE's latent scaling used by DiT


def _labels_arg(text: str) -> list[int]:
    labels = converted(text, lambda t: [int(s) for s in t.split(",") if s.strip()],
                       "comma-separated class labels like 207,360")
    if not labels:
        raise argparse.ArgumentTypeError("expected at least one class label")
    return labels


def _cfg_interval_arg(text: str) -> tuple[float, float]:
    """"S" (guide for t >= S, LightningDiT's cfg_interval_start) or "LOW,HIGH"."""
    parts = converted(text, lambda t: [float(v) for v in t.split(",")], "a time S or a pair LOW,HIGH of times")
    if len(parts) == 1:
        parts.append(1.0)
    if len(parts) != 2 or not all(math.isfinite(v) for v in parts) or parts[0] > parts[1]:
        raise argparse.ArgumentTypeError(f"expected a time S or a pair LOW,HIGH of finite times with LOW <= HIGH, "
                                         f"got {text!r}")
    return parts[0], parts[1]


def model_names() -> list[str]:
    from .models import DiT_models, LightningDiT_models, SiT_models

    return list(DiT_models) + list(SiT_models) + list(LightningDiT_models)


def is_sit(model_name: str) -> bool:
    """A flow model (sampled with --mode ode | sde): a SiT or a LightningDiT."""
    return model_name.startswith(("SiT-", "LightningDiT-"))


def is_lightning(model_name: str) -> bool:
    return model_name.startswith("LightningDiT-")


# LightningDiT's model options (argparse dest -> the XL/1 recipe's value); refused for a DiT or SiT.
LIGHTNING_MODEL_OPTIONS = {"use_qknorm": False, "use_swiglu": True, "use_rope": True, "use_rmsnorm": True,
                           "wo_shift": False}
# What an option left out means, per family: DiT/SiT as before, LightningDiT its published inference's.
FAMILY_DEFAULTS = {
    "DiT": {"cfg_scale": 4.0, "vae": "ema", "latent_factor": 8},
    "LightningDiT": {"cfg_scale": 10.0, "vae": "none", "latent_factor": 16},  # VA-VAE f16d32
}
LIGHTNING_FLOW_DEFAULTS = {"timestep_shift": 0.3, "cfg_interval": (0.11, 1.0)}
LIGHTNING_IN_CHANNELS = 32  # the published in_chans: VA-VAE f16d32 latents


def family_defaults(model_name: str) -> dict:
    return FAMILY_DEFAULTS["LightningDiT" if is_lightning(model_name) else "DiT"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .flow_sampling import LAST_STEPS
    from .transport import PATH_TYPES, PREDICTIONS
    from .transport.paths import DIFFUSION_FORMS

    p = parser
    p.add_argument("--model", default="DiT-XL/2", choices=model_names(), help="DiT, SiT or LightningDiT config")
    w = p.add_mutually_exclusive_group(required=True)
    w.add_argument("--ckpt", default=None,
                   help="weights: .pt (official, or a training checkpoint's EMA) or .safetensors")
    w.add_argument("--random-init", action="store_true", help="random weights (a demo; the samples are noise-like)")
    p.add_argument("--image-size", type=positive_int, default=256,
                   help="pixels; latents are image-size / the VAE's factor (8; LightningDiT's VA-VAE: 16)")
    p.add_argument("--num-classes", type=positive_int, default=1000)
    p.add_argument("--num-steps", type=positive_int, default=250,
                   help="sampling steps (DiT: respaced from 1000; SiT: grid times, >= 2)")
    p.add_argument("--cfg-scale", type=finite_float, default=None,
                   help="classifier-free guidance; <= 1 turns it off (default 4; LightningDiT 10)")
    p.add_argument("--guide-all-channels", action="store_true", help="guide all latent channels (published: 3)")
    p.add_argument("--class-labels", type=_labels_arg, default=None,
                   help="comma list, repeated to --num-samples (default: the published demo labels, or uniform "
                        "random labels when --num-samples is given)")
    p.add_argument("--num-samples", type=positive_int, default=None, help="total samples over all ranks (FID: 50000)")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="samples per batch (the CFG batch is twice this)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default=None, help="DiT models (default ddpm)")
    p.add_argument("--eta", type=non_negative_float, default=0.0, help="DDIM eta (>= 0; 0: deterministic)")
    f = p.add_argument_group("SiT models (flow matching; the published sample.py's options)")
    f.add_argument("--mode", choices=("ode", "sde"), default=None, help="default ode")
    f.add_argument("--sampling-method", default=None,
                   help="ode: euler | heun2 (default euler); sde: Euler | Heun (default Euler)")
    f.add_argument("--timestep-shift", type=non_negative_float, default=None,
                   help="ode: shift of the time grid (default 0; LightningDiT 0.3)")
    f.add_argument("--cfg-interval", type=_cfg_interval_arg, default=None,
                   help="guide only for t in LOW,HIGH (or t >= S); default always (LightningDiT: 0.11)")
    f.add_argument("--diffusion-form", choices=DIFFUSION_FORMS[:6], default=None, help="sde (default sigma)")
    f.add_argument("--diffusion-norm", type=finite_float, default=None, help="sde (default 1)")
    f.add_argument("--last-step", choices=[str(v) for v in LAST_STEPS], default=None,
                   help="sde: the last step, without noise (default Mean)")
    f.add_argument("--last-step-size", type=non_negative_float, default=None, help="sde (default 0.04)")
    f.add_argument("--path-type", choices=list(PATH_TYPES), default=None,
                   help="the transport the model was trained with (default Linear)")
    f.add_argument("--prediction", choices=list(PREDICTIONS), default=None, help="default velocity")
    f.add_argument("--train-eps", type=non_negative_float, default=None)
    f.add_argument("--sample-eps", type=non_negative_float, default=None)
    lg = p.add_argument_group("LightningDiT models (default: the XL/1 recipe's SwiGLU, RoPE, RMSNorm)")
    for name, default in LIGHTNING_MODEL_OPTIONS.items():
        lg.add_argument("--" + name.replace("_", "-"), action=argparse.BooleanOptionalAction, default=None,
                        help=f"default {'on' if default else 'off'}")
    lg.add_argument("--latent-stats", default=None,
                    help="required: the training latents' per-channel mean/std file (the published "
                         "latents_stats.pt, or .pt/.safetensors), to de-normalize the samples; 'none' keeps them "
                         "normalized")
    lg.add_argument("--latent-multiplier", type=finite_float, default=None, help="the training's (published: 1.0)")
    p.add_argument("--vae", default=None,
                   help="diffusers AutoencoderKL: a local directory, a Hugging Face cache name, 'ema'/'mse' "
                        "(stabilityai/sd-vae-ft-*), or 'none' to keep latents; never downloaded (default ema; "
                        "LightningDiT none)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--device", default=None,
                   help="cuda | cpu (default: cuda when available; cuda:LOCAL_RANK under torchrun)")
    p.add_argument("--backend", default="auto", help="dit_fast kernel backend")
    p.add_argument("--no-cuda-graph", action="store_true", help="run the steps eagerly on CUDA")
    p.add_argument("--grid-size", type=int, default=64, help="samples in grid.png (0: no grid)")
    p.add_argument("--depth", type=positive_int, default=None, help="override the config's depth (small test models)")
    p.add_argument("--hidden-size", type=positive_int, default=None, help="override the config's hidden size")
    p.add_argument("--num-heads", type=positive_int, default=None, help="override the config's number of heads")
    p.add_argument("--no-progress", action="store_true")


# ----------------------------------------------------------------------------------------------- families
# The SiT options (argparse dest -> the value when not given); a DiT run refuses every one of them.
FLOW_OPTIONS = {"mode": "ode", "sampling_method": None, "timestep_shift": 0.0, "cfg_interval": None,
                "diffusion_form": "sigma", "diffusion_norm": 1.0, "last_step": "Mean", "last_step_size": 0.04,
                "path_type": "Linear", "prediction": "velocity", "train_eps": None, "sample_eps": None}
SDE_ONLY = ("diffusion_form", "diffusion_norm", "last_step", "last_step_size")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def resolve_sampling(args) -> dict:
    """The keyword arguments of dit_fast.sample for this run (the sampler's family checked against the
    model's), all explicit so that run.json records them; SystemExit naming the option that does not fit."""
    given = [d for d in FLOW_OPTIONS if getattr(args, d) is not None]
    if not is_sit(args.model):
        if given:
            raise SystemExit(f"{', '.join(map(_flag, given))}: SiT (flow) sampling options, but --model {args.model} "
                             "is a DiT: it samples with --sampler ddpm | ddim")
        return {"sampler": args.sampler or "ddpm", "eta": args.eta}
    if args.sampler is not None or args.eta != 0:
        raise SystemExit(f"{'--sampler' if args.sampler is not None else '--eta'}: a DiT (DDPM) sampling option, but "
                         f"--model {args.model} is a SiT: it samples with --mode ode | sde")
    if args.num_steps < 2:
        raise SystemExit(f"--num-steps must be >= 2 for a SiT (grid times including both ends), got {args.num_steps}")
    defaults = FLOW_OPTIONS | (LIGHTNING_FLOW_DEFAULTS if is_lightning(args.model) else {})
    flow = {d: getattr(args, d) if getattr(args, d) is not None else default for d, default in defaults.items()}
    mode = flow.pop("mode")
    wrong = [d for d in (SDE_ONLY if mode == "ode" else ("timestep_shift",)) if d in given]
    if wrong:
        raise SystemExit(f"{', '.join(map(_flag, wrong))}: not an option of --mode {mode} "
                         f"(it is one of --mode {'sde' if mode == 'ode' else 'ode'})")
    from .flow_sampling import ODE_METHODS, SDE_METHODS

    methods = ODE_METHODS if mode == "ode" else SDE_METHODS
    if flow["sampling_method"] is None:
        flow["sampling_method"] = methods[0]
    elif flow["sampling_method"] not in methods:
        raise SystemExit(f"--sampling-method for --mode {mode} must be one of {', '.join(methods)} (the fast "
                         f"sampler), got {flow['sampling_method']!r}; the adaptive solvers (dopri5, ...) run "
                         "through dit_fast.transport.Sampler")
    if flow["last_step"] == "None":
        flow["last_step"] = None
    for d in (SDE_ONLY if mode == "ode" else ("timestep_shift",)):
        del flow[d]
    if flow["cfg_interval"] is not None:
        flow["cfg_interval"] = list(flow["cfg_interval"])
    return {"sampler": mode, **flow}


def resolve_family(args) -> None:
    """Fills in the options a family defaults differently (--cfg-scale, --vae; LightningDiT's model options and
    --latent-multiplier); SystemExit for a LightningDiT option given to a DiT or SiT, or a LightningDiT run
    without --latent-stats."""
    for name, value in family_defaults(args.model).items():
        if name != "latent_factor" and getattr(args, name) is None:
            setattr(args, name, value)
    given = [d for d in (*LIGHTNING_MODEL_OPTIONS, "latent_stats", "latent_multiplier") if getattr(args, d) is not None]
    if not is_lightning(args.model):
        if given:
            raise SystemExit(f"{', '.join(map(_flag, given))}: LightningDiT options, but --model is {args.model}")
        return
    for name, default in LIGHTNING_MODEL_OPTIONS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.latent_multiplier is None:
        args.latent_multiplier = 1.0
    if not args.latent_multiplier > 0:
        raise SystemExit(f"--latent-multiplier must be > 0, got {args.latent_multiplier}")
    if args.latent_stats is None:
        raise SystemExit(f"--latent-stats: --model {args.model} samples latents normalized per channel (as it was "
                         "trained); pass the training data's --latent-stats FILE (the published latents_stats.pt) to "
                         "de-normalize them as the published inference does before decoding, or --latent-stats none "
                         "to keep them normalized")


def open_latent_stats(args):
    """The --latent-stats of a LightningDiT run (None for 'none' and other families); SystemExit when missing,
    unreadable or for another number of channels than the model's."""
    if not is_lightning(args.model) or args.latent_stats == "none":
        return None
    from .data import LatentStats

    try:
        return LatentStats.load(args.latent_stats, channels=LIGHTNING_IN_CHANNELS, multiplier=args.latent_multiplier)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--latent-stats: {e}") from None


# ----------------------------------------------------------------------------------------------- helpers
def _dist():
    """(rank, world, device-index or None), initialising the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def load_vae(name: str, device):
    """A diffusers AutoencoderKL from a local directory or the Hugging Face cache, offline; None for 'none'."""
    if name == "none":
        return None
    try:
        from diffusers.models import AutoencoderKL
    except ImportError as e:
        raise SystemExit(f"--vae {name!r} needs diffusers (pip install diffusers), or pass --vae none: {e}") from e
    repo = f"stabilityai/sd-vae-ft-{name}" if name in ("ema", "mse") else name
    try:
        vae = AutoencoderKL.from_pretrained(repo, local_files_only=True)
    except Exception as e:
        raise SystemExit(
            f"--vae: cannot load an AutoencoderKL from {repo!r} without downloading ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); pass a local directory, fill the Hugging Face cache "
            f"first, or use --vae none"
        ) from e
    return vae.to(device).eval()


def vae_factor(vae, default: int = 8) -> int:
    return default if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)


def decode_to_uint8(vae, latents: torch.Tensor, scale: float = LATENT_SCALE) -> np.ndarray:
    """[N, C, h, w] latents -> uint8 [N, H, W, 3] images, as the published sample_ddp.py converts them (and
    LightningDiT's VA-VAE decode_to_images, with scale=1: its latents are decoded as they are)."""
    images = vae.decode(latents.to(vae.dtype) / scale).sample.float()
    images = torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1)
    return images.to("cpu", dtype=torch.uint8).numpy()


def image_grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """uint8 [N, H, W, 3] -> one uint8 [rows*(H+2)+2, cols*(W+2)+2, 3] image with 2-pixel gutters."""
    n, h, w, _ = images.shape
    cols = cols or min(n, max(1, math.ceil(math.sqrt(n))))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + 2) + 2, cols * (w + 2) + 2, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + c * (w + 2): 2 + c * (w + 2) + w] = img
    return grid


def _save_npz(path: str, **arrays) -> None:
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)


def _save_png(path: str, image: np.ndarray) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue())


def all_labels(args) -> np.ndarray:
    """The N labels of the whole run, the same on every rank."""
    if args.class_labels is not None:
        n = args.num_samples or len(args.class_labels)
        return np.resize(np.array(args.class_labels, dtype=np.int64), n)
    if args.num_samples is None:  # the published demo labels (ImageNet), else the first classes
        demo = DEMO_LABELS if args.num_classes > max(DEMO_LABELS) else range(min(8, args.num_classes))
        return np.array(demo, dtype=np.int64)
    g = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, args.num_classes, (args.num_samples,), generator=g).numpy()


def build_model(args, latent_size: int, device, sampling: dict | None = None, stats=None):
    """The --model (a DiT, or a SiT or LightningDiT with the learned-sigma head its checkpoint has) with the
    --ckpt weights. sampling (resolve_sampling's): a SiT or LightningDiT training checkpoint whose recorded
    transport differs is refused; stats (open_latent_stats's): a LightningDiT one trained on other latent
    statistics, or with other model options, too."""
    from .checkpoint import StateDictMismatchError, UnsafeCheckpointError, _read_file, load_checkpoint, read_state_dict
    from .configs import LIGHTNING_CONFIGS
    from .models import DiT, LightningDiT, SiT
    from .reference import CONFIGS
    from .testing import randomize_weights_

    lightning = is_lightning(args.model)
    depth, hidden, patch, heads = (LIGHTNING_CONFIGS[args.model] if lightning
                                   else CONFIGS["DiT-" + args.model.split("-", 1)[1]])
    in_channels = LIGHTNING_IN_CHANNELS if lightning else 4
    weights = args.ckpt
    learn_sigma = not lightning  # the published constructors' defaults
    if args.ckpt and is_sit(args.model):
        try:
            raw = _read_file(args.ckpt, "cpu")  # read once: the weights, their head, the training args
            weights = read_state_dict(raw)
        except (FileNotFoundError, ValueError, KeyError, TypeError, UnsafeCheckpointError) as e:
            raise SystemExit(f"--ckpt: {e}") from None
        learn_sigma = _has_sigma_head(weights, patch, in_channels, default=learn_sigma)
        if sampling is not None:
            _check_recorded_transport(args.ckpt, raw, sampling)
        if lightning:
            _check_recorded_lightning(args, raw, stats)
    options = {k: getattr(args, k) for k in LIGHTNING_MODEL_OPTIONS} if lightning else {}
    cls = LightningDiT if lightning else SiT if is_sit(args.model) else DiT
    model = cls(input_size=latent_size, patch_size=patch, in_channels=in_channels, num_classes=args.num_classes,
                backend=args.backend, depth=args.depth or depth, hidden_size=args.hidden_size or hidden,
                num_heads=args.num_heads or heads, learn_sigma=learn_sigma, **options)
    if args.ckpt:
        try:
            load_checkpoint(model, weights)
        except StateDictMismatchError as e:
            raise SystemExit(
                f"--ckpt {args.ckpt} does not fit --model {args.model} (image size {args.image_size}, "
                f"{args.num_classes} classes, with the --depth/--hidden-size overrides given): {e}"
            ) from None
        except (FileNotFoundError, ValueError, KeyError, TypeError, UnsafeCheckpointError) as e:
            raise SystemExit(f"--ckpt: {e}") from None
    else:
        randomize_weights_(model, torch.Generator().manual_seed(args.seed))
    return model.to(device).eval()


def _has_sigma_head(state_dict, patch: int, in_channels: int = 4, default: bool = True) -> bool:
    """Whether the weights' final layer outputs 2 * in_channels channels per pixel (a learned-sigma head,
    which a SiT's forward cuts off); the published constructor's default when it is not there."""
    weight = state_dict.get("final_layer.linear.weight")
    if weight is None or weight.dim() != 2:
        return default
    return int(weight.shape[0]) == patch * patch * in_channels * 2


TRANSPORT_KEYS = ("path_type", "prediction", "train_eps", "sample_eps")  # what sampling must agree on


def _check_recorded_transport(path: str, raw, sampling: dict) -> None:
    """A training checkpoint (benchmarks/train.py's or the published SiT train.py's) records the transport
    its model learned in "args": sampling it with another path or prediction gives wrong samples silently."""
    recorded = raw.get("args") if isinstance(raw, dict) else None
    if isinstance(recorded, argparse.Namespace):
        recorded = vars(recorded)
    if not isinstance(recorded, dict) or "path_type" not in recorded:
        return  # a plain state_dict (the published SiT-XL-2-256x256.pt): nothing recorded
    differ = [k for k in TRANSPORT_KEYS if recorded.get(k) != sampling.get(k)]
    if differ:
        want = " ".join(f"{_flag(k)} {recorded.get(k)}" for k in differ)
        got = ", ".join(f"{_flag(k)} {sampling.get(k)}" for k in differ)
        raise SystemExit(f"--ckpt {path} was trained with {want} (its recorded args), but this run samples with "
                         f"{got}: pass {want}")


def _check_recorded_lightning(args, raw, stats) -> None:
    """A benchmarks/train.py LightningDiT checkpoint records its model options and the digest of the latent
    statistics it trained on: de-normalizing with other statistics gives wrong samples silently."""
    recorded = raw.get("args") if isinstance(raw, dict) else None
    if not isinstance(recorded, dict):
        return  # the published checkpoints: a state_dict, or {"model", "ema", "opt", "config"}
    differ = [k for k in LIGHTNING_MODEL_OPTIONS if k in recorded and recorded[k] != getattr(args, k)]
    if differ:
        want = " ".join(("--" if recorded[k] else "--no-") + k.replace("_", "-") for k in differ)
        raise SystemExit(f"--ckpt {args.ckpt} was trained with {want} (its recorded args): pass {want}")
    if "latent_stats_sha256" in recorded:
        theirs, ours = recorded["latent_stats_sha256"], None if stats is None else stats.digest()
        if theirs != ours:
            trained = f"statistics {recorded.get('latent_stats')} (digest {theirs})" if theirs else "no statistics"
            raise SystemExit(f"--latent-stats: --ckpt {args.ckpt} was trained on latents normalized with {trained}, "
                             f"but this run de-normalizes with {args.latent_stats} (digest {ours}): pass the "
                             "statistics it was trained with")


def checkpoint_identity(path: str) -> tuple[str, tuple]:
    """(SHA-256 of the file's bytes, its (inode, size, mtime)): what the shards were sampled with.

    One pass over the file (about a second per GB); the stat tuple lets the caller check afterwards
    that the file it loaded is the one it hashed (an atomic replace makes a new inode)."""
    from .checkpoint import read_state_dict

    if not os.path.isfile(path):
        try:
            read_state_dict(path)  # its own clear message: no such file, a directory, ...
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"--ckpt: {e}") from None
        raise SystemExit(f"--ckpt: {path!r} is not a regular file")
    before = _stat_key(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest(), before


def _stat_key(path: str) -> tuple:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def _run_config(args, labels, ckpt_sha256: str | None, sampling: dict, stats=None) -> dict:
    """What run.json records: the settings that decide the samples. A SiT run adds its flow settings, a
    LightningDiT run also its model options and latent statistics (a DiT run's record is what it was before
    SiT existed, so older runs still resume)."""
    keys = ("model", "ckpt", "random_init", "image_size", "num_classes", "num_steps", "cfg_scale",
            "guide_all_channels", "batch_size", "seed", "sampler", "eta", "vae", "depth", "hidden_size", "num_heads")
    config = {k: getattr(args, k) for k in keys} | {"labels_sha": _digest(labels), "ckpt_sha256": ckpt_sha256}
    if is_sit(args.model):
        config |= {"mode" if k == "sampler" else k: v for k, v in sampling.items()}
    else:
        config["sampler"] = sampling["sampler"]
    if is_lightning(args.model):
        config |= {k: getattr(args, k) for k in LIGHTNING_MODEL_OPTIONS}
        config |= {"latent_stats": args.latent_stats, "latent_multiplier": args.latent_multiplier,
                   "latent_stats_digest": None if stats is None else stats.digest()}
    return config


def _run_id(config: dict) -> str:
    """Names the run in every shard it writes: a digest of its settings, the weights' hash included."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def _refuse_other_run(out: str, old: dict, config: dict) -> None:
    diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
    if not diff:
        return
    if diff == ["ckpt_sha256"] and old.get("ckpt_sha256") and config.get("ckpt_sha256"):
        raise SystemExit(
            f"--out {out} holds shards sampled from {old.get('ckpt')} with content sha256 "
            f"{old['ckpt_sha256'][:16]}..., but --ckpt {config['ckpt']} now holds other weights (sha256 "
            f"{config['ckpt_sha256'][:16]}...): the checkpoint was replaced since. Resuming would mix samples of "
            "two models; use a fresh --out (or put the original checkpoint back)"
        )
    raise SystemExit(f"--out {out} holds a run with other settings ({', '.join(diff)}); use another --out")


# ----------------------------------------------------------------------------------------------- run
def run(args) -> int:
    from .sampling import sample

    rank, world, local = _dist()
    if args.device:
        device = torch.device(args.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local or 0)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    out = os.path.abspath(args.out)
    shard_dir = os.path.join(out, "shards")
    os.makedirs(shard_dir, exist_ok=True)
    for directory in (out, shard_dir):  # temporaries of writes killed mid-way (SIGKILL), whose writer is gone
        remove_stale_temporaries(directory)
    labels = all_labels(args)
    if ((labels < 0) | (labels >= args.num_classes)).any():
        raise SystemExit(f"--class-labels must lie in [0, {args.num_classes - 1}], got {sorted(set(labels.tolist()))}")

    resolve_family(args)
    sampling = resolve_sampling(args)
    stats = open_latent_stats(args)
    # A resumed run must be the same run: refuse to mix shards of different settings or weights.
    ckpt_sha256, ckpt_stat = checkpoint_identity(args.ckpt) if args.ckpt else (None, None)
    config = _run_config(args, labels, ckpt_sha256, sampling, stats)
    config_path = os.path.join(out, "run.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            _refuse_other_run(out, json.load(f), json.loads(json.dumps(config)))

    vae = load_vae(args.vae, device)
    factor = vae_factor(vae, family_defaults(args.model)["latent_factor"])
    if args.image_size % factor:
        raise SystemExit(f"--image-size must be a multiple of the VAE's factor {factor}, got {args.image_size}")
    latent_size = args.image_size // factor
    channels = LIGHTNING_IN_CHANNELS if is_lightning(args.model) else 4
    vae_channels = getattr(getattr(vae, "config", None), "latent_channels", channels)
    if vae_channels != channels:
        raise SystemExit(f"--vae {args.vae} has {vae_channels} latent channels, but --model {args.model} samples "
                         f"{channels}: pass the VAE the model was trained with"
                         + (" (LightningDiT: VA-VAE f16d32 as a diffusers AutoencoderKL, or --vae none)"
                            if is_lightning(args.model) else ""))
    model = build_model(args, latent_size, device, sampling, stats)
    if args.ckpt and _stat_key(args.ckpt) != ckpt_stat:
        raise SystemExit(f"--ckpt {args.ckpt} changed while it was being read (replaced by a training run?); rerun")
    # Only now, with the VAE and the weights loaded, is this a run: a failed start records nothing.
    if rank == 0 and not os.path.exists(config_path):
        write_text(config_path, json.dumps(config, indent=1) + "\n")

    expected = _ShardSpec(
        run_id=_run_id(config), labels=labels, batch_size=args.batch_size,
        row_shape=(model.in_channels, latent_size, latent_size) if vae is None else (args.image_size,) * 2 + (3,),
        dtype=np.dtype(np.float32) if vae is None else np.dtype(np.uint8),
    )
    n_batches = math.ceil(len(labels) / args.batch_size)
    mine = [j for j in range(rank, n_batches, world)]
    todo = []
    for j in mine:
        path = _shard_path(shard_dir, j)
        if not os.path.exists(path):
            todo.append(j)
            continue
        problem = expected.problem(path, j)
        if problem:
            print(f"{path}: {problem}; sampling batch {j} again")
            todo.append(j)
    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"batches (rank 0 of {world})")
    for j in todo:
        y = expected.batch_labels(j)
        gen = torch.Generator(device).manual_seed(args.seed + j)
        with torch.inference_mode():
            z = sample(model, torch.from_numpy(y), num_steps=args.num_steps, cfg_scale=args.cfg_scale,
                       generator=gen, cuda_graph=not args.no_cuda_graph, guide_all_channels=args.guide_all_channels,
                       backend=args.backend, cfg_mode="above_one",  # sample_ddp.py: cfg_scale <= 1: no guidance
                       **sampling)
            if stats is not None:  # LightningDiT: back to the VAE's latent space, as inference.py does
                z = stats.denormalize(z.float())
            scale = 1.0 if is_lightning(args.model) else LATENT_SCALE
            arr = z.float().cpu().numpy() if vae is None else decode_to_uint8(vae, z, scale)
        _save_npz(_shard_path(shard_dir, j), arr_0=arr, labels=y, run_id=np.array(expected.run_id),
                  batch=np.array(j, dtype=np.int64))
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()

    _barrier(world)
    if rank == 0:
        _merge(out, shard_dir, n_batches, vae is None, args.grid_size, expected)
    _barrier(world)
    return 0


class _ShardSpec:
    """What shard j of this run must hold: run_id, batch j, the batch's labels, its rows' shape and dtype."""

    def __init__(self, run_id: str, labels: np.ndarray, batch_size: int, row_shape: tuple, dtype: np.dtype):
        self.run_id, self.labels, self.batch_size = run_id, labels, batch_size
        self.row_shape, self.dtype = tuple(row_shape), dtype

    def batch_labels(self, j: int) -> np.ndarray:
        return self.labels[j * self.batch_size: (j + 1) * self.batch_size]

    def problem(self, path: str, j: int) -> str:
        """"" when the shard holds batch j of this run, else what is wrong; reads only the headers and
        the small arrays (a truncated file fails there: a zip's directory is at its end)."""
        return self.read(path, j, full=False)[0]

    def read(self, path: str, j: int, full: bool = True) -> tuple[str, np.ndarray | None, np.ndarray | None]:
        """(problem, samples, labels): problem "" when the shard holds batch j of this run; full=True
        reads the samples too, which checks every member's CRC."""
        arr = None
        try:
            with zipfile.ZipFile(path) as zf:
                names = set(zf.namelist())
                missing = [n for n in ("arr_0", "labels", "run_id", "batch") if f"{n}.npy" not in names]
                if missing:
                    return f"lacks {', '.join(missing)} (written by another run or an older version)", None, None
                small = {n: _read_member(zf, n) for n in ("labels", "run_id", "batch")}
                if full:
                    arr = _read_member(zf, "arr_0")
                    shape, dtype = arr.shape, arr.dtype
                else:
                    shape, dtype = _member_header(zf, "arr_0")
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as e:
            return f"unreadable (truncated or corrupt?): {type(e).__name__}: {e}", None, None
        why = self._mismatch(small, shape, dtype, j)
        return why, (None if why else arr), (None if why else small["labels"])

    def _mismatch(self, small: dict, shape: tuple, dtype: np.dtype, j: int) -> str:
        if str(small["run_id"]) != self.run_id:
            return f"belongs to another run (run id {small['run_id']}, this run's is {self.run_id})"
        if small["batch"].shape != () or int(small["batch"]) != j:
            return f"holds batch {small['batch'].tolist()}, expected batch {j}"
        want_labels = self.batch_labels(j)
        want_shape = (len(want_labels), *self.row_shape)
        if tuple(shape) != want_shape or dtype != self.dtype:
            return f"holds {self.dtype.name if dtype == self.dtype else dtype} {list(shape)}, " \
                   f"expected {self.dtype.name} {list(want_shape)}"
        if not np.array_equal(small["labels"], want_labels):
            return f"holds labels {small['labels'].tolist()[:8]}..., expected {want_labels.tolist()[:8]}..."
        return ""


def _read_member(zf: zipfile.ZipFile, name: str) -> np.ndarray:
    with zf.open(f"{name}.npy") as f:
        return np.lib.format.read_array(f, allow_pickle=False)


def _member_header(zf: zipfile.ZipFile, name: str) -> tuple[tuple, np.dtype]:
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with zf.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        if version not in readers:
            raise ValueError(f"{name}.npy has .npy format version {version}, expected 1.0 or 2.0")
        shape, _, dtype = readers[version](f)
    return shape, dtype


def _shard_path(shard_dir: str, j: int) -> str:
    return os.path.join(shard_dir, f"batch_{j:06d}.npz")


def _merge(out: str, shard_dir: str, n_batches: int, latents: bool, grid_size: int, expected: _ShardSpec) -> None:
    missing = [j for j in range(n_batches) if not os.path.exists(_shard_path(shard_dir, j))]
    if missing:
        raise SystemExit(f"{len(missing)} of {n_batches} batches are missing (first: {missing[0]}); rerun to resume")
    arrays, labels = [], []
    for j in range(n_batches):
        path = _shard_path(shard_dir, j)
        problem, arr, lab = expected.read(path, j)
        if problem:
            os.unlink(path)  # ours, and wrong: the rerun samples this batch again
            raise SystemExit(f"{path}: {problem}; removed it, rerun to sample batch {j} again")
        arrays.append(arr)
        labels.append(lab)
    arr, lab = np.concatenate(arrays), np.concatenate(labels)
    _save_npz(os.path.join(out, "latents.npz" if latents else "samples.npz"), arr_0=arr, labels=lab)
    if not latents and grid_size > 0:
        _save_png(os.path.join(out, "grid.png"), image_grid(arr[:grid_size]))
    print(f"wrote {len(arr)} {'latents' if latents else 'samples'} to {out}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dit-fast sample", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
