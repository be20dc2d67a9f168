"""Train a fast DiT, SiT or LightningDiT with the published recipe, on synthetic or pre-extracted VAE latents.

Recipe (Peebles & Xie): AdamW, lr 1e-4, weight decay 0, global batch 256, EMA of the weights
with decay 0.9999 updated every step; here with bf16 autocast. The loss is the published hybrid
loss (dit_fast.diffusion, linear betas 1e-4..0.02 over 1000 steps): the noise-prediction MSE plus
the variational-bound term that trains the learned variance (the sigma half of the output
channels), computed in fp32 from the model's output (see training_loss).

    python benchmarks/train.py --model DiT-XL/2                       # one GPU (or CPU), synthetic latents
    torchrun --nproc_per_node=8 benchmarks/train.py --data /latents   # DDP, global batch split over ranks
    python benchmarks/train.py --model SiT-XL/2 --path-type Linear --prediction velocity --data /latents

SiT models (SiT-XL/2 ... SiT-S/8) train with SiT's interpolant objective instead:
dit_fast.transport.create_transport(--path-type, --prediction, --loss-weight, --train-eps, --sample-eps,
--use-cosine-loss, --use-lognorm).training_losses(model, x, dict(y=y)), the published SiT train.py's
loss (LightningDiT's with the cosine loss: the cosine term's mean is added to the MSE's), same optimizer,
EMA and checkpoint format. Their experiment directories are named as SiT names them,
NNN-SiT-XL-2-Linear-velocity-None (path type, prediction, loss weight). The transport's draws (x0,
t; t logit-normal from NumPy's global generator) come from the global generators, which every step
seeds from (seed, step, rank). The objective a checkpoint was trained with is in its "args"; a resume
with another objective (another family, path, prediction, weighting, eps, cosine loss or t sampling)
is refused.

LightningDiT models (LightningDiT-B/1 ... LightningDiT-1p6B/2) run the published recipe by default
(hustvl/LightningDiT configs/lightningdit_xl_vavae_f16d32.yaml and train.py): the XL/1 recipe's model
(--use-swiglu --use-rope --use-rmsnorm, no QK-norm, shift kept: --[no-]use-qknorm, --[no-]wo-shift etc.
change them), the SiT transport with Linear path, velocity, logit-normal t and the cosine loss added to
the MSE (--no-use-lognorm, --no-use-cosine-loss), AdamW lr 2e-4, weight decay 0, betas (0.9, 0.95)
(--lr, --weight-decay, --beta2), global batch 1024, 80k steps, EMA 0.9999 every step, VA-VAE f16d32
latents (--downsample-ratio 16, --in-channels 32). The published train.py clips gradients only when its
config sets optimizer.max_grad_norm, which none of the published configs does: --max-grad-norm N turns it
on (torch.nn.utils.clip_grad_norm_, after the non-finite check). The latents are normalized per channel
as the published data set does, x -> (x - mean) / std * --latent-multiplier (1.0), with the statistics of
--latent-stats FILE (the published latents_stats.pt, torch.save({"mean": [1, C, 1, 1], "std": ...}), or
a .pt/.safetensors of [C] tensors: dit_fast.data.LatentStats), required with --data ('none': the
latents as they are); a file with another channel count is refused. The statistics' digest is in the
checkpoint's args: a resume with other statistics is refused as another objective. Experiment
directories are NNN-LightningDiT-XL-1.

--data: a directory of latent shards, used as-is (scale them as the sampler expects, e.g. x0.18215):
  *.pt   dicts {"latents": [N, C, H, W], "labels": [N]} (read with torch.load(weights_only=True));
  *.npy  latents [N, C, H, W] with labels in a sibling NAME.labels.npy (memory-mapped);
  *.safetensors  hustvl/LightningDiT's extract_features.py shards ("latents", "labels", "latents_flip";
         memory-mapped): each row is taken from latents or latents_flip with probability 1/2, as published.
Every shard is validated when opened (dit_fast.data): per-shard counts, integer labels in
[0, num_classes), the model's latent shape, finite values on a sample of rows (--check-data all:
every row).

Each run gets its own experiment directory, RESULTS/NNN-MODEL (MODEL with "/" as "-", NNN one more
than the highest index there, as the published train.py numbers them), made with an exclusive mkdir:
two runs started at once with the same --results-dir never share one. Checkpoints ({"model", "ema",
"opt", "args", "step"}, all weights_only-loadable) go to RESULTS/NNN-MODEL/checkpoints/STEP.pt every
--ckpt-every steps and at the end, written atomically: a kill or a full disk mid-save leaves the
previous checkpoints as they were, and the temporaries a SIGKILL leaves are removed at the next start.
--resume takes a checkpoint file, a directory of them (or an experiment or results directory), or
"auto": the experiment directories of this --model under --results-dir, the newest (highest NNN)
first, then RESULTS/checkpoints (the layout before experiment directories); a fresh start when there
is none. It continues from the newest checkpoint that loads and fits the model's config, saying which
it skipped and why; the resumed run writes its checkpoints into its own new experiment directory.
--lr / --weight-decay given with --resume replace the restored optimizer's values; without them the
checkpoint's stay.
A non-finite loss or gradient stops training before the weights (and the EMA) are touched; the
last checkpoint written stays the last good one.
dit_fast.checkpoint.load_checkpoint(model, PATH) reads a checkpoint's EMA weights.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from dit_fast import DiT_models, LightningDiT_models, SiT_models
from dit_fast.atomic import remove_stale_temporaries
from dit_fast.checkpoint import (
    UnsafeCheckpointError,
    load_training_checkpoint,
    newest_training_checkpoint,
    torch_save_atomic,
)
from dit_fast.cli_args import positive_int
from dit_fast.data import CHECK_MODES, InvalidShardError, LatentShards, LatentStats
from dit_fast.diffusion import create_diffusion
from dit_fast.transport import LOSS_WEIGHTS, PATH_TYPES, PREDICTIONS, Transport, create_transport

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
# A learning rate above this is a typo (1e39 for 1e-3.9?): AdamW moves each weight by about lr per step.
MAX_LR = 1.0
EXPERIMENT_DIR = re.compile(r"^(\d{3,})-(.+)$")
# The published optimizer settings; --lr / --weight-decay / --beta2 override them (on --resume: the checkpoint's).
RECIPE_OPTIMIZER = {"lr": 1e-4, "weight_decay": 0.0}
# The SiT objective's settings (argparse dest -> the published default); a DiT run refuses every one.
TRANSPORT_OPTIONS = {"path_type": "Linear", "prediction": "velocity", "loss_weight": None, "train_eps": None,
                     "sample_eps": None, "use_cosine_loss": False, "use_lognorm": False}
DIT_OBJECTIVE = "DDPM hybrid loss (dit_fast.diffusion, 1000 linear steps)"
# Each family's published recipe (argparse dest -> default where the option is not given). DiT and SiT:
# Peebles & Xie / Ma et al. (AdamW betas (0.9, 0.999), the SD VAE's 8x latents with 4 channels).
# LightningDiT: hustvl/LightningDiT configs/lightningdit_xl_vavae_f16d32.yaml with its train.py: AdamW
# lr 2e-4, weight decay 0, betas (0.9, 0.95), global batch 1024, 80k steps, checkpoints every 20k, the
# VA-VAE f16d32 latents (16x, 32 channels), cosine loss and logit-normal t.
FAMILY_RECIPES = {
    "DiT": dict(lr=1e-4, weight_decay=0.0, beta2=0.999, global_batch_size=256, max_steps=400_000,
                ckpt_every=50_000, downsample_ratio=8, in_channels=4),
    "LightningDiT": dict(lr=2e-4, weight_decay=0.0, beta2=0.95, global_batch_size=1024, max_steps=80_000,
                         ckpt_every=20_000, downsample_ratio=16, in_channels=32, use_cosine_loss=True,
                         use_lognorm=True),
}
FAMILY_RECIPES["SiT"] = FAMILY_RECIPES["DiT"]
# LightningDiT's model options (argparse dest -> the XL/1 recipe's value); a DiT or SiT run refuses them.
LIGHTNING_MODEL_OPTIONS = {"use_qknorm": False, "use_swiglu": True, "use_rope": True, "use_rmsnorm": True,
                           "wo_shift": False}
ADAM_BETA1 = 0.9  # every published recipe's


def family(model: str) -> str:
    """"DiT", "SiT" or "LightningDiT", from the model name."""
    return model.split("-", 1)[0]


def is_sit(model: str) -> bool:
    """Trained with the transport objective: a SiT or a LightningDiT."""
    return family(model) in ("SiT", "LightningDiT")


def is_lightning(model: str) -> bool:
    return family(model) == "LightningDiT"


def _none_or_str(text: str) -> str | None:
    return None if text == "None" else text




def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="DiT-XL/2",
                   choices=sorted(DiT_models) + sorted(SiT_models) + sorted(LightningDiT_models))
    p.add_argument("--image-size", type=positive_int, default=256,
                   help="pixels; latents are image-size / --downsample-ratio")
    p.add_argument("--downsample-ratio", type=positive_int, default=None,
                   help="the VAE's factor: 8 (SD VAE; DiT, SiT) or 16 (VA-VAE f16d32; LightningDiT)")
    p.add_argument("--in-channels", type=positive_int, default=None,
                   help="latent channels: 4 (SD VAE; DiT, SiT) or 32 (VA-VAE f16d32; LightningDiT)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--depth", type=int, default=None, help="override the config's depth (small test models)")
    p.add_argument("--hidden-size", type=int, default=None, help="override the config's hidden size")
    p.add_argument("--num-heads", type=int, default=None, help="override the config's number of heads")
    p.add_argument("--data", default=None, help="directory of latent shards (default: synthetic latents)")
    p.add_argument("--check-data", choices=CHECK_MODES, default="sample",
                   help="finite-value check of --data when opening: a sample of rows per shard, or all rows")
    p.add_argument("--latent-stats", default=None,
                   help="per-channel mean/std file (.pt as the published latents_stats.pt, or .safetensors): "
                        "every batch is normalized (x - mean) / std * --latent-multiplier; required for "
                        "LightningDiT with --data ('none': train on the latents as they are)")
    p.add_argument("--latent-multiplier", type=float, default=1.0, help="after normalizing (published: 1.0)")
    p.add_argument("--global-batch-size", type=positive_int, default=None, help="default 256 (LightningDiT 1024)")
    p.add_argument("--lr", type=float, default=None,
                   help="default 1e-4 (LightningDiT 2e-4); on --resume: the checkpoint's")
    p.add_argument("--weight-decay", type=float, default=None, help="default 0; on --resume: the checkpoint's")
    p.add_argument("--beta2", type=float, default=None,
                   help="AdamW beta2: default 0.999 (LightningDiT 0.95); on --resume: the checkpoint's")
    p.add_argument("--max-grad-norm", type=float, default=None,
                   help="clip the gradients' total L2 norm to this (torch.nn.utils.clip_grad_norm_); default off, "
                        "as in every published recipe (LightningDiT's train.py clips only when its config sets "
                        "optimizer.max_grad_norm, which none of its published configs does)")
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--max-steps", type=int, default=None, help="default 400k (LightningDiT 80k)")
    p.add_argument("--precision", choices=sorted(AUTOCAST), default="bf16", help="autocast dtype (weights stay fp32)")
    p.add_argument("--backend", default="auto", help="fused-op kernels: auto | triton | ext | torch")
    p.add_argument("--attn-backend", default="auto",
                   help="attention: auto | flash_attn_3 | flash_attn_4 | flash_attn | sdpa | math")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="activation checkpointing: every k-th block (0 = off)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--ckpt-every", type=positive_int, default=None, help="default 50k (LightningDiT 20k)")
    p.add_argument("--log-every", type=positive_int, default=100)
    p.add_argument("--resume", default=None,
                   help="a checkpoint .pt, a directory of them (the newest that loads), an experiment or "
                        "results directory, or 'auto' (this --model's experiment directories under --results-dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    m = p.add_argument_group("LightningDiT models (default: the XL/1 recipe's SwiGLU, RoPE, RMSNorm)")
    for name in LIGHTNING_MODEL_OPTIONS:
        m.add_argument("--" + name.replace("_", "-"), action=argparse.BooleanOptionalAction, default=None,
                       help=f"default {'on' if LIGHTNING_MODEL_OPTIONS[name] else 'off'}")
    t = p.add_argument_group("SiT and LightningDiT models: the transport (published SiT train.py / LightningDiT "
                             "options)")
    t.add_argument("--path-type", choices=list(PATH_TYPES), default=None, help="default Linear")
    t.add_argument("--prediction", choices=list(PREDICTIONS), default=None, help="default velocity")
    t.add_argument("--loss-weight", type=_none_or_str, choices=list(LOSS_WEIGHTS), default="unset",
                   help="velocity | likelihood | None (default): weighting of the noise and score losses")
    t.add_argument("--train-eps", type=float, default=None)
    t.add_argument("--sample-eps", type=float, default=None)
    t.add_argument("--use-cosine-loss", action=argparse.BooleanOptionalAction, default=None,
                   help="add 1 - cos(pred, target) over channels (velocity prediction); default on for "
                        "LightningDiT, off for SiT")
    t.add_argument("--use-lognorm", action=argparse.BooleanOptionalAction, default=None,
                   help="logit-normal t; default on for LightningDiT, off for SiT")
    args = p.parse_args(argv)
    recipe = FAMILY_RECIPES[family(args.model)]
    for name in ("global_batch_size", "max_steps", "ckpt_every", "downsample_ratio", "in_channels"):
        if getattr(args, name) is None:
            setattr(args, name, recipe[name])
    given = [d for d in TRANSPORT_OPTIONS if getattr(args, d) not in (None, "unset")]
    if not is_sit(args.model) and given:
        p.error(f"{', '.join('--' + d.replace('_', '-') for d in given)}: SiT (transport) options, but "
                f"--model {args.model} is a DiT (trained with the {DIT_OBJECTIVE})")
    model_options = [d for d in LIGHTNING_MODEL_OPTIONS if getattr(args, d) is not None]
    if not is_lightning(args.model) and model_options:
        p.error(f"{', '.join('--' + d.replace('_', '-') for d in model_options)}: LightningDiT model options, but "
                f"--model is {args.model}")
    for name, default in LIGHTNING_MODEL_OPTIONS.items():
        if getattr(args, name) is None:
            setattr(args, name, default if is_lightning(args.model) else None)
    if is_sit(args.model):
        for name, default in TRANSPORT_OPTIONS.items():
            if getattr(args, name) in (None, "unset"):
                setattr(args, name, recipe.get(name, default))
        for name in ("train_eps", "sample_eps"):
            value = getattr(args, name)
            if value is not None and not (math.isfinite(value) and 0 <= value < 1):
                p.error(f"--{name.replace('_', '-')} must be a number in [0, 1), got {value}")
        if args.loss_weight is not None and args.prediction == "velocity":
            p.error(f"--loss-weight {args.loss_weight} weights the noise and score losses; the velocity loss is "
                    "never weighted (the published transport ignores it): drop it, or use --prediction noise|score")
        if args.use_cosine_loss and args.prediction != "velocity":
            p.error(f"--use-cosine-loss compares velocities: it needs --prediction velocity, got {args.prediction}")
    else:
        for name in TRANSPORT_OPTIONS:
            setattr(args, name, None)
    if args.lr is not None and not (math.isfinite(args.lr) and 0 < args.lr <= MAX_LR):
        p.error(f"--lr must be a finite number in (0, {MAX_LR:g}] (the recipe's is 1e-4), got {args.lr}")
    if args.weight_decay is not None and not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        p.error(f"--weight-decay must be a finite number >= 0, got {args.weight_decay}")
    if args.beta2 is not None and not (math.isfinite(args.beta2) and 0 <= args.beta2 < 1):
        p.error(f"--beta2 must be a number in [0, 1), got {args.beta2}")
    if args.max_grad_norm is not None and not (math.isfinite(args.max_grad_norm) and args.max_grad_norm > 0):
        p.error(f"--max-grad-norm must be a finite number > 0, got {args.max_grad_norm}")
    if not (math.isfinite(args.latent_multiplier) and args.latent_multiplier > 0):
        p.error(f"--latent-multiplier must be a finite number > 0, got {args.latent_multiplier}")
    if not (math.isfinite(args.ema_decay) and 0 <= args.ema_decay <= 1):
        p.error(f"--ema-decay must be a number in [0, 1], got {args.ema_decay}")
    if args.max_steps < 0:
        p.error(f"--max-steps must be >= 0, got {args.max_steps}")
    return args


# -- the loss --------------------------------------------------------------------------------------


def training_loss(model, diffusion, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The loss of one batch of latents x [N, C, H, W] with labels y [N], averaged over the batch.

    DiT (`diffusion` a dit_fast.diffusion process): the published hybrid loss (MSE on the noise +
    variational bound on the variance); t and the noise are drawn from `generator`, so a step's draws
    are a function of (seed, step, rank). SiT (`diffusion` a dit_fast.transport.Transport): the
    transport's training loss, plus the mean cosine loss when the transport has one (LightningDiT); its
    draws come from the global generators, which the training loop seeds per (seed, step, rank).
    """
    def fp32_output(x_t, t, **kwargs):  # the model runs under autocast; the loss terms in fp32
        return model(x_t, t, **kwargs).float()

    if isinstance(diffusion, Transport):
        terms = diffusion.training_losses(fp32_output, x, dict(y=y))
        loss = terms["loss"].mean()
        return loss + terms["cos_loss"].mean() if "cos_loss" in terms else loss
    t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device, generator=generator)
    noise = torch.randn(x.shape, device=x.device, generator=generator)
    return diffusion.training_losses(fp32_output, x, t, dict(y=y), noise=noise)["loss"].mean()


