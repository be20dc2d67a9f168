"""ODE and SDE integrators on a fixed time grid (forward time: t = 0 noise, t = 1 data).

ODE: the fixed-step methods (euler, midpoint, heun2, heun3, rk4) run here, with the Butcher tableaux,
order of operations and time handling of torchdiffeq's fixed-grid solvers (so results agree with
torchdiffeq's to the last bit); the adaptive ones (dopri5, ...) and the Adams methods go to
torchdiffeq.odeint, an optional dependency. Either way sample() returns the states at every grid time,
stacked, so [-1] is the final state.

SDE: Euler-Maruyama and stochastic Heun over num_steps - 1 uniform steps; each step draws one
torch.randn(x.shape) from the CPU's global generator (moved to x's device), as the published sampler does.
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["ODE", "SDE", "FIXED_STEP_METHODS", "TORCHDIFFEQ_METHODS", "SDE_METHODS", "shift_timesteps"]

FIXED_STEP_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4")
TORCHDIFFEQ_METHODS = ("dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun", "explicit_adams",
                       "implicit_adams", "fixed_adams", "scipy_solver") + FIXED_STEP_METHODS
SDE_METHODS = ("Euler", "Heun")


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """LightningDiT's timestep shift t' = s t / (1 + (s - 1) t), in t's dtype (s <= 0: no shift).
    s < 1 spends more steps near t = 0 (noise)."""
    if shift <= 0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def _map(fn, *trees):
    """fn over tensors, or element-wise over tuples of tensors (the likelihood ODE's (x, logp) state)."""
    if isinstance(trees[0], tuple):
        return tuple(fn(*parts) for parts in zip(*trees))
    return fn(*trees)


# One step of each fixed-grid method: (t0, dt, t1, y0, f0 = field(t0, y0)) -> the increment dy.
def _euler(field, t0, dt, t1, y0, f0):
    return _map(lambda f: dt * f, f0)


def _midpoint(field, t0, dt, t1, y0, f0):
    half = 0.5 * dt
    k2 = field(t0 + half, _map(lambda y, f: y + f * half, y0, f0))
    return _map(lambda k: dt * k, k2)


def _heun2(field, t0, dt, t1, y0, f0):
    k2 = field(t0 + dt * 1.0, _map(lambda y, k: y + dt * k * 1.0, y0, f0))
    return _map(lambda a, b: dt * (a * 0.5 + b * 0.5), f0, k2)


def _heun3(field, t0, dt, t1, y0, f0):
    k2 = field(t0 + dt * (1 / 3), _map(lambda y, k: y + dt * k * (1 / 3), y0, f0))
    k3 = field(t0 + dt * (2 / 3), _map(lambda y, a, b: y + dt * (a * 0.0 + b * (2 / 3)), y0, f0, k2))
    return _map(lambda a, b, c: dt * (a * 0.25 + b * 0.0 + c * 0.75), f0, k2, k3)


def _rk4(field, t0, dt, t1, y0, f0):
    # The "3/8 rule" variant torchdiffeq calls rk4.
    third = 1 / 3
    k2 = field(t0 + dt * third, _map(lambda y, a: y + dt * a * third, y0, f0))
    k3 = field(t0 + dt * (2 / 3), _map(lambda y, a, b: y + dt * (b - a * third), y0, f0, k2))
    k4 = field(t1, _map(lambda y, a, b, c: y + dt * (a - b + c), y0, f0, k2, k3))
    return _map(lambda a, b, c, d: (a + 3 * (b + c) + d) * dt * 0.125, f0, k2, k3, k4)


_STEPS = {"euler": _euler, "midpoint": _midpoint, "heun2": _heun2, "heun3": _heun3, "rk4": _rk4}


def _integrate_fixed(method: str, field, y0, t: torch.Tensor):
    """States at every time of t (the grid itself), stacked on a new first dimension."""
    step = _STEPS[method]
    states = [y0]
    y = y0
    for t0, t1 in zip(t[:-1], t[1:]):
        dt = t1 - t0  # in the grid's dtype (float32), as torchdiffeq computes it
        dy = step(field, t0, dt, t1, y, field(t0, y))
        y = _map(lambda a, b: a + b, y, dy)
        states.append(y)
    if isinstance(y0, tuple):
        return tuple(torch.stack([s[i] for s in states]) for i in range(len(y0)))
    return torch.stack(states)


def _torchdiffeq():
    try:
        from torchdiffeq import odeint
    except ImportError as e:
        raise ImportError("this sampling_method runs through torchdiffeq, which is not installed: "
                          "pip install torchdiffeq") from e
    return odeint


class ODE:
    """dx/dt = drift(x, t, model, **kwargs) from t0 to t1 on num_steps grid times (the output times of an
    adaptive solver); timestep_shift > 0 warps the grid (LightningDiT)."""

    def __init__(self, drift: Callable, *, t0, t1, sampler_type: str, num_steps: int, atol: float, rtol: float,
                 timestep_shift: float = 0.0, backend: str = "auto"):
        if sampler_type not in TORCHDIFFEQ_METHODS:
            raise ValueError(f"sampling_method must be one of {TORCHDIFFEQ_METHODS}, got {sampler_type!r}")
        if not isinstance(num_steps, int) or num_steps < 2:
            raise ValueError(f"num_steps must be an int >= 2 (grid times including both ends), got {num_steps!r}")
        if backend not in ("auto", "native", "torchdiffeq"):
            raise ValueError(f"backend must be 'auto', 'native' or 'torchdiffeq', got {backend!r}")
        if backend == "native" and sampler_type not in FIXED_STEP_METHODS:
            raise ValueError(f"backend='native' runs only {FIXED_STEP_METHODS}, got {sampler_type!r}")
        self.drift = drift
        self.t = shift_timesteps(torch.linspace(t0, t1, num_steps), timestep_shift)
        self.atol, self.rtol = atol, rtol
        self.sampler_type = sampler_type
        self.native = sampler_type in FIXED_STEP_METHODS and backend != "torchdiffeq"

    def sample(self, x, model, **model_kwargs):
        is_tuple = isinstance(x, tuple)
        first = x[0] if is_tuple else x
        device, n = first.device, first.size(0)
        t = self.t.to(device)

        def field(t_now, state):
            # torchdiffeq hands the field a time in the state's dtype; the model gets it as a float32 [N].
            t_vec = torch.ones(n).to(device) * t_now.to(first.dtype)
            return self.drift(state, t_vec, model, **model_kwargs)

        if self.native:
            return _integrate_fixed(self.sampler_type, field, x, t)
        tol = len(x) if is_tuple else 1
        return _torchdiffeq()(lambda t_now, state: self.drift(state, torch.ones(n).to(device) * t_now, model,
                                                                **model_kwargs),
                              x, t, method=self.sampler_type, atol=[self.atol] * tol, rtol=[self.rtol] * tol)


class SDE:
    """dx = drift dt + sqrt(2 diffusion) dW from t0 to t1: num_steps - 1 steps of dt = (t1 - t0) / (num_steps - 1)."""

    def __init__(self, drift: Callable, diffusion: Callable, *, t0, t1, num_steps: int, sampler_type: str):
        if sampler_type not in SDE_METHODS:
            raise ValueError(f"sampling_method must be one of {SDE_METHODS} for an SDE, got {sampler_type!r}")
        if not isinstance(num_steps, int) or num_steps < 2:
            raise ValueError(f"num_steps must be an int >= 2 for an SDE, got {num_steps!r}")
        if not t0 < t1:
            raise ValueError(f"the SDE integrates forward in time: need t0 < t1, got t0={t0}, t1={t1}")
        self.t = torch.linspace(t0, t1, num_steps)
        self.dt = self.t[1] - self.t[0]
        self.drift, self.diffusion = drift, diffusion
        self.sampler_type = sampler_type

    def _euler_step(self, x, t, model, **kw):
        w = torch.randn(x.size()).to(x)
        t = torch.ones(x.size(0)).to(x) * t
        dw = w * torch.sqrt(self.dt)
        drift = self.drift(x, t, model, **kw)
        diffusion = self.diffusion(x, t)
        mean_x = x + drift * self.dt
        return mean_x + torch.sqrt(2 * diffusion) * dw

    def _heun_step(self, x, t, model, **kw):
        w = torch.randn(x.size()).to(x)
        dw = w * torch.sqrt(self.dt)
        t = torch.ones(x.size(0)).to(x) * t
        xhat = x + torch.sqrt(2 * self.diffusion(x, t)) * dw
        k1 = self.drift(xhat, t, model, **kw)
        k2 = self.drift(xhat + self.dt * k1, t + self.dt, model, **kw)
        return xhat + 0.5 * self.dt * (k1 + k2)

    def sample(self, init, model, **model_kwargs):
        """The states after each of the num_steps - 1 steps (a list)."""
        step = self._euler_step if self.sampler_type == "Euler" else self._heun_step
        x, states = init, []
        with torch.no_grad():
            for t in self.t[:-1]:
                x = step(x, t, model, **model_kwargs)
                states.append(x)
        return states
