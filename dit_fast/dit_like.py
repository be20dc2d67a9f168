"""What a sampler needs to know about a DiT-like module, read from the attributes the published DiT has.

dit_fast.DiT and dit_fast.reference.DiT carry `input_size` and `num_classes`; the published model
(facebookresearch/DiT models.py) does not: its latent size lives in `x_embedder` (timm's PatchEmbed:
`img_size`, or `grid_size` times `patch_size`) and its class count in `y_embedder.num_classes`. Both
forms are read here, so any module built like the published one works.
"""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["DiTLike", "read_dit_like"]


class DiTLike(NamedTuple):
    in_channels: int
    latent_hw: tuple[int, int]  # (height, width) of the latents the model takes
    num_classes: int  # the null (unconditional) label is num_classes
    learn_sigma: bool  # the model outputs 2 * in_channels channels (eps | variance)


def read_dit_like(model, latent_size=None) -> DiTLike:
    """in_channels, latent size, num_classes and learn_sigma of `model`; latent_size (an int or (H, W))
    overrides the one the model states. TypeError naming what is missing when the model does not say."""
    name = type(model).__name__
    embedder = getattr(model, "x_embedder", None)
    in_channels = _stated(model, "in_channels", getattr(embedder, "proj", None))
    if in_channels is None:
        raise TypeError(f"model must be a DiT-like module: {name} has neither in_channels nor "
                        "x_embedder.proj.in_channels")
    in_channels = int(in_channels)

    if latent_size is not None:
        hw = _pair(latent_size, "latent_size")
    else:
        hw = _latent_hw_of(model, embedder)
        if hw is None:
            raise TypeError(f"the latent size of {name} is unknown: it has no x_embedder.img_size, "
                            "x_embedder.grid_size and patch_size, or input_size; pass latent_size=")

    num_classes = _stated(model, "num_classes", getattr(model, "y_embedder", None))
    if num_classes is None:
        raise TypeError(f"model must be a class-conditional DiT-like module: {name} has neither num_classes nor "
                        "y_embedder.num_classes")

    learn_sigma = getattr(model, "learn_sigma", None)
    if learn_sigma is None:
        out_channels = getattr(model, "out_channels", None)
        if out_channels is None:
            raise TypeError(f"{name} has neither learn_sigma nor out_channels: cannot tell whether it predicts "
                            "the variance")
        learn_sigma = int(out_channels) == 2 * in_channels
    return DiTLike(in_channels, hw, int(num_classes), bool(learn_sigma))


def _stated(model, attr: str, part):
    """model.<attr>, else the published model's submodule `part`.<attr>, else None."""
    value = getattr(model, attr, None)
    return getattr(part, attr, None) if value is None else value


def _latent_hw_of(model, embedder) -> tuple[int, int] | None:
    img_size = getattr(embedder, "img_size", None)
    if img_size is not None:
        return _pair(img_size, "x_embedder.img_size")
    grid, patch = getattr(embedder, "grid_size", None), getattr(embedder, "patch_size", None)
    if grid is not None and patch is not None:
        (gh, gw), (ph, pw) = _pair(grid, "x_embedder.grid_size"), _pair(patch, "x_embedder.patch_size")
        return gh * ph, gw * pw
    size = getattr(model, "input_size", None)
    return None if size is None else _pair(size, "input_size")


def _pair(value, what: str) -> tuple[int, int]:
    items = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items):
        raise ValueError(f"{what} must be a positive int or a pair of them, got {value!r}")
    return items
