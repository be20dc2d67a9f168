"""Turn an image folder into VAE-latent shards for benchmarks/train.py --data.

    python benchmarks/extract_latents.py --data /imagenet/train --out /latents --vae ema --image-size 256
    torchrun --nproc_per_node=8 benchmarks/extract_latents.py ...      # each rank takes every WORLD-th image

Layout in: DATA/<class name>/<image files>; labels are the class folders' indices in sorted name order
(as torchvision's ImageFolder numbers them); OUT/classes.json records the mapping.
Per image, as the published DiT training pipeline does: ADM center crop (halve with a box filter while
the short side is >= 2x the size, bicubic resize of the short side to the size, center crop), random
horizontal flip (p = 0.5, seeded), scale to [-1, 1]; then latents = vae.encode(x).latent_dist.sample()
* 0.18215. Note that the flip (and the posterior sample) is drawn once here, where the published
training applies them afresh every epoch.

Out: OUT/latents_rRR_KKKKK.pt, dicts {"latents": float32 [N, C, h, w], "labels": int64 [N]} written
atomically with torch.save (train.py and dit_fast.data read them with torch.load(weights_only=True)).

LightningDiT trains on unscaled latents normalized per channel (its VA-VAE as a diffusers
AutoencoderKL: --latent-scale 1): --latent-stats also writes OUT/latents_stats.pt, the published
file ({"mean": [1, C, 1, 1], "std": [1, C, 1, 1]}, computed as the published code does:
dit_fast.data.compute_latent_stats) that train.py --latent-stats reads. Under torchrun, run
`extract_latents.py --stats-only --out OUT` once every rank has finished.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LATENT_SCALE = 0.18215


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="image folder: one subfolder per class (required unless --stats-only)")
    p.add_argument("--out", required=True, help="output directory for the latent shards")
    p.add_argument("--vae", default="ema",
                   help="AutoencoderKL: local dir, HF cache name, 'ema' or 'mse'; never downloaded")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE call")
    p.add_argument("--shard-size", type=int, default=4096, help="samples per shard file")
    p.add_argument("--seed", type=int, default=0, help="seeds the flips and the posterior samples")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flip")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--latent-scale", type=float, default=LATENT_SCALE,
                   help="latents = sample * this (SD VAE for DiT/SiT: 0.18215; LightningDiT's VA-VAE: 1)")
    p.add_argument("--latent-stats", action="store_true",
                   help="also write OUT/latents_stats.pt (per-channel mean/std, LightningDiT's latent norm)")
    p.add_argument("--stats-only", action="store_true",
                   help="only write OUT/latents_stats.pt from the shards already in OUT")
    args = p.parse_args(argv)
    if args.data is None and not args.stats_only:
        p.error("--data is required (unless --stats-only)")
    if not (np.isfinite(args.latent_scale) and args.latent_scale > 0):
        p.error(f"--latent-scale must be a finite number > 0, got {args.latent_scale}")
    for name in ("image_size", "batch_size", "shard_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    return args


def list_images(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """(path, label) pairs in a fixed order, and the sorted class names."""
    if not root.is_dir():
        raise SystemExit(f"--data must be a directory of class subfolders, got {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise SystemExit(f"--data {root}: no class subfolders found")
    items = []
    for label, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                items.append((f, label))
    if not items:
        raise SystemExit(f"--data {root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the class subfolders")
    return items, classes


def center_crop_arr(pil_image, image_size: int) -> np.ndarray:
    """ADM's center crop: uint8 [image_size, image_size, 3]."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size]