def create_objective(args):
    """What training_loss trains: the transport of a SiT run, the 1000-step diffusion of a DiT run."""
    if is_sit(args.model):
        return create_transport(args.path_type, args.prediction, args.loss_weight, args.train_eps, args.sample_eps,
                                use_cosine_loss=args.use_cosine_loss, use_lognorm=args.use_lognorm)
    return create_diffusion(timestep_respacing="")  # all 1000 steps, as trained


def objective_of(run_args) -> dict:
    """The objective a run trains (from its args: this run's, or a checkpoint's "args", a dict or the
    published train.py's Namespace): the family's loss and, for a SiT, its transport settings."""
    if isinstance(run_args, argparse.Namespace):
        run_args = vars(run_args)
    model = str(run_args.get("model", "DiT-"))
    # The latents' normalization (--latent-stats): training on other statistics is another objective.
    latent_norm = {"latent_norm": run_args.get("latent_stats_sha256")}
    if not is_sit(model):
        return {"objective": DIT_OBJECTIVE} | latent_norm
    return ({"objective": "SiT transport"} | {k: run_args.get(k, "(not recorded)") for k in TRANSPORT_OPTIONS}
            | latent_norm)


# -- data ------------------------------------------------------------------------------------------


class SyntheticLatents:
    """Random latents and labels, a deterministic function of (seed, step, rank)."""

    def __init__(self, channels: int, size: int, num_classes: int):
        self.shape = (channels, size, size)
        self.num_classes = num_classes

    def batch(self, n: int, generator: torch.Generator, device):
        x = torch.randn((n, *self.shape), generator=generator, device=device)
        y = torch.randint(0, self.num_classes, (n,), generator=generator, device=device)
        return x, y


