"""Load and save DiT weights: official .pt state_dicts, safetensors files, training checkpoints.

Loading never unpickles arbitrary objects: .pt files go through ``torch.load(weights_only=True)``,
which only rebuilds tensors and plain containers (plus ``argparse.Namespace``, what the official
train.py stores under "args": a bag of attributes, no code runs to rebuild it). A file that needs
anything else is refused with :class:`UnsafeCheckpointError`.

Saving is atomic (dit_fast.atomic): the data goes to a temporary file in the same directory, is
fsynced, then renamed over the destination; a full disk or a kill mid-save leaves the previous file
as it was and no temporary file behind.

Works for ``dit_fast.reference.DiT`` and ``dit_fast.DiT`` alike (same state_dict keys).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from dit_fast.atomic import atomic_save, atomic_write

__all__ = [
    "load_checkpoint", "save_checkpoint", "read_state_dict", "UnsafeCheckpointError", "StateDictMismatchError",
    "torch_save_atomic", "load_training_checkpoint", "newest_training_checkpoint", "TRAINING_CHECKPOINT_KEYS",
    "CheckpointFileError", "mismatch_report",
]

# Prefixes that wrappers add to every key: DistributedDataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# In a training checkpoint, the weights to sample with are the EMA ones.
WRAPPED_WEIGHT_KEYS = ("ema", "model")
MAX_LISTED_KEYS = 10
# What benchmarks/train.py writes (and needs back to resume); "args" is there too but not needed.
TRAINING_CHECKPOINT_KEYS = ("model", "ema", "opt", "step")


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The file holds Python objects other than tensors and plain containers; it was not unpickled."""


class StateDictMismatchError(RuntimeError):
    """A state_dict's keys or shapes do not match the model's."""


class CheckpointFileError(ValueError):
    """The file is not a checkpoint dit_fast can read (empty, text, another format than its name says,
    truncated); the message names the file and what it holds instead."""


def read_state_dict(path_or_state_dict, *, key: str | None = None, map_location="cpu") -> dict[str, torch.Tensor]:
    """The flat name -> tensor dict held by a file or an in-memory dict, unwrapped and de-prefixed.

    Training checkpoints ({"model", "ema", "opt", "args"} from the official train.py) are unwrapped:
    with key=None "ema" is taken when present (the weights sampling uses), else "model";
    key="model" / key="ema" (or any other top-level name) picks explicitly.
    A "module." (DDP) or "_orig_mod." (torch.compile) prefix on every key is removed.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        obj = _read_file(os.fspath(path_or_state_dict), map_location)
    elif isinstance(path_or_state_dict, Mapping):
        obj = path_or_state_dict
    else:
        raise TypeError(
            "path_or_state_dict must be a file path (str or os.PathLike) or a dict of tensors, "
            f"got {type(path_or_state_dict).__name__}"
        )
    state_dict = _unwrap(obj, key)
    return _strip_wrapper_prefixes(state_dict)


def load_checkpoint(
    model: nn.Module,
    path_or_state_dict,
    *,
    key: str | None = None,
    strict: bool = True,
    map_location="cpu",
) -> nn.Module:
    """Load weights into a DiT (reference or fast; also wrapped by DDP or torch.compile) and return `model`.

    path_or_state_dict: an official raw state_dict .pt (e.g. DiT-XL-2-256x256.pt), a .safetensors
    file, a training checkpoint wrapping the weights under "ema"/"model" (see read_state_dict for
    which one is taken), or an in-memory dict of any of these.

    strict=True (default): the keys must be exactly the model's, pos_embed included; otherwise a
    StateDictMismatchError lists the missing, unexpected and shape-mismatched keys.
    strict=False: loads the keys that match, warns about the missing and unexpected ones; a shape
    mismatch is always an error (a checkpoint for another input size has a different pos_embed).
    A model on the meta device gets the checkpoint's tensors assigned (no second copy is made).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    state_dict = read_state_dict(path_or_state_dict, key=key, map_location=map_location)
    wrapper, model = model, _unwrap_model(model)

    expected = model.state_dict()
    missing, unexpected, mismatched = _key_problems(expected, state_dict)
    if mismatched or (strict and (missing or unexpected)):
        raise StateDictMismatchError(
            f"state_dict does not match {type(model).__name__}:\n"
            + format_key_problems(missing, unexpected, mismatched)
        )
    if missing or unexpected:
        warnings.warn(
            "load_checkpoint(strict=False) left some keys alone:\n" + format_key_problems(missing, unexpected, []),
            stacklevel=2,
        )
    on_meta = any(t.is_meta for t in expected.values())
    model.load_state_dict(state_dict, strict=strict, assign=on_meta)
    return wrapper


