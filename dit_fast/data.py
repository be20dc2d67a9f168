"""Pre-extracted VAE latents for training: a directory of shards, each validated when it is opened.

A shard is either
  NAME.pt         a dict {"latents": [N, C, H, W] float tensor, "labels": [N] integer tensor},
                  read with torch.load(weights_only=True) (nothing is unpickled);
  NAME.npy        latents [N, C, H, W] (memory-mapped), with the labels [N] in NAME.labels.npy;
  NAME.safetensors  the published hustvl/LightningDiT layout (its extract_features.py): "latents" [N, C, H, W],
                  "labels" [N] and optionally "latents_flip" [N, C, H, W] (the latents of the mirrored
                  images), memory-mapped straight from the file (no safetensors import, nothing unpickled).
Shards are taken in name order, the .pt ones first, then the .npy ones, then the .safetensors ones
(latents_stats.pt, the latent statistics the published LightningDiT layout keeps beside the shards, is
not a shard). batch_at(..., flip=) takes a row from "latents_flip" where asked and its shard has one:
the published data set picks latents or latents_flip with probability 1/2 per row.

Opening checks every shard, so that a bad one stops training before the first step instead of
training on wrong pairs or poisoning the weights later: latents and labels have the same count in
each shard (equal totals are not enough: rows would pair with the wrong labels), labels are an
integer dtype (float labels are refused, never truncated) in [0, num_classes) (num_classes itself is
the model's null class, the one label dropout uses), latents are floating point with the model's
[C, H, W], and their values are finite on a sample of rows of each shard (every row with
check="all"). Every batch is checked for finite values again when it is read, since a sample can
miss a row. Each error names the shard file, what was expected and what came.

Latent statistics (LightningDiT's latent normalization): a file of per-channel mean and std, read by
LatentStats.load. Formats:
  NAME.pt           torch.save({"mean": tensor, "std": tensor}), read with torch.load(weights_only=True):
                    the published hustvl/LightningDiT latents_stats.pt ([1, C, 1, 1] each) or [C] tensors;
  NAME.safetensors  the same two tensors under the keys "mean" and "std".
Training normalizes x -> (x - mean) / std * multiplier; sampling undoes it before decoding,
x -> x * std / multiplier + mean (the published train.py / inference.py; multiplier 1.0 in the recipe).
compute_latent_stats gives them for a LatentShards set as the published code computes them (10,000
random rows at most; mean and unbiased std over rows and pixels).
"""
from __future__ import annotations