def open_data(args, model) -> SyntheticLatents | LatentShards:
    if not args.data:
        return SyntheticLatents(model.in_channels, model.input_size, model.num_classes)
    try:
        return LatentShards(args.data, latent_shape=(model.in_channels, model.input_size, model.input_size),
                            num_classes=model.num_classes, check=args.check_data)
    except (InvalidShardError, FileNotFoundError) as e:
        raise SystemExit(f"--data: {e}") from None


def open_latent_stats(args, model) -> LatentStats | None:
    """The --latent-stats (checked against the model's channels) or None; records its digest in args.
    A LightningDiT run on --data needs them (its recipe trains on normalized latents): say so, or 'none'."""
    spec = args.latent_stats
    args.latent_stats_sha256 = None
    if spec is None and is_lightning(args.model) and args.data:
        raise SystemExit(f"--latent-stats: --model {args.model} trains on latents normalized per channel (the "
                         "published recipe's latent_norm): pass --latent-stats FILE (the published latents_stats.pt, "
                         "or a .pt/.safetensors of 'mean' and 'std' per channel), or --latent-stats none to train on "
                         "the --data latents as they are")
    if spec is None or spec == "none":
        return None
    try:
        stats = LatentStats.load(spec, channels=model.in_channels, multiplier=args.latent_multiplier)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--latent-stats: {e}") from None
    args.latent_stats_sha256 = stats.digest()
    return stats


