"""Respacing: a diffusion over a subset of the original timesteps (e.g. 250 of 1000 for sampling).

Keeping steps S = {s_0 < s_1 < ...} of the original process and setting beta'_i = 1 - abar_{s_i} /
abar_{s_{i-1}} gives a process whose alpha_bar at step i is exactly the original abar_{s_i}. The model
was trained on original timesteps, so it is called with s_i, not i (no float rescaling: DiT does not
rescale timesteps).
"""
from __future__ import annotations

import numpy as np
import torch

from .gaussian import GaussianDiffusion
from .schedules import space_timesteps

__all__ = ["SpacedDiffusion", "space_timesteps"]  # space_timesteps: where the published package defines it


class SpacedDiffusion(GaussianDiffusion):
    def __init__(self, use_timesteps, *, betas, rescale_timesteps: bool = False, **kwargs):
        betas = np.asarray(betas, dtype=np.float64)
        self.original_num_steps = len(betas)
        self.use_timesteps = set(int(s) for s in use_timesteps)
        if not self.use_timesteps or min(self.use_timesteps) < 0 or max(self.use_timesteps) >= len(betas):
            raise ValueError(f"use_timesteps must be a non-empty subset of range({len(betas)})")
        self.rescale_timesteps = rescale_timesteps
        alphas_cumprod = np.cumprod(1.0 - betas)
        self.timestep_map: list[int] = []
        new_betas = []
        last = 1.0
        for i, abar in enumerate(alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1.0 - abar / last)
                last = abar
                self.timestep_map.append(i)
        super().__init__(betas=np.array(new_betas), **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self.timestep_map, self.rescale_timesteps, self.original_num_steps)

    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)

    def _scale_timesteps(self, t):
        return t  # the wrapper maps (and, if asked, rescales) them


class _WrappedModel:
    """Calls the model with original timesteps: timestep_map[t] (times 1000 / T when rescaling)."""

    def __init__(self, model, timestep_map, rescale_timesteps, original_num_steps):
        self.model = model
        self.timestep_map = timestep_map
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps
        self._maps: dict = {}

    def __call__(self, x, ts, **kwargs):
        key = (ts.device, ts.dtype)
        table = self._maps.get(key)
        if table is None:
            table = self._maps[key] = torch.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)
        new_ts = table[ts]
        if self.rescale_timesteps:
            new_ts = new_ts.float() * (1000.0 / self.original_num_steps)
        return self.model(x, new_ts, **kwargs)
