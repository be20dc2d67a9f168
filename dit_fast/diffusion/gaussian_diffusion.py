"""The published package's module name for the diffusion class (`from diffusion.gaussian_diffusion import ...`)."""
from __future__ import annotations

from .gaussian import GaussianDiffusion, LossType, ModelMeanType, ModelVarType
from .losses import mean_flat
from .schedules import betas_for_alpha_bar, get_named_beta_schedule

__all__ = [
    "GaussianDiffusion",
    "ModelMeanType",
    "ModelVarType",
    "LossType",
    "mean_flat",
    "get_named_beta_schedule",
    "betas_for_alpha_bar",
]
