"""One flow-model sampling update in one kernel: CFG combine, the drift of the ODE or SDE from the model's
prediction, and the integrator's update (Euler, Heun stages, noise, Tweedie).

Per element of the state x [n, C, H, W] (every tensor contiguous); the scalars come from row
`step[0] * rows_per_step + row_offset` of a [rows, NUM_COLS] table in device memory (no host wait, so
a CUDA graph replays it with the step counter advanced on the device):

    g     = out[b, c]; with CFG, for c < n_guided and CFG_ON: out[n+b, c] + s (out[b, c] - out[n+b, c])
    xe    = the point the model saw: x (xin[b] for the second Heun stage)
    score = (R g - xe) / VAR (velocity model) | g / NS (noise model, NS = -sigma_t) | g (score model)
    drift = g (velocity) | M xe + V score (noise, score);  with USE_SCORE: drift + D score (the SDE's)
    NOISE:   x = x + NA (w NB)                                   (SDE Heun's first half-step)
    EULER:   x = x + DT drift  (+ NA (w NB) with SDE)
    HEUN1:   k = drift; xin = x + DT k                            (the predictor; x unchanged)
    HEUN2:   x = x + DT (k 0.5 + drift 0.5)  (ODE, torchdiffeq's heun2) | x + HALF_DT (k + drift)  (SDE)
    TWEEDIE: x = x / ALPHA + S2A score
The new x is also written to both halves of the model-input buffer xin [B, C, H, W] (B = 2n with CFG).
Products and sums are formed in the published order, so float32 results match the published
(eager PyTorch) sampler bit for bit where the table's scalars do. Math in float32, or float64 for a
float64 state.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sampler_layout import BLOCK, grid, layout

# Columns of the per-evaluation table.
COL_T = 0  # the model's t (float32 values, as the published loop passes them)
COL_M = 1  # -drift mean / x: d log alpha / dt (Linear, GVP) or beta / 2 (VP)
COL_V = 2  # drift variance (multiplies the score in the probability-flow drift)
COL_R = 3  # alpha / d alpha (velocity -> score)
COL_VAR = 4  # sigma^2 - R d sigma sigma (velocity -> score)
COL_NS = 5  # -sigma_t (noise -> score)
COL_D = 6  # diffusion w(t) in the SDE drift
COL_DT = 7  # step size (the last step's size for a last step)
COL_NA = 8  # sqrt(2 w(t))
COL_NB = 9  # sqrt(dt)
COL_ALPHA = 10
COL_S2A = 11  # sigma^2 / alpha
COL_CFG = 12  # 1.0: guide this evaluation, 0.0: conditional output only (CFG interval)
COL_HALF_DT = 13
NUM_COLS = 14

STAGE_NOISE, STAGE_EULER, STAGE_HEUN1, STAGE_HEUN2, STAGE_TWEEDIE = range(5)
PRED_VELOCITY, PRED_SCORE, PRED_NOISE = range(3)


@triton.jit
def _flow_step_kernel(
    x_ptr, xin_ptr, out_ptr, k_ptr, noise_ptr, table_ptr, step_ptr,
    numel, chw, hw, out_row, uncond_offset, rows_per_step, row_offset, cfg_scale,
    N_GUIDED: tl.constexpr, CFG: tl.constexpr, STAGE: tl.constexpr, PRED: tl.constexpr, USE_SCORE: tl.constexpr,
    SDE: tl.constexpr, F64: tl.constexpr, NCOLS: tl.constexpr, BLOCK: tl.constexpr,
):
    cdt = tl.float64 if F64 else tl.float32
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    row = table_ptr + (tl.load(step_ptr).to(tl.int64) * rows_per_step + row_offset) * NCOLS
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(cdt)

    if STAGE == 0:  # NOISE
        w = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(cdt)
        new = x + tl.load(row + 8).to(cdt) * (w * tl.load(row + 9).to(cdt))
    else:
        b = offs // chw
        r = offs - b * chw
        c = r // hw
        o = b * out_row + r
        g = tl.load(out_ptr + o, mask=mask, other=0.0).to(cdt)
        if CFG:
            guide = c < N_GUIDED
            unc = tl.load(out_ptr + o + uncond_offset, mask=mask & guide, other=0.0).to(cdt)
            cfg_on = tl.load(row + 12) != 0  # outside the CFG interval: the conditional output as is
            g = tl.where(guide, tl.where(cfg_on, unc + cfg_scale * (g - unc), g), g)
        if STAGE == 3:
            xe = tl.load(xin_ptr + offs, mask=mask, other=0.0).to(cdt)
        else:
            xe = x
        if PRED == 0:
            drift = g
            if USE_SCORE or STAGE == 4:  # the velocity -> score conversion divides by 0 at t = 1: only when used
                score = (tl.load(row + 3).to(cdt) * g - xe) / tl.load(row + 4).to(cdt)
        else:
            if PRED == 2:
                score = g / tl.load(row + 5).to(cdt)
            else:
                score = g
            drift = tl.load(row + 1).to(cdt) * xe + tl.load(row + 2).to(cdt) * score
        if USE_SCORE:
            drift = drift + tl.load(row + 6).to(cdt) * score
        dt = tl.load(row + 7).to(cdt)
        if STAGE == 1:  # EULER
            new = x + dt * drift
            if SDE:
                w = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(cdt)
                new = new + tl.load(row + 8).to(cdt) * (w * tl.load(row + 9).to(cdt))
        elif STAGE == 2:  # HEUN1: predictor into xin, k saved, x unchanged
            tl.store(k_ptr + offs, drift, mask=mask)
            new = x + dt * drift
        elif STAGE == 3:  # HEUN2
            k = tl.load(k_ptr + offs, mask=mask, other=0.0).to(cdt)
            if SDE:
                new = x + tl.load(row + 13).to(cdt) * (k + drift)
            else:
                new = x + dt * (k * 0.5 + drift * 0.5)
        else:  # TWEEDIE
            new = x / tl.load(row + 10).to(cdt) + tl.load(row + 11).to(cdt) * score

    new = new.to(x_ptr.dtype.element_ty)
    if STAGE != 2:
        tl.store(x_ptr + offs, new, mask=mask)
    tl.store(xin_ptr + offs, new, mask=mask)
    if CFG:
        tl.store(xin_ptr + numel + offs, new, mask=mask)


def flow_step_(
    x: torch.Tensor, xin: torch.Tensor, model_out: torch.Tensor, k: torch.Tensor, noise: torch.Tensor,
    table: torch.Tensor, step: torch.Tensor, rows_per_step: int, row_offset: int, cfg_scale: float,
    guided_channels: int, cfg: bool, stage: int, prediction: int, use_score: bool, sde: bool,
) -> None:
    """Launch on well-formed contiguous inputs (checked by dit_fast.ops.flow_step); x, xin, k updated in place."""
    if x.numel() == 0:
        return
    _flow_step_kernel[grid(x)](
        x, xin, model_out, k, noise, table, step,
        *layout(x, model_out), int(rows_per_step), int(row_offset), float(cfg_scale),
        N_GUIDED=min(int(guided_channels), x.shape[1]), CFG=bool(cfg), STAGE=int(stage), PRED=int(prediction),
        USE_SCORE=bool(use_score), SDE=bool(sde), F64=x.dtype == torch.float64, NCOLS=NUM_COLS, BLOCK=BLOCK,
    )
