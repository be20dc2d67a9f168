"""One diffusion sampling step in one kernel: CFG combine, learned variance, x0, posterior mean, noise.

Per element of x [n, C, H, W] (flattened; every tensor contiguous):
    eps  = out[b, c]                                            (the model's noise prediction)
    CFG: the model ran on [x; x] with [labels; null labels]; for c < n_guided:
         eps = out[n+b, c] + s * (out[b, c] - out[n+b, c])      (uncond + s (cond - uncond))
    v    = out[b, C + c]  (learned sigma)  ->  log var = (v+1)/2 log beta_t + (1-v)/2 log beta~_t
    x0   = sqrt(1/abar_t) x - sqrt(1/abar_t - 1) eps, optionally clamped to [-1, 1]
    DDPM: x' = coef1 x0 + coef2 x + nonzero exp(log var / 2) noise
    DDIM: eps' = (sqrt(1/abar_t) x - x0) / sqrt(1/abar_t - 1);  x' = c_x0 x0 + c_eps eps' + nonzero sigma noise
x' overwrites x in place. The step's scalars are row `step[0]` of a [num_steps, NUM_COLS] table in
device memory, read by the kernel itself: the launch never waits on the host, so a CUDA graph can
replay it with a step counter advanced on the device.

noise [>= n, C, H, W]: only its first n rows are used (the published CFG loop draws noise for both
halves of the doubled batch and discards the second). Math in float32, or float64 when x is float64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sampler_layout import BLOCK, grid, layout

# Columns of the per-step table (one row per sampling step, in loop order).
COL_SQRT_RECIP_AC = 0
COL_SQRT_RECIPM1_AC = 1
COL_COEF1 = 2
COL_COEF2 = 3
COL_MIN_LOG = 4  # log beta~_t (clipped); the fixed log variance when sigma is not learned
COL_MAX_LOG = 5  # log beta_t
COL_NONZERO = 6  # 0.0 at the last step (t = 0), else 1.0
COL_DDIM_X0 = 7  # sqrt(abar_prev)
COL_DDIM_EPS = 8  # sqrt(1 - abar_prev - sigma^2)
COL_DDIM_SIGMA = 9  # eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev)
NUM_COLS = 10


@triton.jit
def _sampler_step_kernel(
    x_ptr, out_ptr, noise_ptr, table_ptr, step_ptr,
    numel, chw, hw, out_row, uncond_offset, cfg_scale,
    C: tl.constexpr, N_GUIDED: tl.constexpr, CFG: tl.constexpr, LEARN_SIGMA: tl.constexpr,
    CLIP: tl.constexpr, DDIM: tl.constexpr, F64: tl.constexpr, NCOLS: tl.constexpr, BLOCK: tl.constexpr,
):
    cdt = tl.float64 if F64 else tl.float32
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    b = offs // chw
    r = offs - b * chw  # offset inside one sample's C*H*W
    c = r // hw
    o = b * out_row + r  # out[b, c] in the [B_out, C_out, H, W] model output

    row = table_ptr + tl.load(step_ptr).to(tl.int64) * NCOLS
    k_recip = tl.load(row + 0).to(cdt)
    k_recipm1 = tl.load(row + 1).to(cdt)

    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(cdt)
    eps = tl.load(out_ptr + o, mask=mask, other=0.0).to(cdt)
    if CFG:
        unc = tl.load(out_ptr + o + uncond_offset, mask=mask & (c < N_GUIDED), other=0.0).to(cdt)
        eps = tl.where(c < N_GUIDED, unc + cfg_scale * (eps - unc), eps)

    x0 = k_recip * x - k_recipm1 * eps
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
    nonzero = tl.load(row + 6).to(cdt)
    noise = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(cdt)
    if DDIM:
        eps2 = (k_recip * x - x0) / k_recipm1
        new = x0 * tl.load(row + 7).to(cdt) + tl.load(row + 8).to(cdt) * eps2
        new = new + nonzero * tl.load(row + 9).to(cdt) * noise
    else:
        min_log = tl.load(row + 4).to(cdt)
        if LEARN_SIGMA:
            v = tl.load(out_ptr + o + C * hw, mask=mask, other=0.0).to(cdt)
            frac = (v + 1) / 2
            logvar = frac * tl.load(row + 5).to(cdt) + (1 - frac) * min_log
        else:
            logvar = min_log
        mean = tl.load(row + 2).to(cdt) * x0 + tl.load(row + 3).to(cdt) * x
        new = mean + nonzero * tl.exp(0.5 * logvar) * noise
    tl.store(x_ptr + offs, new.to(x_ptr.dtype.element_ty), mask=mask)


def sampler_step_(
    x: torch.Tensor, model_out: torch.Tensor, noise: torch.Tensor, table: torch.Tensor, step: torch.Tensor,
    cfg_scale: float, guided_channels: int, cfg: bool, learn_sigma: bool, clip: bool, ddim: bool,
) -> None:
    """Launch on well-formed contiguous inputs (checked by dit_fast.ops.sampler_step); x is updated in place."""
    if x.numel() == 0:
        return
    C = x.shape[1]
    _sampler_step_kernel[grid(x)](
        x, model_out, noise, table, step,
        *layout(x, model_out), float(cfg_scale),
        C=C, N_GUIDED=min(int(guided_channels), C), CFG=bool(cfg), LEARN_SIGMA=bool(learn_sigma),
        CLIP=bool(clip), DDIM=bool(ddim), F64=x.dtype == torch.float64, NCOLS=NUM_COLS, BLOCK=BLOCK,
    )
