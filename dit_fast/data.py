"""Pre-extracted VAE latents for training: a directory of shards, each validated when it is opened.

A shard is either
  NAME.pt         a dict {"latents": [N, C, H, W] float tensor, "labels": [N] integer tensor},
                  read with torch.load(weights_only=True) (nothing is unpickled);
  NAME.npy        latents [N, C, H, W] (memory-mapped), with the labels [N] in NAME.labels.npy.
Shards are taken in name order, the .pt ones first, then the .npy ones.

Opening checks every shard, so that a bad one stops training before the first step instead of
training on wrong pairs or poisoning the weights later: latents and labels have the same count in
each shard (equal totals are not enough: rows would pair with the wrong labels), labels are an
integer dtype (float labels are refused, never truncated) in [0, num_classes) (num_classes itself is
the model's null class, the one label dropout uses), latents are floating point with the model's
[C, H, W], and their values are finite on a sample of rows of each shard (every row with
check="all"). Every batch is checked for finite values again when it is read, since a sample can
miss a row. Each error names the shard file, what was expected and what came.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["LatentShards", "InvalidShardError", "CHECK_MODES"]

CHECK_MODES = ("sample", "all")
# Rows per shard whose values are checked when opening with check="sample": evenly spaced, first and last included.
SAMPLE_ROWS = 64
# Rows per chunk when checking every row, so memory-mapped shards are not read into memory at once.
CHECK_CHUNK_ROWS = 1024


class InvalidShardError(ValueError):
    """A latent shard does not hold what training needs; the message names the file."""


@dataclass
class Shard:
    path: Path
    latents: torch.Tensor | np.ndarray  # [N, C, H, W]; a numpy memmap for .npy shards
    labels: np.ndarray  # [N] int64

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, index: np.ndarray) -> np.ndarray:
        """Latent rows as float32 numpy, [len(index), C, H, W]."""
        if isinstance(self.latents, torch.Tensor):
            return self.latents[torch.from_numpy(index)].float().numpy()
        return np.asarray(self.latents[index], dtype=np.float32)


class LatentShards:
    """All shards of a directory as one indexable data set of (latent, label) rows."""

    def __init__(self, directory, *, latent_shape: tuple[int, int, int], num_classes: int, check: str = "sample"):
        if check not in CHECK_MODES:
            raise ValueError(f"check must be one of {', '.join(CHECK_MODES)}, got {check!r}")
        root = Path(directory)
        if not root.is_dir():
            raise FileNotFoundError(f"--data {directory}: not a directory")
        self.shape = tuple(int(s) for s in latent_shape)
        self.num_classes = int(num_classes)
        self.shards: list[Shard] = []
        for path in sorted(root.glob("*.pt")):
            self.shards.append(self._validated(_read_pt_shard(path), check))
        for path in sorted(p for p in root.glob("*.npy") if not p.name.endswith(".labels.npy")):
            self.shards.append(self._validated(_read_npy_shard(path), check))
        if not self.shards:
            raise FileNotFoundError(f"--data {directory}: no *.pt or *.npy latent shards found")
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        if len(self) == 0:
            raise InvalidShardError(f"--data {directory}: every shard is empty")
        self.labels = np.concatenate([s.labels for s in self.shards])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def batch_at(self, indices, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents [n, C, H, W] float32 and labels [n] int64 of the given global row indices."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"indices must be in [0, {len(self)}), got values from {indices.min()} to {indices.max()}")
        shard_of = np.searchsorted(self.offsets, indices, side="right") - 1
        x = np.empty((len(indices), *self.shape), dtype=np.float32)
        for s in np.unique(shard_of):
            picked = np.nonzero(shard_of == s)[0]
            local = indices[picked] - self.offsets[s]
            x[picked] = rows = self.shards[s].rows(local)
            # The opening check samples rows: a non-finite row it missed is caught here, before training sees it.
            bad = _first_non_finite_row(rows)
            if bad is not None:
                raise InvalidShardError(
                    f"{self.shards[s].path}: latent row {int(local[bad])} has non-finite values (NaN or inf); "
                    "remove or re-extract it (--check-data all checks every row when opening)"
                )
        return torch.from_numpy(x).to(device), torch.from_numpy(self.labels[indices]).to(device)

    # -- validation --------------------------------------------------------------------------------

    def _validated(self, shard: Shard, check: str) -> Shard:
        path, latents, labels = shard.path, shard.latents, shard.labels
        want = f"[N, {', '.join(map(str, self.shape))}]"
        if latents.ndim != 4 or tuple(latents.shape[1:]) != self.shape:
            raise InvalidShardError(
                f"{path}: latents have shape {list(latents.shape)}, expected {want} "
                "(the model's in_channels and latent size, image size / 8)"
            )
        if labels.ndim != 1 or len(labels) != len(latents):
            raise InvalidShardError(
                f"{path}: {len(latents)} latents but labels of shape {list(labels.shape)}, expected [{len(latents)}] "
                "(one label per latent, in the same shard)"
            )
        if len(labels):
            low, high = labels.min(), labels.max()
            if low < 0 or high >= self.num_classes:
                raise InvalidShardError(
                    f"{path}: labels must be in [0, {self.num_classes}) (num_classes={self.num_classes}; "
                    f"{self.num_classes} is the null class of classifier-free guidance), "
                    f"got values from {low} to {high}"
                )
        rows = _rows_to_check(len(latents), check)
        for start in range(0, len(rows), CHECK_CHUNK_ROWS):
            chunk = rows[start : start + CHECK_CHUNK_ROWS]
            bad = _first_non_finite_row(shard.rows(chunk))
            if bad is not None:
                raise InvalidShardError(
                    f"{path}: latent row {int(chunk[bad])} has non-finite values (NaN or inf); expected finite latents"
                )
        return Shard(path, latents, labels.astype(np.int64))


# -- reading shards --------------------------------------------------------------------------------


def _read_pt_shard(path: Path) -> Shard:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise InvalidShardError(
            f"{path}: holds Python objects other than tensors and plain containers; refusing to unpickle it "
            f"(torch.load said: {_first_line(e)})"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise InvalidShardError(f"{path}: cannot be read as a torch.save file (truncated?): {_first_line(e)}") from None
    if not (isinstance(obj, dict) and all(isinstance(obj.get(k), torch.Tensor) for k in ("latents", "labels"))):
        got = f"a dict with keys {sorted(map(str, obj))}" if isinstance(obj, dict) else type(obj).__name__
        raise InvalidShardError(f'{path}: expected a dict {{"latents": tensor, "labels": tensor}}, got {got}')
    # A shard saved from a tensor that required grad keeps the flag: the rows are data, not a graph.
    latents, labels = obj["latents"].detach(), obj["labels"].detach()
    if not latents.is_floating_point():
        raise InvalidShardError(f"{path}: latents must be floating point, got {latents.dtype}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise InvalidShardError(f"{path}: labels must be an integer dtype, got {labels.dtype} (refused, not truncated)")
    return Shard(path, latents, labels.numpy())


def _read_npy_shard(path: Path) -> Shard:
    label_path = path.with_name(path.stem + ".labels.npy")
    if not label_path.exists():
        raise FileNotFoundError(f"{path}: no labels file {label_path.name} next to it")
    try:
        latents = np.load(path, mmap_mode="r")  # allow_pickle=False: object arrays are refused
        labels = np.load(label_path)
    except (ValueError, OSError, EOFError) as e:
        raise InvalidShardError(f"{path}: cannot be read as a .npy array (or its labels): {_first_line(e)}") from None
    if not np.issubdtype(latents.dtype, np.floating):
        raise InvalidShardError(f"{path}: latents must be floating point, got {latents.dtype}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise InvalidShardError(
            f"{label_path}: labels must be an integer dtype, got {labels.dtype} (refused, not truncated)"
        )
    return Shard(path, latents, labels)


# -- helpers ---------------------------------------------------------------------------------------


def _rows_to_check(n: int, check: str) -> np.ndarray:
    if check == "all" or n <= SAMPLE_ROWS:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, SAMPLE_ROWS).round().astype(np.int64))


def _first_non_finite_row(rows: np.ndarray) -> int | None:
    finite = np.isfinite(rows.reshape(len(rows), -1)).all(axis=1)
    return None if finite.all() else int(np.argmin(finite))


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