def mismatch_report(model: nn.Module, state_dict: Mapping) -> str:
    """"" when `state_dict` loads strictly into `model` (keys and shapes), else the problems with a hint."""
    model = _unwrap_model(model)
    missing, unexpected, mismatched = _key_problems(model.state_dict(), _strip_wrapper_prefixes(state_dict))
    if not (missing or unexpected or mismatched):
        return ""
    return format_key_problems(missing, unexpected, mismatched)


def save_checkpoint(model: nn.Module, path) -> None:
    """Save the model's state_dict as .safetensors or as a plain .pt state_dict (the official format)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = os.fspath(path)
    state_dict = _unwrap_model(model).state_dict()
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        tensors = _standalone_tensors(state_dict)
        atomic_save(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    elif path.endswith((".pt", ".pth")):
        torch_save_atomic({k: v.detach().cpu() for k, v in state_dict.items()}, path)
    else:
        raise ValueError(f"path must end in .safetensors, .pt or .pth, got {path!r}")


def torch_save_atomic(obj, path) -> None:
    """torch.save(obj, path), atomically: path holds either its previous content or all of obj."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def load_training_checkpoint(path, *, map_location="cpu", model: nn.Module | None = None) -> dict:
    """A training checkpoint (benchmarks/train.py's {"model", "ema", "opt", "args", "step"}), read weights_only.

    Raises FileNotFoundError, UnsafeCheckpointError, or ValueError naming the file when it is
    truncated, unreadable or lacks one of TRAINING_CHECKPOINT_KEYS; with `model`, also when its
    "model" or "ema" weights do not fit that model (another config: the message says which dimension).
    """
    path = os.fspath(path)
    try:
        obj = _read_file(path, map_location)
    except (UnsafeCheckpointError, FileNotFoundError, CheckpointFileError):
        raise
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path!r} is not a readable checkpoint (truncated or corrupt?): {_first_line(e)}") from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, expected a training checkpoint dict")
    missing = [k for k in TRAINING_CHECKPOINT_KEYS if k not in obj]
    if missing:
        raise ValueError(
            f"{path!r} is not a training checkpoint: it lacks {', '.join(missing)} "
            f"(its top-level keys are {_listing([str(k) for k in obj], MAX_LISTED_KEYS)})"
        )
    if model is not None:
        for key in ("model", "ema"):
            problems = mismatch_report(model, obj[key]) if isinstance(obj[key], Mapping) else "  not a dict"
            if problems:
                raise ValueError(f"{path!r} holds {key!r} weights of another model config:\n{problems}")
    return dict(obj)


def newest_training_checkpoint(
    directory, *, map_location="cpu", model: nn.Module | None = None
) -> tuple[Path | None, dict | None, list[tuple[Path, str]]]:
    """The newest checkpoint in `directory` that loads: (path, checkpoint, skipped).

    Candidates are train.py's STEP.pt files, newest (highest step) first; each one that does not
    load (truncated by a kill or a full disk before saves were atomic, not a training checkpoint,
    refused as unsafe, with `model`: weights of another config) is skipped and listed in `skipped` as
    (path, why). (None, None, skipped) when none loads.
    """
    candidates = sorted(
        (p for p in Path(directory).glob("*.pt") if p.stem.isdigit()), key=lambda p: int(p.stem), reverse=True
    )
    skipped = []
    for path in candidates:
        try:
            return path, load_training_checkpoint(path, map_location=map_location, model=model), skipped
        except (ValueError, UnsafeCheckpointError) as e:
            skipped.append((path, str(e)))
    return None, None, skipped


