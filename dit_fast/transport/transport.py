"""The interpolant training objective of SiT, with LightningDiT's extensions.

Transport.training_losses(model, x1, model_kwargs) draws, in this order (as the published code does):
    x0 = torch.randn_like(x1)                        (x1's device, its default generator)
    t  = torch.rand(N) on the CPU's global generator (uniform t), or
         NumPy's global generator (numpy.random.standard_normal, the logit-normal t of use_lognorm),
plus LightningDiT's optional partial-range coin (torch.rand(1)) and validation override, so a seeded
run reproduces the published one. Times are rescaled to [t0, t1] by check_interval.
"""
from __future__ import annotations

import enum

import numpy as np
import torch
import torch.nn.functional as F

from .paths import GVPPath, LinearPath, VPPath, expand_t_like_x

__all__ = ["ModelType", "PathType", "WeightType", "Transport", "mean_flat"]


class ModelType(enum.Enum):
    """What the network predicts."""

    NOISE = enum.auto()  # x0, the noise
    SCORE = enum.auto()  # grad log p_t(x)
    VELOCITY = enum.auto()  # d x_t / dt


class PathType(enum.Enum):
    LINEAR = enum.auto()
    GVP = enum.auto()
    VP = enum.auto()


class WeightType(enum.Enum):
    """Loss weighting of the noise and score objectives (the velocity loss is never weighted)."""

    NONE = enum.auto()
    VELOCITY = enum.auto()
    LIKELIHOOD = enum.auto()


