"""The published package's module name for the likelihood terms (`from diffusion.diffusion_utils import ...`)."""
from __future__ import annotations

from .losses import (
    approx_standard_normal_cdf,
    continuous_gaussian_log_likelihood,
    discretized_gaussian_log_likelihood,
    normal_kl,
)

__all__ = [
    "normal_kl",
    "approx_standard_normal_cdf",
    "continuous_gaussian_log_likelihood",
    "discretized_gaussian_log_likelihood",
]
