"""Interpolant paths x_t = alpha_t x1 + sigma_t x0 between noise x0 (t = 0) and data x1 (t = 1).

The three paths of SiT (Ma et al. 2024), with the method names of the published API so that code
written against it runs unchanged:

    Linear  alpha_t = t,                sigma_t = 1 - t
    GVP     alpha_t = sin(pi t / 2),    sigma_t = cos(pi t / 2)
    VP      alpha_t = exp(m(t)),        sigma_t = sqrt(1 - exp(2 m(t))),
            m(t) = -(1 - t)^2 (b_max - b_min) / 4 - (1 - t) b_min / 2   (b_min 0.1, b_max 20)

Every method takes t of shape [N] (one time per sample) unless it says otherwise. The arithmetic
follows the published order of operations, so float32 results agree bit for bit where torch's
kernels do; the published names (ICPlan, GVPCPlan, VPCPlan) are aliases.
"""
from __future__ import annotations

import math

import torch

__all__ = ["LinearPath", "GVPPath", "VPPath", "ICPlan", "GVPCPlan", "VPCPlan", "expand_t_like_x", "DIFFUSION_FORMS"]

# "inccreasing-decreasing" is the published key (the published command line offers the correct spelling,
# which the published code then rejects); both are accepted here.
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing",
                   "inccreasing-decreasing")


def expand_t_like_x(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t [N] viewed as [N, 1, ..., 1] to broadcast against x [N, ...]."""
    return t.view(t.size(0), *([1] * (x.dim() - 1)))


class LinearPath:
    """alpha_t = t, sigma_t = 1 - t (SiT's "Linear", the rectified-flow interpolant)."""

    def __init__(self, sigma: float = 0.0):
        self.sigma = sigma  # unused; kept for the published constructor signature

    # Coefficients and their time derivatives: each returns (value, d/dt value).
    def compute_alpha_t(self, t):
        return t, 1

    def compute_sigma_t(self, t):
        return 1 - t, -1

    def compute_d_alpha_alpha_ratio_t(self, t):
        return 1 / t

    def compute_drift(self, x, t):
        """(drift mean, drift variance) of the SDE whose marginals follow the path, score-parametrized:
        the probability-flow drift is -mean + var * score."""
        t = expand_t_like_x(t, x)
        ratio = self.compute_d_alpha_alpha_ratio_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        var = ratio * (sigma_t ** 2) - sigma_t * d_sigma_t
        return -(ratio * x), var

    def compute_diffusion(self, x, t, form: str = "constant", norm: float = 1.0):
        """The diffusion coefficient w(t) of the sampling SDE (broadcastable against x)."""
        t = expand_t_like_x(t, x)
        if form == "constant":
            # The published code returns the bare float, which its SDE step then cannot take a sqrt of.
            return torch.full_like(t, norm)
        if form == "SBDM":
            return norm * self.compute_drift(x, t)[1]
        if form == "sigma":
            return norm * self.compute_sigma_t(t)[0]
        if form == "linear":
            return norm * (1 - t)
        if form == "decreasing":
            return 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2
        if form in ("increasing-decreasing", "inccreasing-decreasing"):
            return norm * torch.sin(math.pi * t) ** 2
        raise ValueError(f"diffusion_form must be one of {DIFFUSION_FORMS}, got {form!r}")

    # Conversions between what a model predicts (velocity, score, noise) at (x, t).
    def get_score_from_velocity(self, velocity, x, t):
        t = expand_t_like_x(t, x)
        alpha_t, d_alpha_t = self.compute_alpha_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        r = alpha_t / d_alpha_t
        var = sigma_t ** 2 - r * d_sigma_t * sigma_t
        return (r * velocity - x) / var

    def get_noise_from_velocity(self, velocity, x, t):
        t = expand_t_like_x(t, x)
        alpha_t, d_alpha_t = self.compute_alpha_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        r = alpha_t / d_alpha_t
        var = r * d_sigma_t - sigma_t
        return (r * velocity - x) / var

    def get_velocity_from_score(self, score, x, t):
        t = expand_t_like_x(t, x)
        mean, var = self.compute_drift(x, t)
        return var * score - mean

    # Training pairs.
    def compute_mu_t(self, t, x0, x1):
        t = expand_t_like_x(t, x1)
        alpha_t, _ = self.compute_alpha_t(t)
        sigma_t, _ = self.compute_sigma_t(t)
        return alpha_t * x1 + sigma_t * x0

    def compute_xt(self, t, x0, x1):
        return self.compute_mu_t(t, x0, x1)

    def compute_ut(self, t, x0, x1, xt):
        """The conditional velocity d x_t / dt."""
        t = expand_t_like_x(t, x1)
        _, d_alpha_t = self.compute_alpha_t(t)
        _, d_sigma_t = self.compute_sigma_t(t)
        return d_alpha_t * x1 + d_sigma_t * x0

    def plan(self, t, x0, x1):
        """(t, x_t, u_t) for a batch of noise x0 and data x1."""
        xt = self.compute_xt(t, x0, x1)
        return t, xt, self.compute_ut(t, x0, x1, xt)


class GVPPath(LinearPath):
    """alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2): variance preserving, alpha^2 + sigma^2 = 1."""

    def compute_alpha_t(self, t):
        return torch.sin(t * math.pi / 2), math.pi / 2 * torch.cos(t * math.pi / 2)

    def compute_sigma_t(self, t):
        return torch.cos(t * math.pi / 2), -math.pi / 2 * torch.sin(t * math.pi / 2)

    def compute_d_alpha_alpha_ratio_t(self, t):
        return math.pi / (2 * torch.tan(t * math.pi / 2))


class VPPath(LinearPath):
    """The VP-SDE of score-based diffusion in the interpolant's time (t = 1 is data):
    beta(t) = b_min + (1 - t) (b_max - b_min)."""

    def __init__(self, sigma_min: float = 0.1, sigma_max: float = 20.0):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def log_mean_coeff(self, t):
        return -0.25 * ((1 - t) ** 2) * (self.sigma_max - self.sigma_min) - 0.5 * (1 - t) * self.sigma_min

    def d_log_mean_coeff(self, t):
        return 0.5 * (1 - t) * (self.sigma_max - self.sigma_min) + 0.5 * self.sigma_min

    def compute_alpha_t(self, t):
        alpha_t = torch.exp(self.log_mean_coeff(t))
        return alpha_t, alpha_t * self.d_log_mean_coeff(t)

    def compute_sigma_t(self, t):
        two_m = 2 * self.log_mean_coeff(t)
        sigma_t = torch.sqrt(1 - torch.exp(two_m))
        d_sigma_t = torch.exp(two_m) * (2 * self.d_log_mean_coeff(t)) / (-2 * sigma_t)
        return sigma_t, d_sigma_t

    def compute_d_alpha_alpha_ratio_t(self, t):
        return self.d_log_mean_coeff(t)  # d alpha / alpha without dividing two small numbers

    def compute_drift(self, x, t):
        t = expand_t_like_x(t, x)
        beta_t = self.sigma_min + (1 - t) * (self.sigma_max - self.sigma_min)
        return -0.5 * beta_t * x, beta_t / 2


# The published class names.
ICPlan, GVPCPlan, VPCPlan = LinearPath, GVPPath, VPPath