PATH_CLASSES = {PathType.LINEAR: LinearPath, PathType.GVP: GVPPath, PathType.VP: VPPath}


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first."""
    return torch.mean(x, dim=list(range(1, x.dim())))


def _enum(value, kind: type, name: str):
    if not isinstance(value, kind):
        raise TypeError(f"{name} must be a {kind.__name__} member, got {value!r}")
    return value


class Transport:
    """An interpolant path, what the model predicts, and the loss weighting (see create_transport)."""

    def __init__(self, *, model_type, path_type, loss_type, train_eps, sample_eps, use_cosine_loss=False,
                 use_lognorm=False, partitial_train=None, partial_ratio=1.0, shift_lg=False):
        self.model_type = _enum(model_type, ModelType, "model_type")
        self.path_type = _enum(path_type, PathType, "path_type")
        self.loss_type = _enum(loss_type, WeightType, "loss_type")
        self.path_sampler = PATH_CLASSES[path_type]()
        self.train_eps = train_eps
        self.sample_eps = sample_eps
        self.use_cosine_loss = bool(use_cosine_loss)
        self.use_lognorm = bool(use_lognorm)
        if partitial_train is not None and (len(partitial_train) != 2 or not partitial_train[0] <= partitial_train[1]):
            raise ValueError(f"partitial_train must be a (low, high) pair of times, got {partitial_train!r}")
        self.partitial_train = partitial_train
        self.partial_ratio = partial_ratio
        self.shift_lg = bool(shift_lg)
        if self.shift_lg and partitial_train is not None:
            raise ValueError("shift_lg (a shifted logit-normal t) cannot be combined with partitial_train")

    # ---- time interval -------------------------------------------------------------------------------
    def check_interval(self, train_eps, sample_eps, *, diffusion_form="SBDM", sde=False, reverse=False,
                       eval=False, last_step_size=0.0):
        """[t0, t1] to train or sample on: the ends where a coefficient blows up are cut by eps
        (VP always at t = 1; Linear/GVP when the model predicts noise or score, or for an SDE)."""
        t0, t1 = 0, 1
        eps = sample_eps if eval else train_eps

        def end():
            return 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size

        if isinstance(self.path_sampler, VPPath):
            t1 = end()
        elif self.model_type != ModelType.VELOCITY or sde:
            # Linear / GVP: the drift's 1/t at t = 0 (SBDM) or the noise/score conversion needs a cut.
            t0 = eps if (diffusion_form == "SBDM" and sde) or self.model_type != ModelType.VELOCITY else 0
            t1 = end()
        if reverse:
            t0, t1 = 1 - t0, 1 - t1
        return t0, t1

    # ---- training ------------------------------------------------------------------------------------
    def sample_logit_normal(self, mu, sigma, size=1):
        """sigmoid(N(mu, sigma^2)) from NumPy's global generator, as float32 (LightningDiT's draw)."""
        z = np.random.standard_normal(size) * sigma + mu
        return torch.tensor(1 / (1 + np.exp(-z)), dtype=torch.float32)

    def sample_in_range(self, mu, sigma, target_size, range_min=0, range_max=0.5):
        """Logit-normal times kept only inside [range_min, range_max] (rejection, target_size at a time)."""
        kept = []
        while len(kept) < target_size:
            draw = self.sample_logit_normal(mu, sigma, size=target_size)
            kept.extend(draw[(draw >= range_min) & (draw <= range_max)])
        return torch.tensor(kept[:target_size])

    def sample(self, x1, sp_timesteps=None, shifted_mu=0):
        """(t [N], x0, x1): the noise and the times of one training batch."""
        x0 = torch.randn_like(x1)
        t0, t1 = self.check_interval(self.train_eps, self.sample_eps)
        n = x1.shape[0]
        part = self.partitial_train
        if not self.use_lognorm:
            if part is not None and torch.rand(1) < self.partial_ratio:
                t = torch.rand((n,)) * (part[1] - part[0]) + part[0]
            else:
                t = torch.rand((n,)) * (t1 - t0) + t0
        elif self.shift_lg:
            t = self.sample_logit_normal(shifted_mu, 1, size=n) * (t1 - t0) + t0
        elif part is not None and torch.rand(1) < self.partial_ratio:
            t = self.sample_in_range(0, 1, n, range_min=part[0], range_max=part[1])
        else:
            t = self.sample_logit_normal(0, 1, size=n) * (t1 - t0) + t0
        if sp_timesteps is not None:  # validation: uniform t in a given range, drawn after the rest
            t = torch.rand((n,)) * (sp_timesteps[1] - sp_timesteps[0]) + sp_timesteps[0]
        return t.to(x1), x0, x1

    def training_losses(self, model, x1, model_kwargs=None, sp_timesteps=None, shifted_mu=0):
        """{'loss': [N], 'pred': model output, and 'cos_loss': [N] with use_cosine_loss (velocity only)}."""
        if not isinstance(x1, torch.Tensor) or x1.dim() < 2 or not x1.is_floating_point():
            raise ValueError(f"x1 must be a floating-point data batch [N, ...], got "
                             f"{x1.dtype if isinstance(x1, torch.Tensor) else type(x1).__name__}"
                             f"{list(x1.shape) if isinstance(x1, torch.Tensor) else ''}")
        model_kwargs = {} if model_kwargs is None else model_kwargs
        t, x0, x1 = self.sample(x1, sp_timesteps, shifted_mu)
        t, xt, ut = self.path_sampler.plan(t, x0, x1)
        out = model(xt, t, **model_kwargs)
        if not isinstance(out, torch.Tensor) or out.shape != xt.shape:
            raise ValueError(f"the model must return a tensor shaped like x_t {list(xt.shape)}, got "
                             f"{list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
        terms = {"pred": out}
        if self.model_type == ModelType.VELOCITY:
            terms["loss"] = mean_flat((out - ut) ** 2)
            if self.use_cosine_loss:
                terms["cos_loss"] = mean_flat(1 - F.cosine_similarity(out, ut, dim=1))
            return terms
        _, drift_var = self.path_sampler.compute_drift(xt, t)
        sigma_t, _ = self.path_sampler.compute_sigma_t(expand_t_like_x(t, xt))
        if self.loss_type == WeightType.VELOCITY:
            weight = (drift_var / sigma_t) ** 2
        elif self.loss_type == WeightType.LIKELIHOOD:
            weight = drift_var / (sigma_t ** 2)
        else:
            weight = 1
        if self.model_type == ModelType.NOISE:
            terms["loss"] = mean_flat(weight * ((out - x0) ** 2))
        else:  # score: s = -x0 / sigma_t
            terms["loss"] = mean_flat(weight * ((out * sigma_t + x0) ** 2))
        return terms

    # ---- sampling fields -----------------------------------------------------------------------------
    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, I) per sample."""
        n = torch.tensor(z.shape[1:]).prod()
        return -n / 2.0 * np.log(2 * np.pi) - torch.sum(z ** 2, dim=tuple(range(1, z.dim()))) / 2.0

    def get_drift(self):
        """drift(x, t, model, **kwargs): the probability-flow ODE field dx/dt for this model type."""
        path = self.path_sampler

        def drift(x, t, model, **model_kwargs):
            if self.model_type == ModelType.VELOCITY:
                out = model(x, t, **model_kwargs)
            else:
                mean, var = path.compute_drift(x, t)
                if self.model_type == ModelType.NOISE:
                    sigma_t, _ = path.compute_sigma_t(expand_t_like_x(t, x))
                    score = model(x, t, **model_kwargs) / -sigma_t
                else:
                    score = model(x, t, **model_kwargs)
                out = -mean + var * score
            if out.shape != x.shape:
                raise ValueError(f"the drift must be shaped like x {list(x.shape)}, got {list(out.shape)} "
                                 "(does the model return more channels than it takes?)")
            return out

        return drift

    def get_score(self):
        """score(x, t, model, **kwargs): grad log p_t(x) from the model's prediction."""
        path = self.path_sampler
        if self.model_type == ModelType.NOISE:
            return lambda x, t, model, **kw: model(x, t, **kw) / -path.compute_sigma_t(expand_t_like_x(t, x))[0]
        if self.model_type == ModelType.SCORE:
            return lambda x, t, model, **kw: model(x, t, **kw)
        return lambda x, t, model, **kw: path.get_score_from_velocity(model(x, t, **kw), x, t)
