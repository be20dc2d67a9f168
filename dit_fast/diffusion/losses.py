"""Likelihood terms of the variational bound (Ho et al. 2020; Nichol & Dhariwal 2021)."""
from __future__ import annotations

import math

import torch

__all__ = [
    "normal_kl",
    "approx_standard_normal_cdf",
    "continuous_gaussian_log_likelihood",
    "discretized_gaussian_log_likelihood",
    "mean_flat",
]

_LOG_SQRT_2PI = math.log(math.sqrt(2.0 * math.pi))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dim but the batch dim."""
    return x.mean(dim=list(range(1, x.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats. Scalars broadcast."""
    tensor = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)), None)
    if tensor is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    logvar1, logvar2 = (v if isinstance(v, torch.Tensor) else torch.tensor(v).to(tensor) for v in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF used by the published likelihood code."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def continuous_gaussian_log_likelihood(x: torch.Tensor, *, means: torch.Tensor,
                                       log_scales: torch.Tensor) -> torch.Tensor:
    """Standard-normal log density of z = (x - means) / exp(log_scales), in nats, elementwise (shapes broadcast).

    As published, this is the density of the standardized z, not of x: it leaves out the -log_scales
    term of log N(x; means, exp(log_scales)^2), so the two differ by log_scales wherever the scale is not 1.
    """
    z = (x - means) * torch.exp(-log_scales)
    return -(z**2) / 2 - _LOG_SQRT_2PI


def discretized_gaussian_log_likelihood(x: torch.Tensor, *, means: torch.Tensor,
                                        log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) for data x in [-1, 1] quantized to 256 bins of width 2/255, under N(means, exp(log_scales)^2).

    The bin of x is [x - 1/255, x + 1/255]; the outermost bins extend to -inf / +inf. Returns
    log-probabilities in nats, shaped like x.
    """
    if x.shape != means.shape or x.shape != log_scales.shape:
        raise ValueError(
            f"x, means and log_scales must have one shape, got {list(x.shape)}, {list(means.shape)}, "
            f"{list(log_scales.shape)}"
        )
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