# -- checkpoints -----------------------------------------------------------------------------------


def experiment_name(model: str, transport: dict | None = None) -> str:
    """The experiment directory's name after the index: the model name with "/" as "-" (DiT-XL-2); a SiT
    run's adds its path type, prediction and loss weight, as the published SiT train.py names them
    (SiT-XL-2-Linear-velocity-None)."""
    name = model.replace("/", "-")
    if transport:
        name += f"-{transport['path_type']}-{transport['prediction']}-{transport['loss_weight']}"
    return name


def transport_of(args) -> dict | None:
    """The transport in a SiT run's experiment name (LightningDiT's published runs are named by model)."""
    return {k: getattr(args, k) for k in TRANSPORT_OPTIONS} if family(args.model) == "SiT" else None


def create_experiment_dir(results_dir, model: str, transport: dict | None = None) -> Path:
    """A new RESULTS/NNN-NAME (experiment_name), NNN one more than the highest index there, made with an
    exclusive mkdir: a run that loses the race for an index (another run made it first) takes the next one."""
    results = Path(results_dir)
    results.mkdir(parents=True, exist_ok=True)
    taken = [int(m[1]) for p in results.iterdir() if p.is_dir() and (m := EXPERIMENT_DIR.match(p.name))]
    index = max(taken, default=-1) + 1
    while True:
        path = results / f"{index:03d}-{experiment_name(model, transport)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            index += 1


