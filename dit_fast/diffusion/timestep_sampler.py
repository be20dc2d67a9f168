"""Distributions over training timesteps: uniform, and importance sampling by each step's loss.

The published package's samplers (Nichol & Dhariwal 2021, section 3.3: sampling t with probability
proportional to sqrt(E[L_t^2]) lowers the variance of the L_vb objective). Same names, signatures and
random draws: `sample` draws the indices with NumPy's global generator (`np.random.choice` over the
normalized weights), so `np.random.seed(s)` gives the published timesteps and weights.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "ScheduleSampler",
    "UniformSampler",
    "LossAwareSampler",
    "LossSecondMomentResampler",
    "create_named_schedule_sampler",
    "SCHEDULE_SAMPLERS",
]

SCHEDULE_SAMPLERS = ("uniform", "loss-second-moment")


def create_named_schedule_sampler(name: str, diffusion) -> ScheduleSampler:
    """The sampler called `name` ("uniform" or "loss-second-moment") over diffusion's timesteps."""
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    # NotImplementedError, as published, so that callers catching it keep working.
    raise NotImplementedError(f"unknown schedule sampler: name must be one of {SCHEDULE_SAMPLERS}, got {name!r}")


def _num_timesteps(diffusion) -> int:
    steps = getattr(diffusion, "num_timesteps", None)
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise TypeError(f"diffusion must be a diffusion with a positive int num_timesteps, got {steps!r} "
                        f"from {type(diffusion).__name__}")
    return int(steps)


class ScheduleSampler(ABC):
    """A distribution over timesteps; `sample` returns importance weights that keep the objective unbiased."""

    @abstractmethod
    def weights(self) -> np.ndarray:
        """One positive weight per diffusion step (not necessarily normalized)."""

    def sample(self, batch_size: int, device):
        """(timesteps [batch_size] int64, weights [batch_size] float32) on `device`.

        weights = 1 / (T p[t]): multiplying each sample's loss by its weight keeps the expectation of the
        uniform-t objective.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 0:
            raise ValueError(f"batch_size must be a non-negative int, got {batch_size!r}")
        w = np.asarray(self.weights(), dtype=np.float64)
        if w.ndim != 1 or len(w) == 0 or not np.isfinite(w).all() or (w <= 0).any():
            raise ValueError(f"{type(self).__name__}.weights() must be a non-empty 1-D array of positive finite "
                             f"values, got shape {w.shape} with min {w.min() if w.size else None}")
        p = w / np.sum(w)
        indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        indices = torch.from_numpy(indices_np).long().to(device)
        weights_np = 1 / (len(p) * p[indices_np])
        weights = torch.from_numpy(weights_np).float().to(device)
        return indices, weights


class UniformSampler(ScheduleSampler):
    """Every timestep equally likely; all weights 1."""

    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([_num_timesteps(diffusion)])

    def weights(self) -> np.ndarray:
        return self._weights


class LossAwareSampler(ScheduleSampler):
    """A sampler whose weights follow the losses seen at each timestep."""

    def update_with_local_losses(self, local_ts: torch.Tensor, local_losses: torch.Tensor) -> None:
        """Record this rank's (timestep, loss) pairs; under torch.distributed every rank gets every rank's.

        Call it on every rank with that rank's batch (batch sizes may differ between ranks); all ranks then
        apply the same updates in the same order, so their weights stay identical. Without an initialized
        process group the local pairs are all the pairs.
        """
        if not isinstance(local_ts, torch.Tensor) or local_ts.dim() != 1 or local_ts.is_floating_point():
            raise ValueError("local_ts must be a 1-D integer tensor of timesteps, got "
                             f"{_describe(local_ts)}")
        if not isinstance(local_losses, torch.Tensor) or local_losses.shape != local_ts.shape:
            raise ValueError(f"local_losses must be a 1-D tensor with one loss per timestep {list(local_ts.shape)}, "
                             f"got {_describe(local_losses)}")
        local_losses = local_losses.detach()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            self.update_with_all_losses(local_ts.tolist(), local_losses.tolist())
            return
        world = dist.get_world_size()
        sizes = [torch.zeros(1, dtype=torch.int32, device=local_ts.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([len(local_ts)], dtype=torch.int32, device=local_ts.device))
        sizes = [int(s.item()) for s in sizes]
        max_size = max(sizes)
        # all_gather needs one shape on every rank: pad each rank's batch to the largest, cut after.
        pad = max_size - len(local_ts)
        ts_padded = torch.cat([local_ts, local_ts.new_zeros(pad)])
        losses_padded = torch.cat([local_losses, local_losses.new_zeros(pad)])
        ts_all = [torch.zeros_like(ts_padded) for _ in sizes]
        losses_all = [torch.zeros_like(losses_padded) for _ in sizes]
        dist.all_gather(ts_all, ts_padded)
        dist.all_gather(losses_all, losses_padded)
        timesteps = [t for rank_ts, n in zip(ts_all, sizes) for t in rank_ts[:n].tolist()]
        losses = [v for rank_losses, n in zip(losses_all, sizes) for v in rank_losses[:n].tolist()]
        self.update_with_all_losses(timesteps, losses)

    @abstractmethod
    def update_with_all_losses(self, ts, losses) -> None:
        """Apply the (timestep, loss) pairs of all ranks, in order; deterministic, so ranks stay in sync."""


class LossSecondMomentResampler(LossAwareSampler):
    """p(t) proportional to sqrt(mean of the last `history_per_term` squared losses at t), mixed with
    `uniform_prob` of the uniform distribution; uniform until every timestep has a full history."""

    def __init__(self, diffusion, history_per_term: int = 10, uniform_prob: float = 0.001):
        if isinstance(history_per_term, bool) or not isinstance(history_per_term, (int, np.integer)) \
                or history_per_term < 1:
            raise ValueError(f"history_per_term must be a positive int, got {history_per_term!r}")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must lie in [0, 1], got {uniform_prob!r}")
        self.diffusion = diffusion
        self.history_per_term = int(history_per_term)
        self.uniform_prob = uniform_prob
        steps = _num_timesteps(diffusion)
        self._loss_history = np.zeros([steps, self.history_per_term], dtype=np.float64)
        # np.int64 where the published code says np.int (removed in NumPy 2).
        self._loss_counts = np.zeros([steps], dtype=np.int64)

    def weights(self) -> np.ndarray:
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts, losses) -> None:
        ts, losses = list(ts), list(losses)
        if len(ts) != len(losses):
            raise ValueError(f"ts and losses must have one length, got {len(ts)} and {len(losses)}")
        steps = len(self._loss_counts)
        for t, loss in zip(ts, losses):
            t = int(t)
            if not 0 <= t < steps:
                raise ValueError(f"ts must lie in [0, {steps - 1}], got {t}")
            if self._loss_counts[t] == self.history_per_term:
                # full: drop the oldest loss
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self) -> bool:
        return bool((self._loss_counts == self.history_per_term).all())


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {list(x.shape)}"
    return type(x).__name__
