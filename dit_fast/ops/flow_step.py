"""The fused flow-model sampling update as a torch op, with a plain-PyTorch twin and one entry point.

    flow_step_(x, xin, model_out, k, noise, table, step, stage=..., ...)   # x, xin (and k) updated in place

The math and the table's columns are documented in kernels/flow_step.py; dit_fast.flow_sampling builds
the table. backend: "triton" (CUDA; CPU tensors only under TRITON_INTERPRET=1), "torch" (anywhere),
"auto" (Triton on CUDA when it imports, else torch).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .step_dispatch import check_contiguous, check_inputs, check_noise_table_step, resolve_backend, shape_of

__all__ = ["flow_step_", "torch_flow_step_", "NUM_COLS", "STAGES", "PREDICTIONS"]

NUM_COLS = 14
STAGES = {"noise": 0, "euler": 1, "heun1": 2, "heun2": 3, "tweedie": 4}
PREDICTIONS = {"velocity": 0, "score": 1, "noise": 2}


def _kernels():
    from ..kernels import flow_step as K  # imports triton: only when the Triton path is used

    return K


@torch.library.custom_op("dit_fast::flow_step_", mutates_args=("x", "xin", "k"))
def _flow_step_op(
    x: Tensor, xin: Tensor, model_out: Tensor, k: Tensor, noise: Tensor, table: Tensor, step: Tensor,
    rows_per_step: int, row_offset: int, cfg_scale: float, guided_channels: int, cfg: bool, stage: int,
    prediction: int, use_score: bool, sde: bool,
) -> None:
    _kernels().flow_step_(x, xin, model_out, k, noise, table, step, rows_per_step, row_offset, cfg_scale,
                          guided_channels, cfg, stage, prediction, use_score, sde)


@_flow_step_op.register_fake
def _(x, xin, model_out, k, noise, table, step, rows_per_step, row_offset, cfg_scale, guided_channels, cfg, stage,
      prediction, use_score, sde):
    return None


def torch_flow_step_(
    x: Tensor, xin: Tensor, model_out: Tensor, k: Tensor, noise: Tensor, table: Tensor, step: Tensor,
    rows_per_step: int, row_offset: int, cfg_scale: float, guided_channels: int, cfg: bool, stage: int,
    prediction: int, use_score: bool, sde: bool,
) -> None:
    """The same update in plain PyTorch, in the same order of operations."""
    n, C = x.shape[:2]
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    idx = step.reshape(1).long() * rows_per_step + row_offset
    row = table.index_select(0, idx)[0].to(cdt)  # stays on the device: no sync
    xc = x.to(cdt)
    if stage == STAGES["noise"]:
        new = xc + row[8] * (noise[:n].to(cdt) * row[9])
    else:
        g = model_out[:n, :C]
        if cfg:
            gc = min(guided_channels, C)
            cond, unc = model_out[:n, :gc].to(cdt), model_out[n: 2 * n, :gc].to(cdt)
            guided = torch.where(row[12] != 0, unc + cfg_scale * (cond - unc), cond)
            g = torch.cat([guided, model_out[:n, gc:C].to(cdt)], dim=1)
        g = g.to(cdt)
        xe = xin[:n].to(cdt) if stage == STAGES["heun2"] else xc
        if prediction == PREDICTIONS["velocity"]:
            drift = g
            if use_score or stage == STAGES["tweedie"]:
                score = (row[3] * g - xe) / row[4]
        else:
            score = g / row[5] if prediction == PREDICTIONS["noise"] else g
            drift = row[1] * xe + row[2] * score
        if use_score:
            drift = drift + row[6] * score
        dt = row[7]
        if stage == STAGES["euler"]:
            new = xc + dt * drift
            if sde:
                new = new + row[8] * (noise[:n].to(cdt) * row[9])
        elif stage == STAGES["heun1"]:
            k.copy_(drift)
            new = xc + dt * drift
        elif stage == STAGES["heun2"]:
            kc = k.to(cdt)
            new = xc + row[13] * (kc + drift) if sde else xc + dt * (kc * 0.5 + drift * 0.5)
        else:
            new = xc / row[10] + row[11] * score
    if stage != STAGES["heun1"]:
        x.copy_(new)
    xin[:n].copy_(new)
    if cfg:
        xin[n: 2 * n].copy_(new)


def _check(x, xin, model_out, k, noise, table, step, cfg, stage, prediction) -> None:
    if stage not in STAGES.values():
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if prediction not in PREDICTIONS.values():
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    check_inputs(x, (("x", x), ("xin", xin), ("model_out", model_out), ("k", k), ("noise", noise), ("table", table),
                     ("step", step)))
    n, C, H, W = x.shape
    B = 2 * n if cfg else n
    if list(xin.shape) != [B, C, H, W] or xin.dtype != x.dtype:
        raise ValueError(f"xin (the model's input) must be a {x.dtype} tensor {[B, C, H, W]}, got "
                         f"{xin.dtype} {shape_of(xin)}")
    if (model_out.dim() != 4 or model_out.shape[0] != B or model_out.shape[1] < C
            or list(model_out.shape[2:]) != [H, W] or not model_out.is_floating_point()):
        raise ValueError(f"model_out must be a float tensor [{B}, >= {C}, {H}, {W}]"
                         f"{' ([cond; uncond] halves)' if cfg else ''}, got {model_out.dtype} {shape_of(model_out)}")
    if list(k.shape) != [n, C, H, W] or k.dtype != x.dtype:
        raise ValueError(f"k (the Heun predictor's slope) must be a {x.dtype} tensor {[n, C, H, W]}, got "
                         f"{k.dtype} {shape_of(k)}")
    check_noise_table_step(x, noise, table, step, NUM_COLS, "rows")
    check_contiguous(("x", x), ("xin", xin), ("k", k))


def flow_step_(
    x: Tensor, xin: Tensor, model_out: Tensor, k: Tensor, noise: Tensor, table: Tensor, step: Tensor, *,
    stage: str, prediction: str = "velocity", rows_per_step: int = 1, row_offset: int = 0, cfg_scale: float = 1.0,
    guided_channels: int = 3, cfg: bool = False, use_score: bool = False, sde: bool = False, backend: str = "auto",
) -> Tensor:
    """One update of a flow sampler (see kernels/flow_step.py); x, xin and k are updated in place, x returned.

    stage: one of STAGES; prediction: what the model predicts (one of PREDICTIONS); the table row is
    step * rows_per_step + row_offset; cfg: model_out holds [cond; uncond] halves, the first
    guided_channels channels are guided where the row's CFG column is non-zero; use_score: the SDE's drift
    (probability-flow drift + w(t) score); sde: Euler adds the row's noise term, Heun's corrector uses the
    SDE form.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {tuple(STAGES)}, got {stage!r}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {tuple(PREDICTIONS)}, got {prediction!r}")
    stage_i, pred_i = STAGES[stage], PREDICTIONS[prediction]
    _check(x, xin, model_out, k, noise, table, step, cfg, stage_i, pred_i)
    args = (x, xin, model_out.contiguous(), k, noise.contiguous(), table.contiguous(), step.reshape(1),
            int(rows_per_step), int(row_offset), float(cfg_scale), int(guided_channels), bool(cfg), stage_i, pred_i,
            bool(use_score), bool(sde))
    if resolve_backend("flow_step", backend, x.device.type, _kernels) == "triton":
        _flow_step_op(*args)
    else:
        torch_flow_step_(*args)
    return x