def format_key_problems(missing, unexpected, mismatched, limit: int = MAX_LISTED_KEYS) -> str:
    """Human-readable listing of state_dict key problems, each list cut after `limit` entries."""
    lines = []
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {_listing(missing, limit)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {_listing(unexpected, limit)}")
    if mismatched:
        shown = [f"{name} (expected {list(want)}, got {list(got)})" for name, want, got in mismatched]
        lines.append(f"  shape mismatches ({len(mismatched)}): {_listing(shown, limit)}")
    hint = _hint(missing, unexpected, mismatched)
    if hint:
        lines.append("  hint: " + hint)
    return "\n".join(lines)


# -- helpers --------------------------------------------------------------------------------------


def _unwrap_model(model: nn.Module) -> nn.Module:
    # DDP / DataParallel (.module) and torch.compile (._orig_mod) prefix their keys; the weights are the inner model's.
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _read_file(path: str, map_location):
    if os.path.isdir(path):
        raise CheckpointFileError(_directory_message(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path_or_state_dict: no such file {path!r}")
    fmt = _sniff(path)
    named = "safetensors" if path.endswith(".safetensors") else "torch"
    if fmt in ("torch", "safetensors") and fmt != named:
        rename = ".safetensors" if fmt == "safetensors" else ".pt"
        raise CheckpointFileError(
            f"{path!r} holds a {FORMAT_NAMES[fmt]} but its name says {FORMAT_NAMES[named]}: rename it to end in "
            f"{rename} (the name picks the reader; nothing is guessed)"
        )
    if fmt not in ("torch", "safetensors"):
        raise CheckpointFileError(fmt)  # _sniff's description of what the file is instead
    if fmt == "safetensors":
        from safetensors.torch import load_file

        device = map_location if isinstance(map_location, str) else str(torch.device(map_location))
        try:
            return load_file(path, device=device)
        except Exception as e:  # safetensors_rust.SafetensorError is no subclass of anything more specific
            raise CheckpointFileError(
                f"{path!r} is not a readable safetensors file (truncated or corrupt?): {_first_line(e)}"
            ) from None
    try:
        with _allow_namespace():
            return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError) as e:
        raise CheckpointFileError(
            f"{path!r} is not a readable checkpoint (truncated or corrupt?): {_first_line(e)}"
        ) from None
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()
        raise UnsafeCheckpointError(
            f"{path!r} contains Python objects other than tensors and plain containers; refusing to "
            "unpickle it, since unpickling can run arbitrary code. Re-save only the weights "
            "(torch.save(model.state_dict(), ...)) from a source you trust."
            + (f" torch.load said: {reason[0]}" if reason else "")
        ) from None


FORMAT_NAMES = {"torch": "torch.save file (.pt/.pth)", "safetensors": "safetensors file (.safetensors)"}
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
PICKLE_PROTO = b"\x80"  # a pickle stream of protocol >= 2: torch.save's legacy format


def _sniff(path: str) -> str:
    """"torch" or "safetensors" from the file's first bytes, else a sentence saying what the file is."""
    size = os.path.getsize(path)
    if size == 0:
        return (f"{path!r} is empty (0 bytes), expected a checkpoint: an interrupted download or copy, or a save "
                "on a full disk?")
    with open(path, "rb") as f:
        head = f.read(256)
    if head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_PROTO):
        return "torch"
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    if len(head) > 8 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return "safetensors"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        first = text.strip().splitlines()[0][:80] if text.strip() else ""
        why = ""
        if text.startswith("version https://git-lfs"):
            why = " (a Git LFS pointer: fetch the real file with `git lfs pull`)"
        elif text.lstrip().lower().startswith(("<!doctype", "<html")):
            why = " (an HTML page: a failed download?)"
        return f"{path!r} is a text file, not a checkpoint{why}; it starts with {first!r}"
    return (f"{path!r} is neither a torch.save file (zip or pickle) nor a safetensors file "
            f"(it starts with bytes {head[:8].hex(' ')})")


def _directory_message(path: str) -> str:
    names = set(os.listdir(path))
    if "config.json" in names and any(n.startswith("diffusion_pytorch_model") for n in names):
        return (
            f"{path!r} is a directory: a diffusers model folder. Load it with diffusers' "
            "DiTTransformer2DModel.from_pretrained and convert with dit_fast.convert_diffusers.dit_from_diffusers, "
            "or pass its diffusion_pytorch_model.safetensors to dit_fast.convert_diffusers.from_diffusers"
        )
    return f"{path!r} is a directory, expected a checkpoint file (.pt, .pth or .safetensors)"


def _allow_namespace():
    # Scoped allow-list (torch >= 2.5); without it a checkpoint holding args=Namespace(...) is refused.
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    return safe_globals([argparse.Namespace]) if safe_globals is not None else contextlib.nullcontext()


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj, key: str | None) -> Mapping:
    if not isinstance(obj, Mapping):
        raise TypeError(f"the checkpoint must hold a dict of tensors, got {type(obj).__name__}")
    if key is None:
        if _is_tensor_dict(obj):
            return obj
        key = next((k for k in WRAPPED_WEIGHT_KEYS if k in obj), None)
        if key is None:
            raise ValueError(
                "the checkpoint is neither a state_dict (names -> tensors) nor a training checkpoint "
                f"with {' or '.join(repr(k) for k in WRAPPED_WEIGHT_KEYS)}; its top-level keys are "
                f"{_listing(list(obj), MAX_LISTED_KEYS)}. Pass key=... to pick one."
            )
    elif key not in obj:
        top = _listing(list(obj), MAX_LISTED_KEYS)
        raise KeyError(f"key={key!r} is not in the checkpoint; its top-level keys are {top}")
    weights = obj[key]
    if not _is_tensor_dict(weights):
        raise ValueError(f"checkpoint[{key!r}] must be a non-empty dict of tensors, got {type(weights).__name__}")
    return weights


