"""`dit-fast sample`: class-conditional samples from a DiT, as a PNG grid and an FID-ready .npz.

    dit-fast sample --model DiT-XL/2 --ckpt DiT-XL-2-256x256.pt --vae ema --out samples/
    torchrun --nproc_per_node=8 -m dit_fast sample --ckpt ... --num-samples 50000 --out fid50k/

The sample set is cut into batches of --batch-size; batch j is sampled with seed --seed + j (so the
result does not depend on the number of ranks), by rank j mod WORLD_SIZE, and written atomically to
OUT/shards/batch_JJJJJJ.npz. A rerun with the same arguments skips the batches already on disk
(resume). When every batch exists, rank 0 writes OUT/samples.npz (arr_0: uint8 [N, H, W, 3], the
layout of the ADM / guided-diffusion FID suite; labels: [N]) and OUT/grid.png. With --vae none the
latents are kept: OUT/latents.npz (arr_0: float32 [N, C, h, w]).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os

import numpy as np
import torch

from .atomic import atomic_write, write_text

# The labels of the published sample.py (a demo grid).
DEMO_LABELS = (207, 360, 387, 974, 88, 979, 417, 279)
LATENT_SCALE = 0.18215  # the SD VAE's latent scaling used by DiT


def _labels_arg(text: str) -> list[int]:
    try:
        labels = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class labels like 207,360, got {text!r}") from None
    if not labels:
        raise argparse.ArgumentTypeError("expected at least one class label")
    return labels


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .reference import CONFIGS

    p = parser
    p.add_argument("--model", default="DiT-XL/2", choices=list(CONFIGS), help="DiT config")
    w = p.add_mutually_exclusive_group(required=True)
    w.add_argument("--ckpt", default=None,
                   help="weights: .pt (official, or a training checkpoint's EMA) or .safetensors")
    w.add_argument("--random-init", action="store_true", help="random weights (a demo; the samples are noise-like)")
    p.add_argument("--image-size", type=int, default=256, help="pixels; latents are image-size / the VAE's factor (8)")
    p.add_argument("--num-classes", type=_positive, default=1000)
    p.add_argument("--num-steps", type=_positive, default=250, help="sampling steps (respaced from 1000)")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance; <= 1 turns it off")
    p.add_argument("--guide-all-channels", action="store_true", help="guide all latent channels (published: 3)")
    p.add_argument("--class-labels", type=_labels_arg, default=None,
                   help="comma list, repeated to --num-samples (default: the published demo labels, or uniform "
                        "random labels when --num-samples is given)")
    p.add_argument("--num-samples", type=_positive, default=None, help="total samples over all ranks (FID: 50000)")
    p.add_argument("--batch-size", type=_positive, default=32, help="samples per batch (the CFG batch is twice this)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--vae", default="ema",
                   help="diffusers AutoencoderKL: a local directory, a Hugging Face cache name, 'ema'/'mse' "
                        "(stabilityai/sd-vae-ft-*), or 'none' to keep latents; never downloaded")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--device", default=None,
                   help="cuda | cpu (default: cuda when available; cuda:LOCAL_RANK under torchrun)")
    p.add_argument("--backend", default="auto", help="dit_fast kernel backend")
    p.add_argument("--no-cuda-graph", action="store_true", help="run the steps eagerly on CUDA")
    p.add_argument("--grid-size", type=int, default=64, help="samples in grid.png (0: no grid)")
    p.add_argument("--depth", type=_positive, default=None, help="override the config's depth (small test models)")
    p.add_argument("--hidden-size", type=_positive, default=None, help="override the config's hidden size")
    p.add_argument("--num-heads", type=_positive, default=None, help="override the config's number of heads")
    p.add_argument("--no-progress", action="store_true")


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


def vae_factor(vae) -> int:
    return 8 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)


def decode_to_uint8(vae, latents: torch.Tensor) -> np.ndarray:
    """[N, C, h, w] latents -> uint8 [N, H, W, 3] images, as the published sample_ddp.py converts them."""
    images = vae.decode(latents.to(vae.dtype) / LATENT_SCALE).sample.float()
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


def build_model(args, latent_size: int, device):
    from .checkpoint import load_checkpoint
    from .models import DiT
    from .reference import CONFIGS
    from .testing import randomize_weights_

    depth, hidden, patch, heads = CONFIGS[args.model]
    model = DiT(input_size=latent_size, patch_size=patch, num_classes=args.num_classes, backend=args.backend,
                depth=args.depth or depth, hidden_size=args.hidden_size or hidden, num_heads=args.num_heads or heads)
    if args.ckpt:
        load_checkpoint(model, args.ckpt)
    else:
        randomize_weights_(model, torch.Generator().manual_seed(args.seed))
    return model.to(device).eval()


def _run_config(args, labels) -> dict:
    keys = ("model", "ckpt", "random_init", "image_size", "num_classes", "num_steps", "cfg_scale",
            "guide_all_channels", "batch_size", "seed", "sampler", "eta", "vae", "depth", "hidden_size", "num_heads")
    return {k: getattr(args, k) for k in keys} | {"labels_sha": _digest(labels)}


def _digest(a: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


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
    labels = all_labels(args)
    if ((labels < 0) | (labels >= args.num_classes)).any():
        raise SystemExit(f"--class-labels must lie in [0, {args.num_classes - 1}], got {sorted(set(labels.tolist()))}")

    # A resumed run must be the same run: refuse to mix shards of different settings.
    config = _run_config(args, labels)
    config_path = os.path.join(out, "run.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            old = json.load(f)
        if old != json.loads(json.dumps(config)):
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise SystemExit(f"--out {out} holds a run with other settings ({', '.join(diff)}); use another --out")
    elif rank == 0:
        write_text(config_path, json.dumps(config, indent=1) + "\n")

    vae = load_vae(args.vae, device)
    factor = vae_factor(vae)
    if args.image_size % factor:
        raise SystemExit(f"--image-size must be a multiple of the VAE's factor {factor}, got {args.image_size}")
    model = build_model(args, args.image_size // factor, device)

    n_batches = math.ceil(len(labels) / args.batch_size)
    mine = [j for j in range(rank, n_batches, world)]
    todo = [j for j in mine if not os.path.exists(_shard_path(shard_dir, j))]
    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"batches (rank 0 of {world})")
    for j in todo:
        y = labels[j * args.batch_size: (j + 1) * args.batch_size]
        gen = torch.Generator(device).manual_seed(args.seed + j)
        with torch.inference_mode():
            z = sample(model, torch.from_numpy(y), num_steps=args.num_steps, cfg_scale=args.cfg_scale,
                       sampler=args.sampler, generator=gen, cuda_graph=not args.no_cuda_graph, eta=args.eta,
                       guide_all_channels=args.guide_all_channels, backend=args.backend)
            arr = z.float().cpu().numpy() if vae is None else decode_to_uint8(vae, z)
        _save_npz(_shard_path(shard_dir, j), arr_0=arr, labels=y)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()

    _barrier(world)
    if rank == 0:
        _merge(out, shard_dir, n_batches, vae is None, args.grid_size)
    _barrier(world)
    return 0


def _shard_path(shard_dir: str, j: int) -> str:
    return os.path.join(shard_dir, f"batch_{j:06d}.npz")


def _merge(out: str, shard_dir: str, n_batches: int, latents: bool, grid_size: int) -> None:
    missing = [j for j in range(n_batches) if not os.path.exists(_shard_path(shard_dir, j))]
    if missing:
        raise SystemExit(f"{len(missing)} of {n_batches} batches are missing (first: {missing[0]}); rerun to resume")
    arrays, labels = [], []
    for j in range(n_batches):
        with np.load(_shard_path(shard_dir, j), allow_pickle=False) as z:
            arrays.append(z["arr_0"])
            labels.append(z["labels"])
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