def experiment_checkpoint_dirs(results_dir, model: str | None, transport: dict | None = None) -> list[Path]:
    """The checkpoint directories under a results directory, newest experiment first: NNN-NAME/checkpoints
    (every model when `model` is None), then RESULTS/checkpoints (the layout before experiment directories)."""
    results = Path(results_dir)
    found = []
    if results.is_dir():
        for p in results.iterdir():
            m = EXPERIMENT_DIR.match(p.name)
            if m and p.is_dir() and (model is None or m[2] == experiment_name(model, transport)):
                found.append((int(m[1]), p / "checkpoints"))
    return [d for _, d in sorted(found, reverse=True)] + [results / "checkpoints"]


def objective_mismatch(path, ckpt: dict, objective: dict | None) -> str:
    """"" when the checkpoint was trained with `objective` (objective_of; None: not checked), else why not."""
    if objective is None:
        return ""
    theirs = objective_of(ckpt.get("args") or {})
    if theirs == objective:
        return ""
    diff = ", ".join(f"{k} {theirs.get(k)!r} (this run: {objective.get(k)!r})"
                     for k in objective if theirs.get(k) != objective.get(k))
    return (f"{path} was trained with another objective: {diff}; resume with the checkpoint's settings, "
            "or start a new run without --resume")


