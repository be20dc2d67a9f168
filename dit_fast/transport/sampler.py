"""Samplers of a Transport: probability-flow ODE, SDE, and ODE log-likelihood, as in SiT.

Each sample_* method returns a function (x, model, **model_kwargs) whose result [-1] is the final state
(sample_ode_likelihood's returns (logp, x_noise)). The model is called as model(x, t, **model_kwargs)
with t a float32 [N]; with classifier-free guidance pass model.forward_with_cfg and the doubled batch,
as the published sample.py does. The calls into the model and the random draws happen in the
published order (the SDE's noise: torch.randn on the CPU's global generator, one per step).
"""
from __future__ import annotations

import torch

from .integrators import ODE, SDE
from .paths import DIFFUSION_FORMS

__all__ = ["Sampler", "LAST_STEPS"]

LAST_STEPS = (None, "Mean", "Tweedie", "Euler")


class Sampler:
    def __init__(self, transport):
        self.transport = transport
        self.drift = transport.get_drift()
        self.score = transport.get_score()

    def _sde_fields(self, diffusion_form: str, diffusion_norm: float):
        path = self.transport.path_sampler

        def diffusion(x, t):
            return path.compute_diffusion(x, t, form=diffusion_form, norm=diffusion_norm)

        def sde_drift(x, t, model, **kw):
            # The probability-flow drift plus w(t) times the score (two model calls for a velocity
            # model, as published: a model that draws random numbers keeps its place in the stream).
            return self.drift(x, t, model, **kw) + diffusion(x, t) * self.score(x, t, model, **kw)

        return sde_drift, diffusion

    def _last_step(self, sde_drift, last_step, last_step_size):
        if last_step is None:
            return lambda x, t, model, **kw: x
        if last_step == "Mean":  # one Euler step of the SDE's mean, without noise
            return lambda x, t, model, **kw: x + sde_drift(x, t, model, **kw) * last_step_size
        if last_step == "Euler":  # one Euler step of the probability-flow ODE
            return lambda x, t, model, **kw: x + self.drift(x, t, model, **kw) * last_step_size
        # Tweedie: E[x1 | x_t] = (x + sigma_t^2 score) / alpha_t, with the first sample's t.
        path = self.transport.path_sampler

        def tweedie(x, t, model, **kw):
            alpha = path.compute_alpha_t(t)[0][0]
            sigma = path.compute_sigma_t(t)[0][0]
            return x / alpha + (sigma ** 2) / alpha * self.score(x, t, model, **kw)

        return tweedie

    def sample_sde(self, *, sampling_method="Euler", diffusion_form="SBDM", diffusion_norm=1.0, last_step="Mean",
                   last_step_size=0.04, num_steps=250):
        """num_steps - 1 SDE steps over [t0, t1 = 1 - last_step_size], then the last step; returns the list of
        num_steps states. diffusion_form: one of DIFFUSION_FORMS (w(t) = norm * form); last_step: one of
        LAST_STEPS."""
        if diffusion_form not in DIFFUSION_FORMS:
            raise ValueError(f"diffusion_form must be one of {DIFFUSION_FORMS}, got {diffusion_form!r}")
        if last_step not in LAST_STEPS:
            raise ValueError(f"last_step must be one of {LAST_STEPS}, got {last_step!r}")
        if last_step is None:
            last_step_size = 0.0
        sde_drift, diffusion = self._sde_fields(diffusion_form, diffusion_norm)
        t0, t1 = self.transport.check_interval(self.transport.train_eps, self.transport.sample_eps,
                                               diffusion_form=diffusion_form, sde=True, eval=True, reverse=False,
                                               last_step_size=last_step_size)
        sde = SDE(sde_drift, diffusion, t0=t0, t1=t1, num_steps=num_steps, sampler_type=sampling_method)
        last = self._last_step(sde_drift, last_step, last_step_size)

        def _sample(init, model, **model_kwargs):
            xs = sde.sample(init, model, **model_kwargs)
            t_last = torch.ones(init.size(0), device=init.device) * t1
            xs.append(last(xs[-1], t_last, model, **model_kwargs))
            return xs

        return _sample

    def sample_ode(self, *, sampling_method="dopri5", num_steps=50, atol=1e-6, rtol=1e-3, reverse=False,
                   timestep_shift=0.0):
        """The probability-flow ODE from t0 to t1 (noise to data; reverse=True: data to noise, the field
        still evaluated at the true time). Fixed-step methods take num_steps - 1 steps on the grid; an
        adaptive method reports its solution at the num_steps grid times. timestep_shift > 0: LightningDiT's
        warped grid."""
        t0, t1 = self.transport.check_interval(self.transport.train_eps, self.transport.sample_eps, sde=False,
                                               eval=True, reverse=reverse, last_step_size=0.0)
        ode = ODE(self.drift, t0=t0, t1=t1, sampler_type=sampling_method, num_steps=num_steps, atol=atol, rtol=rtol,
                  timestep_shift=timestep_shift)
        return ode.sample

    def sample_ode_likelihood(self, *, sampling_method="dopri5", num_steps=50, atol=1e-6, rtol=1e-3):
        """A function x -> (log p(x) [N], the noise x maps to): the ODE run from data to noise with
        Hutchinson's trace estimator of the divergence (one Rademacher probe per field evaluation,
        torch.randint on x's device)."""

        def likelihood_field(state, t, model, **kw):
            x, _ = state
            probe = torch.randint(2, x.size(), dtype=torch.float, device=x.device) * 2 - 1
            t = torch.ones_like(t) * (1 - t)
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                grad = torch.autograd.grad(torch.sum(self.drift(x, t, model, **kw) * probe), x)[0]
                div = torch.sum(grad * probe, dim=tuple(range(1, x.dim())))
                drift = self.drift(x, t, model, **kw)
            return -drift.detach(), div

        t0, t1 = self.transport.check_interval(self.transport.train_eps, self.transport.sample_eps, sde=False,
                                               eval=True, reverse=False, last_step_size=0.0)
        ode = ODE(likelihood_field, t0=t0, t1=t1, sampler_type=sampling_method, num_steps=num_steps, atol=atol,
                  rtol=rtol)

        def _sample(x, model, **model_kwargs):
            states, delta_logp = ode.sample((x, torch.zeros(x.size(0)).to(x)), model, **model_kwargs)
            z = states[-1]
            return self.transport.prior_logp(z) - delta_logp[-1], z

        return _sample
