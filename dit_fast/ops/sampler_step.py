"""The fused diffusion sampling step as a torch op, with a plain-PyTorch twin and one entry point.

    sampler_step_(x, model_out, noise, table, step, cfg_scale=..., ...)   # x updated in place
    sampler_step(x, ...) -> new x                                         # functional

The math is documented in kernels/sampler_step.py; the table's columns are its COL_* constants and
dit_fast.sampling.build_step_table fills them. backend: "triton" (CUDA; CPU tensors only under
TRITON_INTERPRET=1), "torch" (anywhere), "auto" (Triton on CUDA when it imports, else torch).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .step_dispatch import check_contiguous, check_inputs, check_noise_table_step, resolve_backend, shape_of

__all__ = ["sampler_step", "sampler_step_", "torch_sampler_step_", "NUM_COLS"]

NUM_COLS = 10


def _kernels():
    from ..kernels import sampler_step as K  # imports triton: only when the Triton path is used

    return K


@torch.library.custom_op("dit_fast::sampler_step_", mutates_args=("x",))
def _sampler_step_op(
    x: Tensor, model_out: Tensor, noise: Tensor, table: Tensor, step: Tensor,
    cfg_scale: float, guided_channels: int, cfg: bool, learn_sigma: bool, clip: bool, ddim: bool,
) -> None:
    _kernels().sampler_step_(x, model_out, noise, table, step, cfg_scale, guided_channels, cfg, learn_sigma, clip, ddim)


@_sampler_step_op.register_fake
def _(x, model_out, noise, table, step, cfg_scale, guided_channels, cfg, learn_sigma, clip, ddim):
    return None


def torch_sampler_step_(
    x: Tensor, model_out: Tensor, noise: Tensor, table: Tensor, step: Tensor,
    cfg_scale: float, guided_channels: int, cfg: bool, learn_sigma: bool, clip: bool, ddim: bool,
) -> None:
    """The same update in plain PyTorch, in the order of operations of the published code."""
    n, C = x.shape[:2]
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    row = table.index_select(0, step.reshape(1).long())[0].to(cdt)  # stays on the device: no sync
    eps = model_out[:n, :C]
    if cfg:
        g = min(guided_channels, C)
        cond, unc = model_out[:n, :g], model_out[n: 2 * n, :g]
        eps = torch.cat([unc + cfg_scale * (cond - unc), model_out[:n, g:C]], dim=1)
    eps = eps.to(cdt)
    xc = x.to(cdt)
    x0 = row[0] * xc - row[1] * eps
    if clip:
        x0 = x0.clamp(-1, 1)
    nz = noise[:n].to(cdt)
    if ddim:
        eps2 = (row[0] * xc - x0) / row[1]
        new = x0 * row[7] + row[8] * eps2 + row[6] * row[9] * nz
    else:
        if learn_sigma:
            frac = (model_out[:n, C: 2 * C].to(cdt) + 1) / 2
            logvar = frac * row[5] + (1 - frac) * row[4]
        else:
            logvar = row[4]
        new = row[2] * x0 + row[3] * xc + row[6] * torch.exp(0.5 * logvar) * nz
    x.copy_(new)


def _check(x, model_out, noise, table, step, cfg, learn_sigma) -> None:
    check_inputs(x, (("x", x), ("model_out", model_out), ("noise", noise), ("table", table), ("step", step)))
    n, C, H, W = x.shape
    want = [2 * n if cfg else n, 2 * C if learn_sigma else C, H, W]
    if list(model_out.shape) != want or not model_out.is_floating_point():
        raise ValueError(
            f"model_out must be a float tensor {want} ({'[cond; uncond] halves, ' if cfg else ''}"
            f"{'eps | variance channels' if learn_sigma else 'eps channels'}), got {model_out.dtype} "
            f"{shape_of(model_out)}"
        )
    check_noise_table_step(x, noise, table, step, NUM_COLS, "num_steps")
    check_contiguous(("x", x))


def sampler_step_(
    x: Tensor, model_out: Tensor, noise: Tensor, table: Tensor, step: Tensor, *,
    cfg_scale: float = 1.0, guided_channels: int = 3, cfg: bool = False, learn_sigma: bool = True,
    clip: bool = False, ddim: bool = False, backend: str = "auto",
) -> Tensor:
    """One sampling step, x updated in place (and returned). See kernels/sampler_step.py for the math.

    cfg: model_out holds [cond; uncond] halves for the batch x ([2n, ...]); the first
    `guided_channels` channels are guided (3 as published; x.shape[1] for all).
    """
    _check(x, model_out, noise, table, step, cfg, learn_sigma)
    model_out, noise = model_out.contiguous(), noise.contiguous()
    args = (x, model_out, noise, table.contiguous(), step.reshape(1), float(cfg_scale), int(guided_channels),
            bool(cfg), bool(learn_sigma), bool(clip), bool(ddim))
    if resolve_backend("sampler_step", backend, x.device.type, _kernels) == "triton":
        _sampler_step_op(*args)
    else:
        torch_sampler_step_(*args)
    return x


def sampler_step(x: Tensor, model_out: Tensor, noise: Tensor, table: Tensor, step: Tensor, **kwargs) -> Tensor:
    """Functional form of sampler_step_: returns the new x, leaves x untouched."""
    return sampler_step_(x.clone(memory_format=torch.contiguous_format), model_out, noise, table, step, **kwargs)