def find_resume_checkpoint(spec: str, search, device, say, model=None, objective=None) -> tuple[Path, dict] | None:
    """The checkpoint --resume names: a file, or the newest that loads (and fits `model`, when given) in a
    directory; "auto": in the checkpoint directories `search` (a list, newest first, or one directory).
    With `objective` (objective_of), a checkpoint trained with another objective is refused (a file) or
    its directory skipped, saying why."""
    dirs = [Path(search)] if isinstance(search, (str, os.PathLike)) else [Path(d) for d in search]
    if spec != "auto":
        path = Path(spec)
        if path.is_file():
            try:
                ckpt = load_training_checkpoint(path, map_location=device, model=model)
            except (ValueError, UnsafeCheckpointError) as e:
                raise SystemExit(f"--resume: {e}") from None
            why = objective_mismatch(path, ckpt, objective)
            if why:
                raise SystemExit(f"--resume: {why}")
            return path, ckpt
        if not path.is_dir():
            raise SystemExit(f"--resume: {spec} is neither a checkpoint file nor a directory")
        if any(path.glob("*.pt")):
            dirs = [path]
        elif any(EXPERIMENT_DIR.match(p.name) for p in path.iterdir()):  # a results directory
            dirs = experiment_checkpoint_dirs(path, None)  # every model's: those of another config are skipped
        else:  # an experiment directory (or a legacy results directory)
            dirs = [path / "checkpoints" if (path / "checkpoints").is_dir() else path]
    existing = [d for d in dirs if d.is_dir()]
    if spec == "auto" and not existing:
        say(f"--resume auto: no checkpoints in {', '.join(map(str, dirs))} yet, starting from step 0")
        return None
    other_objective = []
    for directory in existing:
        found, ckpt, skipped = newest_training_checkpoint(directory, map_location=device, model=model)
        for bad, why in skipped:
            say(f"--resume: skipping {bad}: {why}")
        if found is not None:
            why = objective_mismatch(found, ckpt, objective)
            if not why:
                return found, ckpt
            say(f"--resume: skipping {directory}: {why}")  # one run's directory: one objective
            other_objective.append(why)
    where = ", ".join(map(str, existing or dirs))
    if spec == "auto":
        say(f"--resume auto: no loadable checkpoint in {where}, starting from step 0")
        return None
    raise SystemExit(f"--resume: no loadable checkpoint (STEP.pt) in {where}"
                     + (f" ({other_objective[0]})" if other_objective else ""))


def resume_on_every_rank(spec: str, search, device, say, rank: int, broadcast, all_ok, model=None, objective=None):
    """find_resume_checkpoint decided once, by rank 0, and loaded by every rank from that same path.

    Ranks that each listed the directory could pick different checkpoints (a file still being copied in,
    a stale network-filesystem cache) and train on from different states without a word. broadcast(obj)
    returns rank 0's obj on every rank; all_ok(flag) is True when every rank's flag is. A rank that cannot
    load the chosen file stops every rank, with the reason."""
    decision, found, why = None, None, ""
    if rank == 0:
        try:
            found = find_resume_checkpoint(spec, search, device, say, model, objective)
            decision = ("path", None if found is None else str(found[0]))
        except SystemExit as e:
            decision = ("error", str(e))
    kind, value = broadcast(decision)
    if kind == "error":
        raise SystemExit(value)
    if rank != 0 and value is not None:
        try:
            found = Path(value), load_training_checkpoint(Path(value), map_location=device, model=model)
        except (OSError, ValueError, UnsafeCheckpointError) as e:
            why = f"{type(e).__name__}: {e}"
    if not all_ok(value is None or found is not None):
        where = f" (rank {rank}: {why})" if why else ""
        raise SystemExit(f"--resume: rank 0 chose {value}, which not every rank could load{where}")
    return found