import hashlib
import json
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["LatentShards", "InvalidShardError", "CHECK_MODES", "LatentStats", "compute_latent_stats"]

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
    latents: torch.Tensor | np.ndarray  # [N, C, H, W]; a numpy memmap for .npy and .safetensors shards
    labels: np.ndarray  # [N] int64
    latents_flip: torch.Tensor | np.ndarray | None = None  # the mirrored images' latents (.safetensors)
    bfloat16: bool = False  # the memmaps hold bfloat16 bits as uint16

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, index: np.ndarray, flip: np.ndarray | None = None) -> np.ndarray:
        """Latent rows as float32 numpy, [len(index), C, H, W]; where flip[i], from latents_flip."""
        out = self._rows(self.latents, index)
        if flip is not None and self.latents_flip is not None and flip.any():
            out[flip] = self._rows(self.latents_flip, index[flip])
        return out

    def _rows(self, source, index: np.ndarray) -> np.ndarray:
        if isinstance(source, torch.Tensor):
            return source[torch.from_numpy(index)].float().numpy()
        picked = np.asarray(source[index])
        if self.bfloat16:
            return torch.from_numpy(picked.astype(np.uint16, copy=False)).view(torch.bfloat16).float().numpy()
        return picked.astype(np.float32, copy=False)


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
        for path in sorted(p for p in root.glob("*.pt") if p.name != STATS_FILE_NAME):
            self.shards.append(self._validated(_read_pt_shard(path), check))
        for path in sorted(p for p in root.glob("*.npy") if not p.name.endswith(".labels.npy")):
            self.shards.append(self._validated(_read_npy_shard(path), check))
        for path in sorted(root.glob("*.safetensors")):
            self.shards.append(self._validated(_read_safetensors_shard(path), check))
        if not self.shards:
            raise FileNotFoundError(f"--data {directory}: no *.pt, *.npy or *.safetensors latent shards found")
        self.has_flips = any(s.latents_flip is not None for s in self.shards)
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        if len(self) == 0:
            raise InvalidShardError(f"--data {directory}: every shard is empty")
        self.labels = np.concatenate([s.labels for s in self.shards])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def batch_at(self, indices, device, flip=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents [n, C, H, W] float32 and labels [n] int64 of the given global row indices; flip [n] bool:
        take row i from its shard's latents_flip where flip[i] and the shard has them."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"indices must be in [0, {len(self)}), got values from {indices.min()} to {indices.max()}")
        if flip is not None:
            flip = np.asarray(flip, dtype=bool)
            if flip.shape != indices.shape:
                raise ValueError(f"flip must have shape {list(indices.shape)} (one per index), got {list(flip.shape)}")
        shard_of = np.searchsorted(self.offsets, indices, side="right") - 1
        x = np.empty((len(indices), *self.shape), dtype=np.float32)
        for s in np.unique(shard_of):
            picked = np.nonzero(shard_of == s)[0]
            local = indices[picked] - self.offsets[s]
            x[picked] = rows = self.shards[s].rows(local, None if flip is None else flip[picked])
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
        flips = shard.latents_flip
        if flips is not None and tuple(flips.shape) != tuple(latents.shape):
            raise InvalidShardError(
                f"{path}: latents_flip have shape {list(flips.shape)}, expected the latents' {list(latents.shape)}"
            )
        rows = _rows_to_check(len(latents), check)
        for flip in (False, True) if flips is not None else (False,):
            for start in range(0, len(rows), CHECK_CHUNK_ROWS):
                chunk = rows[start : start + CHECK_CHUNK_ROWS]
                bad = _first_non_finite_row(shard.rows(chunk, np.full(len(chunk), flip)))
                if bad is not None:
                    which = "latents_flip" if flip else "latent"
                    raise InvalidShardError(f"{path}: {which} row {int(chunk[bad])} has non-finite values "
                                            "(NaN or inf); expected finite latents")
        return Shard(path, latents, labels.astype(np.int64), flips, shard.bfloat16)


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


# safetensors dtype names -> numpy (bfloat16 is read as its uint16 bits and widened in Shard.rows).
_SAFETENSORS_FLOATS = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}
_SAFETENSORS_INTS = {"I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                     "U16": np.uint16, "U32": np.uint32, "U64": np.uint64}
_SAFETENSORS_MAX_HEADER = 100 * 2**20  # the format's own limit


def _read_safetensors_shard(path: Path) -> Shard:
    """The published LightningDiT shard: the header read here, each tensor memory-mapped at its offset.
    Not safetensors' safe_open: its slices are ranges, and a training batch gathers random rows of a shard
    (a memmap indexes them in one read each; a 10,000-row shard of XL/1 latents is 330 MB per tensor)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or not 0 < n <= min(_SAFETENSORS_MAX_HEADER, size - 8):
                raise ValueError(f"a header length of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise InvalidShardError(
            f"{path}: cannot be read as a safetensors file (truncated?): {_first_line(e)}"
        ) from None
    if not isinstance(header, dict) or not all(isinstance(header.get(k), dict) for k in ("latents", "labels")):
        got = sorted(k for k in header if k != "__metadata__") if isinstance(header, dict) else type(header).__name__
        raise InvalidShardError(f'{path}: expected the tensors "latents" and "labels" (and optionally '
                                f'"latents_flip"), got {got}')
    data_start = 8 + n

    def mapped(key: str, dtypes: dict, what: str):
        entry = header[key]
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in dtypes:
            raise InvalidShardError(f"{path}: {key} must be {what} ({', '.join(dtypes)}), got {dtype} "
                                    "(refused, not converted)")
        np_dtype = np.dtype(dtypes[dtype])
        count = math.prod(shape) if isinstance(shape, list) else -1
        if (count < 0 or not isinstance(offsets, list) or len(offsets) != 2
                or offsets[1] - offsets[0] != count * np_dtype.itemsize or data_start + offsets[1] > size):
            raise InvalidShardError(f"{path}: {key}'s header (shape {shape}, bytes {offsets}) does not fit the "
                                    f"file of {size} bytes (truncated?)")
        if count == 0:
            return np.zeros(shape, np_dtype)
        return np.memmap(path, dtype=np_dtype, mode="r", offset=data_start + offsets[0], shape=tuple(shape))

    latents = mapped("latents", _SAFETENSORS_FLOATS, "floating point")
    bf16 = header["latents"]["dtype"] == "BF16"
    flips = None
    if isinstance(header.get("latents_flip"), dict):
        flips = mapped("latents_flip", _SAFETENSORS_FLOATS, "floating point")
        if (header["latents_flip"]["dtype"] == "BF16") != bf16:
            raise InvalidShardError(f"{path}: latents_flip must have the latents' dtype {header['latents']['dtype']}, "
                                    f"got {header['latents_flip']['dtype']}")
    labels = np.asarray(mapped("labels", _SAFETENSORS_INTS, "an integer dtype"))
    return Shard(path, latents, labels, flips, bf16)


# -- latent statistics -----------------------------------------------------------------------------

# Rows the published LightningDiT code computes its statistics from (at most).
STATS_ROWS = 10_000
# The published statistics file's name, next to the shards (not a shard: LatentShards skips it).
STATS_FILE_NAME = "latents_stats.pt"


@dataclass
class LatentStats:
    """Per-channel mean and std [C] (float32) of a latent data set, and the multiplier applied after
    normalizing (the published latent_multiplier)."""

    mean: torch.Tensor
    std: torch.Tensor
    multiplier: float = 1.0

    @property
    def channels(self) -> int:
        return int(self.mean.numel())

    @classmethod
    def load(cls, path, *, channels: int | None = None, multiplier: float = 1.0) -> LatentStats:
        """Reads a stats file (see the module doc), checked: both keys, C values each (any shape whose
        non-unit dimensions are [C], as [1, C, 1, 1]), finite, std > 0, and C == channels when given.
        Raises FileNotFoundError or ValueError naming the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such latent stats file (expected a .pt or .safetensors file "
                                    'holding "mean" and "std" per channel, e.g. the published latents_stats.pt)')
        obj = _read_stats_file(path)
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), torch.Tensor) for k in ("mean", "std")):
            got = f"a dict with keys {sorted(map(str, obj))}" if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f'{path}: expected {{"mean": tensor, "std": tensor}} (per-channel latent stats), '
                             f"got {got}")
        mean, std = (_per_channel(path, k, obj[k]) for k in ("mean", "std"))
        if mean.numel() != std.numel():
            raise ValueError(f"{path}: mean has {mean.numel()} channels but std has {std.numel()}")
        if channels is not None and mean.numel() != channels:
            raise ValueError(f"{path}: stats for {mean.numel()} latent channels, but the model has {channels} "
                             "(in_channels): these stats belong to another VAE")
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError(f"{path}: mean and std must be finite and std > 0 in every channel, got "
                             f"mean {mean.tolist()[:8]}..., std {std.tolist()[:8]}...")
        if not (math.isfinite(multiplier) and multiplier > 0):
            raise ValueError(f"latent multiplier must be a finite number > 0, got {multiplier}")
        return cls(mean, std, float(multiplier))

    def save(self, path) -> None:
        """Writes {"mean": [1, C, 1, 1], "std": [1, C, 1, 1]} atomically (the published file's layout)."""
        from .checkpoint import torch_save_atomic

        torch_save_atomic({"mean": self.mean.reshape(1, -1, 1, 1).clone(),
                           "std": self.std.reshape(1, -1, 1, 1).clone()}, path)

    def digest(self) -> str:
        """Names these statistics in a checkpoint's args (a resume with other ones is refused)."""
        data = torch.cat([self.mean, self.std, torch.tensor([self.multiplier])]).double().numpy().tobytes()
        return hashlib.sha256(data).hexdigest()[:16]

    def _view(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"latents must be [N, {self.channels}, H, W] for these stats, got {list(x.shape)}")
        return t.to(device=x.device, dtype=x.dtype).reshape(1, -1, 1, 1)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std * multiplier, as the published data set returns a training latent."""
        return (x - self._view(x, self.mean)) / self._view(x, self.std) * self.multiplier

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """x * std / multiplier + mean, as the published inference.py does before decoding."""
        return (x * self._view(x, self.std)) / self.multiplier + self._view(x, self.mean)


def compute_latent_stats(shards: LatentShards, *, max_rows: int = STATS_ROWS, seed: int = 0) -> LatentStats:
    """Mean and std per channel over min(max_rows, len) rows drawn without replacement (seeded), over
    rows and pixels, std unbiased: what the published code computes for latents_stats.pt."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(shards), min(max_rows, len(shards)), replace=False))
    chunks = [rows[i: i + CHECK_CHUNK_ROWS] for i in range(0, len(rows), CHECK_CHUNK_ROWS)]

    def read(chunk):
        return shards.batch_at(chunk, "cpu")[0].double()

    # Two passes in float64 over chunks of rows (not all of them in memory at once): the mean, then the
    # squared deviations from it.
    total = sum(read(c).sum(dim=(0, 2, 3)) for c in chunks)
    count = len(rows) * shards.shape[1] * shards.shape[2]
    mean = total / count
    squares = sum(((read(c) - mean.reshape(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3)) for c in chunks)
    std = torch.sqrt(squares / max(count - 1, 1))
    return LatentStats(mean.float(), std.float())


def _read_stats_file(path: Path):
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ValueError(f"{path}: reading .safetensors needs the safetensors package: {e}") from None
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise ValueError(f"{path}: cannot be read as a .safetensors file: {_first_line(e)}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: holds Python objects other than tensors; refusing to unpickle it "
                         f"({_first_line(e)})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: cannot be read as a torch.save file (truncated?): {_first_line(e)}") from None


def _per_channel(path: Path, key: str, t: torch.Tensor) -> torch.Tensor:
    dims = [d for d in t.shape if d != 1]
    if not t.is_floating_point() or len(dims) > 1 or t.numel() == 0:
        raise ValueError(f"{path}: {key!r} must be a float tensor of C values ([C] or [1, C, 1, 1]), "
                         f"got {t.dtype} {list(t.shape)}")
    return t.detach().reshape(-1).float().clone()


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
