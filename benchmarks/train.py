"""Train a fast DiT with the published recipe, on synthetic or pre-extracted VAE latents.

Recipe (Peebles & Xie): AdamW, lr 1e-4, weight decay 0, global batch 256, EMA of the weights
with decay 0.9999 updated every step; here with bf16 autocast. The loss is the DDPM
noise-prediction MSE (linear betas 1e-4..0.02 over 1000 steps). The published run also trains the
learned variance with a variational-bound term from its diffusion library; that term is left out,
so the sigma half of the output channels gets no gradient.

    python benchmarks/train.py --model DiT-XL/2                       # one GPU (or CPU), synthetic latents
    torchrun --nproc_per_node=8 benchmarks/train.py --data /latents   # DDP, global batch split over ranks

--data: a directory of latent shards, used as-is (scale them as the sampler expects, e.g. x0.18215):
  *.pt   dicts {"latents": [N, C, H, W], "labels": [N]} (read with torch.load(weights_only=True));
  *.npy  latents [N, C, H, W] with labels in a sibling NAME.labels.npy (memory-mapped).
Checkpoints ({"model", "ema", "opt", "args", "step"}, all weights_only-loadable) go to
RESULTS/checkpoints/STEP.pt every --ckpt-every steps and at the end; --resume PATH continues one;
dit_fast.checkpoint.load_checkpoint(model, PATH) reads its EMA weights.
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from dit_fast import DiT_models

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="DiT-XL/2", choices=sorted(DiT_models))
    p.add_argument("--image-size", type=int, default=256, help="pixels; latents are image-size/8 (the SD VAE)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--depth", type=int, default=None, help="override the config's depth (small test models)")
    p.add_argument("--hidden-size", type=int, default=None, help="override the config's hidden size")
    p.add_argument("--num-heads", type=int, default=None, help="override the config's number of heads")
    p.add_argument("--data", default=None, help="directory of latent shards (default: synthetic latents)")
    p.add_argument("--global-batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--max-steps", type=int, default=400_000)
    p.add_argument("--precision", choices=sorted(AUTOCAST), default="bf16", help="autocast dtype (weights stay fp32)")
    p.add_argument("--backend", default="auto", help="fused-op kernels: auto | triton | ext | torch")
    p.add_argument("--attn-backend", default="auto", help="attention: auto | flash_attn_3 | flash_attn_4 | flash_attn | sdpa | math")
    p.add_argument("--checkpoint-every", type=int, default=0, help="activation checkpointing: every k-th block (0 = off)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--ckpt-every", type=int, default=50_000)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--resume", default=None, help="checkpoint .pt to continue from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p.parse_args(argv)


# -- diffusion -------------------------------------------------------------------------------------


class LinearDDPM:
    """The DDPM forward process with linear betas; the training target is the added noise."""

    def __init__(self, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, device="cpu"):
        betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.num_steps = num_steps
        self.sqrt_ac = alphas_cumprod.sqrt().float().to(device)
        self.sqrt_1m_ac = (1.0 - alphas_cumprod).sqrt().float().to(device)

    def loss(self, model, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        t = torch.randint(0, self.num_steps, (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        x_t = self.sqrt_ac[t].view(-1, 1, 1, 1) * x0 + self.sqrt_1m_ac[t].view(-1, 1, 1, 1) * noise
        eps = model(x_t, t, y)[:, : x0.shape[1]]  # learn_sigma: the first C channels are the noise
        return F.mse_loss(eps.float(), noise)


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


class LatentShards:
    """Pre-extracted latents from a directory of .pt / .npy shards (see the module docstring)."""

    def __init__(self, directory: str):
        root = Path(directory)
        latents, labels = [], []
        for path in sorted(root.glob("*.pt")):
            shard = torch.load(path, map_location="cpu", weights_only=True)
            latents.append(np.asarray(shard["latents"].float()))
            labels.append(np.asarray(shard["labels"].long()))
        for path in sorted(p for p in root.glob("*.npy") if not p.name.endswith(".labels.npy")):
            label_path = path.with_name(path.stem + ".labels.npy")
            if not label_path.exists():
                raise FileNotFoundError(f"{path} has no labels file {label_path.name}")
            latents.append(np.load(path, mmap_mode="r"))
            labels.append(np.load(label_path))
        if not latents:
            raise FileNotFoundError(f"--data {directory}: no *.pt or *.npy latent shards found")
        self.shards = latents
        self.labels = np.concatenate(labels).astype(np.int64)
        self.offsets = np.cumsum([0] + [len(s) for s in latents])
        self.shape = tuple(latents[0].shape[1:])
        if any(tuple(s.shape[1:]) != self.shape for s in latents):
            raise ValueError(f"--data {directory}: latent shards have different shapes")
        if len(self.labels) != self.offsets[-1]:
            raise ValueError(f"--data {directory}: {self.offsets[-1]} latents but {len(self.labels)} labels")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def batch_at(self, indices: np.ndarray, device):
        rows = []
        for i in indices:
            s = int(np.searchsorted(self.offsets, i, side="right") - 1)
            rows.append(np.asarray(self.shards[s][i - self.offsets[s]], dtype=np.float32))
        x = torch.from_numpy(np.stack(rows)).to(device)
        return x, torch.from_numpy(self.labels[indices]).to(device)


# -- training --------------------------------------------------------------------------------------


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def plain_args(args: argparse.Namespace) -> dict:
    """The arguments as a dict of primitives, so checkpoints load with torch.load(weights_only=True)."""
    return {k: v for k, v in vars(args).items() if v is None or isinstance(v, (bool, int, float, str))}


def build_model(args, device) -> torch.nn.Module:
    overrides = {k: v for k, v in (("depth", args.depth), ("hidden_size", args.hidden_size), ("num_heads", args.num_heads)) if v}
    if overrides:
        from dit_fast.models import DiT
        from dit_fast.reference import CONFIGS

        depth, hidden, patch, heads = CONFIGS[args.model]
        config = dict(depth=depth, hidden_size=hidden, patch_size=patch, num_heads=heads) | overrides
        model = DiT(input_size=args.image_size // 8, num_classes=args.num_classes, **config,
                    backend=args.backend, attn_backend=args.attn_backend, checkpoint_every=args.checkpoint_every)
    else:
        model = DiT_models[args.model](
            input_size=args.image_size // 8, num_classes=args.num_classes,
            backend=args.backend, attn_backend=args.attn_backend, checkpoint_every=args.checkpoint_every,
        )
    return model.to(device)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.image_size % 8:
        raise SystemExit(f"--image-size must be a multiple of 8 (the VAE's factor), got {args.image_size}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
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
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    step = 0
    if args.resume:
        ckpt = torch.load(args.resume, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        step = int(ckpt["step"])

    train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    if args.compile:
        train_model = torch.compile(train_model)
    diffusion = LinearDDPM(device=device)
    data = LatentShards(args.data) if args.data else SyntheticLatents(4, args.image_size // 8, args.num_classes)
    if args.data and data.shape != (4, args.image_size // 8, args.image_size // 8):
        raise SystemExit(f"--data latents have shape {data.shape}, the model expects {(4, args.image_size // 8, args.image_size // 8)}")
    amp_dtype = AUTOCAST[args.precision]
    ckpt_dir = Path(args.results_dir) / "checkpoints"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{args.model}: {n_params / 1e6:.1f}M params, {world} rank(s) x batch {local_batch}, {device}, {args.precision}")

    def save(step: int) -> Path:
        path = ckpt_dir / f"{step:07d}.pt"
        state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                 "args": plain_args(args), "step": step}
        torch.save(state, path)
        return path

    progress = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=args.max_steps, initial=step, unit="step", dynamic_ncols=True)
    losses: list[float] = []
    running, t0, images = 0.0, time.perf_counter(), 0
    train_model.train()
    saved = None
    while step < args.max_steps:
        # Every random draw of a step is a function of (seed, step, rank): a resumed run repeats it exactly.
        gen = torch.Generator(device).manual_seed(args.seed * 1_000_003 + step * world + rank)
        torch.manual_seed(args.seed * 1_000_003 + step * world + rank)  # label dropout inside the model
        if args.data:
            order = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
            idx = torch.randint(0, len(data), (args.global_batch_size,), generator=order).numpy()
            x, y = data.batch_at(idx[rank * local_batch : (rank + 1) * local_batch], device)
        else:
            x, y = data.batch(local_batch, gen, device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = diffusion.loss(train_model, x, y, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_ema(ema, model, args.ema_decay)
        step += 1
        images += args.global_batch_size
        loss_value = loss.detach()
        if world > 1:
            dist.all_reduce(loss_value)
            loss_value /= world
        losses.append(float(loss_value))
        running += losses[-1]
        if progress is not None:
            elapsed = time.perf_counter() - t0
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{images / max(elapsed, 1e-9):.1f}")
        if step % args.log_every == 0 and rank == 0 and progress is None:
            elapsed = time.perf_counter() - t0
            print(f"step {step}: loss {running / args.log_every:.4f}, {images / elapsed:.1f} images/s")
            running = 0.0
        if step % args.ckpt_every == 0 or step == args.max_steps:
            if rank == 0:
                saved = save(step)
            if world > 1:
                dist.barrier()
    if progress is not None:
        progress.close()
    if world > 1:
        dist.barrier()  # gloo ranks can abort at exit without it
        dist.destroy_process_group()
    return {"step": step, "losses": losses, "checkpoint": str(saved) if saved else None}


if __name__ == "__main__":
    main()