def _collectives(device):
    """(broadcast, all_ok) over the default process group, for resume_on_every_rank."""
    def broadcast(obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_ok(flag: bool) -> bool:
        t = torch.tensor([1 if flag else 0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    return broadcast, all_ok


def apply_optimizer_settings(opt: torch.optim.Optimizer, settings: dict) -> list[str]:
    """Set each given (not None) hyperparameter on every param group; the changes, as text."""
    changes = []
    for name, value in settings.items():
        if value is None:
            continue
        # tuple(): betas restored from a checkpoint may be a list
        before = sorted({tuple(g[name]) if isinstance(g[name], list) else g[name] for g in opt.param_groups})
        for group in opt.param_groups:
            group[name] = value
        if before != [value]:
            changes.append(f"{name} {', '.join(map(str, before))} -> {value}")
    return changes


# -- training --------------------------------------------------------------------------------------


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def grad_norm(model: torch.nn.Module) -> torch.Tensor:
    """The L2 norm of all gradients: non-finite when any gradient is (one fused pass, no host sync)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(grads)]))


def plain_args(args: argparse.Namespace) -> dict:
    """The arguments as a dict of primitives, so checkpoints load with torch.load(weights_only=True)."""
    return {k: v for k, v in vars(args).items() if v is None or isinstance(v, (bool, int, float, str))}


def build_model(args, device) -> torch.nn.Module:
    overrides = {k: v for k, v in (("depth", args.depth), ("hidden_size", args.hidden_size),
                                   ("num_heads", args.num_heads)) if v}
    if is_lightning(args.model):
        from dit_fast.configs import LIGHTNING_CONFIGS
        from dit_fast.models import LightningDiT

        depth, hidden, patch, heads = LIGHTNING_CONFIGS[args.model]
        config = dict(depth=depth, hidden_size=hidden, patch_size=patch, num_heads=heads) | overrides
        model = LightningDiT(input_size=args.image_size // args.downsample_ratio, num_classes=args.num_classes,
                             in_channels=args.in_channels, **config,
                             **{k: getattr(args, k) for k in LIGHTNING_MODEL_OPTIONS},
                             backend=args.backend, attn_backend=args.attn_backend,
                             checkpoint_every=args.checkpoint_every)
    elif overrides:
        from dit_fast.models import DiT, SiT
        from dit_fast.reference import CONFIGS

        depth, hidden, patch, heads = CONFIGS["DiT-" + args.model.split("-", 1)[1]]
        config = dict(depth=depth, hidden_size=hidden, patch_size=patch, num_heads=heads) | overrides
        cls = SiT if is_sit(args.model) else DiT
        model = cls(input_size=args.image_size // args.downsample_ratio, num_classes=args.num_classes,
                    in_channels=args.in_channels, **config,
                    backend=args.backend, attn_backend=args.attn_backend, checkpoint_every=args.checkpoint_every)
    else:
        table = SiT_models if is_sit(args.model) else DiT_models
        model = table[args.model](
            input_size=args.image_size // args.downsample_ratio, num_classes=args.num_classes,
            in_channels=args.in_channels,
            backend=args.backend, attn_backend=args.attn_backend, checkpoint_every=args.checkpoint_every,
        )
    return model.to(device)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.image_size % args.downsample_ratio:
        raise SystemExit(f"--image-size must be a multiple of {args.downsample_ratio} (--downsample-ratio, the "
                         f"VAE's factor), got {args.image_size}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    say = print if rank == 0 else (lambda *a, **k: None)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.global_batch_size % world:
        raise SystemExit(f"--global-batch-size {args.global_batch_size} must be divisible by the {world} ranks")
    local_batch = args.global_batch_size // world
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = build_model(args, device)
    data = open_data(args, model)  # validated before any training or resuming
    stats = open_latent_stats(args, model)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    recipe = FAMILY_RECIPES[family(args.model)]
    optimizer_settings = {"lr": args.lr, "weight_decay": args.weight_decay,
                          "betas": None if args.beta2 is None else (ADAM_BETA1, args.beta2)}
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"],
                            betas=(ADAM_BETA1, recipe["beta2"]))
    apply_optimizer_settings(opt, optimizer_settings)
    if rank == 0:  # temporaries of saves killed mid-write (SIGKILL), whose writer is gone
        for directory in experiment_checkpoint_dirs(args.results_dir, None):
            for stale in remove_stale_temporaries(directory):
                say(f"removed {stale}, left by a save that was killed")
    search = experiment_checkpoint_dirs(args.results_dir, args.model, transport_of(args))
    objective = objective_of(args)
    step = 0
    resumed = None
    if args.resume and world > 1:  # one choice for all ranks (see resume_on_every_rank)
        resumed = resume_on_every_rank(args.resume, search, device, say, rank, *_collectives(device), model=model,
                                       objective=objective)
    elif args.resume:
        resumed = find_resume_checkpoint(args.resume, search, device, say, model, objective)
    if resumed is not None:
        path, ckpt = resumed
        model.load_state_dict(ckpt["model"])  # fits: load_training_checkpoint checked it against the model
        ema.load_state_dict(ckpt["ema"])
        try:
            opt.load_state_dict(ckpt["opt"])  # restores the checkpoint's lr / weight decay ...
        except (ValueError, KeyError, RuntimeError) as e:
            raise SystemExit(f"--resume: {path}: its optimizer state does not fit this model's: {e}") from None
        step = int(ckpt["step"])
        say(f"resuming from {path} (step {step})")
        for change in apply_optimizer_settings(opt, optimizer_settings):  # ... unless given on the command line
            say(f"--resume: optimizer {change} (from the command line)")
    for name in RECIPE_OPTIMIZER:  # the checkpoints record the values in use
        setattr(args, name, opt.param_groups[0][name])
    args.beta2 = float(opt.param_groups[0]["betas"][1])

    train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    if args.compile:
        train_model = torch.compile(train_model)
    diffusion = create_objective(args)  # DiT: the 1000-step diffusion; SiT: the transport
    amp_dtype = AUTOCAST[args.precision]
    ckpt_dir = None
    if rank == 0:  # after the resume choice, so that this run's own (empty) directory is never a candidate
        experiment_dir = create_experiment_dir(args.results_dir, args.model, transport_of(args))
        ckpt_dir = experiment_dir / "checkpoints"
        ckpt_dir.mkdir()
        say(f"experiment directory: {experiment_dir}")
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        say(f"{args.model}: {n_params / 1e6:.1f}M params, {world} rank(s) x batch {local_batch}, "
            f"{device}, {args.precision}")
        say("objective: " + ", ".join(f"{k}={v}" for k, v in objective.items()))
        say(f"AdamW lr {args.lr:g}, weight decay {args.weight_decay:g}, betas ({ADAM_BETA1}, {args.beta2:g}), "
            f"gradient clipping {'off' if args.max_grad_norm is None else f'at norm {args.max_grad_norm:g}'}"
            + ("" if stats is None else f"; latents normalized by {args.latent_stats} (x{args.latent_multiplier:g})"))

    def save(step: int) -> Path:
        path = ckpt_dir / f"{step:07d}.pt"
        state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                 "args": plain_args(args), "step": step}
        torch_save_atomic(state, path)  # the previous checkpoints stay whole until this one is
        return path

    progress = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=args.max_steps, initial=step, unit="step", dynamic_ncols=True)
    losses: list[float] = []
    running, t0, images = 0.0, time.perf_counter(), 0
    train_model.train()
    saved = None  # the checkpoint this run wrote last
    last_good = resumed[0] if resumed is not None else "none (no checkpoint written or resumed)"
    try:
        while step < args.max_steps:
            # Every random draw of a step is a function of (seed, step, rank): a resumed run repeats it exactly.
            gen = torch.Generator(device).manual_seed(args.seed * 1_000_003 + step * world + rank)
            # Label dropout inside the model, and a SiT transport's x0 and t (NumPy's for the logit-normal t), from
            # a stream of their own: seeded like `gen`, the transport's x0 = randn_like(x) would equal the
            # synthetic latents x drawn from `gen` (a velocity target of zero).
            streams = np.random.SeedSequence([args.seed % 2**64, step, rank, 1])
            global_seed = int(streams.generate_state(1, np.uint64)[0])
            torch.manual_seed(global_seed)
            np.random.seed(global_seed % 2**32)
            if args.data:
                order = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
                idx = torch.randint(0, len(data), (args.global_batch_size,), generator=order).numpy()
                mine = slice(rank * local_batch, (rank + 1) * local_batch)
                # Shards with the mirrored images' latents (LightningDiT's): each row one of the two, as published.
                flip = (torch.rand(args.global_batch_size, generator=order) < 0.5).numpy() if data.has_flips else None
                try:
                    x, y = data.batch_at(idx[mine], device, None if flip is None else flip[mine])
                except InvalidShardError as e:
                    raise SystemExit(f"step {step + 1}: --data: {e}; the last good checkpoint is {last_good}") from None
            else:
                x, y = data.batch(local_batch, gen, device)
            if stats is not None:
                x = stats.normalize(x)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = training_loss(train_model, diffusion, x, y, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # One host sync per step: the loss to log and the check that nothing non-finite reaches the weights.
            health = torch.stack([loss.detach().float(), grad_norm(model).to(loss.device)])
            if world > 1:
                dist.all_reduce(health)
                health /= world
            loss_value, norm_value = health.tolist()
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                raise SystemExit(
                    f"step {step + 1}: the loss is {loss_value} and the gradient norm {norm_value}; stopped before "
                    f"updating the weights and the EMA. The last good checkpoint is {last_good}. Likely causes: "
                    "non-finite latents (--check-data all), a learning rate too high, fp16 overflow (--precision bf16)."
                )
            if args.max_grad_norm is not None:  # as the published train.py clips (accelerate: torch's)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            opt.step()
            update_ema(ema, model, args.ema_decay)
            step += 1
            images += args.global_batch_size
            losses.append(loss_value)
            running += loss_value
            if progress is not None:
                elapsed = time.perf_counter() - t0
                progress.update(1)
                progress.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{images / max(elapsed, 1e-9):.1f}")
            if step % args.log_every == 0 and rank == 0 and progress is None:
                elapsed = time.perf_counter() - t0
                say(f"step {step}: loss {running / args.log_every:.4f}, {images / elapsed:.1f} images/s")
                running = 0.0
            if step % args.ckpt_every == 0 or step == args.max_steps:
                if rank == 0:
                    saved = last_good = save(step)
                if world > 1:
                    dist.barrier()
    finally:
        if progress is not None:
            progress.close()
    if world > 1:
        dist.barrier()  # gloo ranks can abort at exit without it
        dist.destroy_process_group()
    return {"step": step, "losses": losses, "checkpoint": str(saved) if saved else None,
            "experiment_dir": str(ckpt_dir.parent) if ckpt_dir is not None else None}


if __name__ == "__main__":
    main()