def _key_problems(expected: Mapping, state_dict: Mapping):
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        (k, tuple(expected[k].shape), tuple(v.shape))
        for k, v in state_dict.items()
        if k in expected and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(expected[k].shape)
    ]
    return missing, unexpected, mismatched


def _strip_wrapper_prefixes(state_dict: Mapping) -> dict:
    state_dict = dict(state_dict)
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if state_dict and all(isinstance(k, str) and k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                stripped = True
    return state_dict


def _standalone_tensors(state_dict: Mapping) -> dict:
    # safetensors refuses tensors that share storage or are views into a larger one: copy those.
    seen = set()
    out = {}
    for k, v in state_dict.items():
        v = v.detach().cpu()
        storage = v.untyped_storage()
        ptr = storage.data_ptr()
        whole = v.is_contiguous() and v.storage_offset() == 0 and v.numel() * v.element_size() == storage.nbytes()
        if ptr in seen or not whole:
            v = v.clone(memory_format=torch.contiguous_format)
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    return out


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _listing(items, limit: int) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def _hint(missing, unexpected, mismatched) -> str:
    if any(k.startswith("transformer_blocks.") for k in unexpected):
        return (
            "this looks like a diffusers DiTTransformer2DModel state_dict: convert it with "
            "dit_fast.convert_diffusers.from_diffusers first"
        )
    dims = _dimension_differences(missing, unexpected, mismatched)
    if dims:
        return ("the checkpoint was made for another config: " + "; ".join(dims)
                + ". Build the model with the checkpoint's values")
    if missing == ["pos_embed"]:
        return (
            "pos_embed (the fixed 2D sin-cos table) is part of official checkpoints; pass strict=False "
            "to keep the model's own table"
        )
    return ""


_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


def _dimension_differences(missing, unexpected, mismatched) -> list[str]:
    """Which DiT dimensions differ, read off the shapes: ["hidden size: checkpoint 384, model 32", ...]."""
    model_shape = {name: want for name, want, _ in mismatched}
    ckpt_shape = {name: got for name, _, got in mismatched}
    out = []

    def differ(what, name, index, convert=lambda v, shapes: v):
        if name in model_shape and len(model_shape[name]) > index and len(ckpt_shape[name]) > index:
            mine = convert(model_shape[name][index], model_shape)
            theirs = convert(ckpt_shape[name][index], ckpt_shape)
            if mine != theirs and what not in {o.split(":")[0] for o in out}:
                out.append(f"{what}: checkpoint {theirs}, model {mine} ({name})")

    differ("hidden size", "x_embedder.proj.weight", 0)
    differ("hidden size", "pos_embed", 2)
    differ("in_channels", "x_embedder.proj.weight", 1)
    differ("patch size", "x_embedder.proj.weight", 2)

    def grid(tokens, shapes):  # pos_embed has (input_size / patch size)^2 rows
        root = math.isqrt(tokens)
        return f"{root}x{root} patches" if root * root == tokens else f"{tokens} tokens"

    differ("input_size", "pos_embed", 1, grid)
    differ("num_classes (+1 null class)", "y_embedder.embedding_table.weight", 0)
    differ("output channels x patch^2 (learn_sigma)", "final_layer.linear.weight", 0)
    ckpt_blocks = {int(m[1]) for k in unexpected if (m := _BLOCK_KEY.match(k))}
    model_blocks = {int(m[1]) for k in missing if (m := _BLOCK_KEY.match(k))}
    if ckpt_blocks and not model_blocks:
        out.append(f"depth: checkpoint {max(ckpt_blocks) + 1}, model {min(ckpt_blocks)}")
    elif model_blocks and not ckpt_blocks:
        out.append(f"depth: checkpoint {min(model_blocks)}, model {max(model_blocks) + 1}")
    return out