def load_image(path: Path, image_size: int, flip: bool) -> torch.Tensor:
    """float32 [3, S, S] in [-1, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        arr = center_crop_arr(im.convert("RGB"), image_size)
    if flip:
        arr = arr[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div(127.5).sub(1.0)


def load_vae(name: str, device):
    from dit_fast.sample_cli import load_vae as _load

    if name == "none":
        raise SystemExit("--vae none: extracting latents needs a VAE")
    return _load(name, device)


@torch.no_grad()
def extract(args) -> int:
    from dit_fast.checkpoint import torch_save_atomic

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1 and args.device is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    items, classes = list_images(Path(args.data))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from dit_fast.atomic import remove_stale_temporaries

    remove_stale_temporaries(out)  # shards of an earlier run killed mid-save (SIGKILL), whose writer is gone
    if rank == 0:
        from dit_fast.atomic import write_text

        write_text(out / "classes.json", json.dumps(classes, indent=1) + "\n")
    vae = load_vae(args.vae, device)

    # One generator for the flips (the same decisions on every rank count), one for the posterior draws.
    flips = torch.rand(len(items), generator=torch.Generator().manual_seed(args.seed)) < 0.5
    if args.no_flip:
        flips[:] = False
    gen = torch.Generator(device).manual_seed(args.seed * 1000 + rank)
    mine = list(range(rank, len(items), world))
    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), desc="images")
    pending_lat, pending_lab, shard = [], [], 0

    def flush():
        nonlocal pending_lat, pending_lab, shard
        if pending_lat:
            data = {"latents": torch.cat(pending_lat), "labels": torch.cat(pending_lab)}
            torch_save_atomic(data, out / f"latents_r{rank:02d}_{shard:05d}.pt")
            shard += 1
        pending_lat, pending_lab = [], []

    for start in range(0, len(mine), args.batch_size):
        idx = mine[start: start + args.batch_size]
        x = torch.stack([load_image(items[i][0], args.image_size, bool(flips[i])) for i in idx]).to(device)
        posterior = vae.encode(x.to(vae.dtype)).latent_dist
        # latent_dist.sample(generator=...) draws mean + std * randn, seeded here for reproducibility
        z = posterior.sample(generator=gen).float() * args.latent_scale
        pending_lat.append(z.cpu())
        pending_lab.append(torch.tensor([items[i][1] for i in idx], dtype=torch.int64))
        if sum(len(t) for t in pending_lab) >= args.shard_size:
            flush()
        if bar is not None:
            bar.update(len(idx))
    flush()
    if bar is not None:
        bar.close()
    print(f"rank {rank}: {len(mine)} images of {len(classes)} classes -> {shard} shard(s) in {out}", file=sys.stderr)
    if args.latent_stats:
        if world > 1:
            print(f"--latent-stats: {world} ranks write shards; once all have finished, run "
                  f"extract_latents.py --stats-only --out {out}", file=sys.stderr)
        else:
            write_latent_stats(out)
    return 0


def write_latent_stats(out: Path) -> Path:
    """OUT/latents_stats.pt from the shards in OUT (their shape read off the first shard, the classes off
    classes.json), written atomically."""
    from dit_fast.data import STATS_FILE_NAME, InvalidShardError, LatentShards, compute_latent_stats

    shards = sorted(p for p in out.glob("*.pt") if p.name != STATS_FILE_NAME)
    if not shards:
        raise SystemExit(f"--latent-stats: no latent shards (*.pt) in {out}")
    if not (out / "classes.json").is_file():
        raise SystemExit(f"--latent-stats: {out / 'classes.json'} is missing (the extraction writes it)")
    num_classes = len(json.loads((out / "classes.json").read_text()))
    first = torch.load(shards[0], map_location="cpu", weights_only=True)
    if not (isinstance(first, dict) and isinstance(first.get("latents"), torch.Tensor) and first["latents"].dim() == 4):
        raise SystemExit(f"--latent-stats: {shards[0]} is not a latent shard")
    try:
        data = LatentShards(out, latent_shape=tuple(first["latents"].shape[1:]), num_classes=num_classes)
    except (InvalidShardError, FileNotFoundError) as e:
        raise SystemExit(f"--latent-stats: {e}") from None
    stats = compute_latent_stats(data)
    path = out / STATS_FILE_NAME
    stats.save(path)
    print(f"wrote {path}: mean and std of {stats.channels} channels over {min(len(data), 10_000)} latents",
          file=sys.stderr)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.stats_only:
        write_latent_stats(Path(args.out))
        return 0
    return extract(args)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
