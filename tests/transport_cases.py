"""Cases shared by tests/test_transport.py and tests/data/make_transport_golden.py.

Each case runs one published entry point (training_losses, sample_ode, sample_sde,
sample_ode_likelihood) of a transport API -- ours, or the published SiT / LightningDiT package passed
in as `api` -- on a tiny deterministic model (a fixed linear map of x scaled by t, plus t- and
label-dependent offsets: no weights to download) with fixed seeds, and returns its outputs. The golden
file holds the published code's outputs for every case.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

SHAPE = (3, 4, 3, 3)
PATHS = ("Linear", "GVP", "VP")
PREDICTIONS = ("velocity", "noise", "score")
LOSS_WEIGHTS = (None, "velocity", "likelihood")


class TinyField:
    """model(x, t, y) = (W x) (0.5 + t) + b_y sin(3 t): nonlinear in t, label-dependent, deterministic."""

    def __init__(self, C: int = 4, num_classes: int = 5):
        g = torch.Generator().manual_seed(1234)
        self.W = torch.randn(C, C, generator=g, dtype=torch.float64) * 0.5
        self.emb = torch.randn(num_classes + 1, C, generator=g, dtype=torch.float64)
        self.num_classes = num_classes

    def __call__(self, x, t, y=None):
        tt = t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        out = torch.einsum("oc,nc...->no...", self.W.to(x.dtype), x) * (0.5 + tt)
        if y is not None:
            out = out + self.emb.to(x.dtype)[y].reshape(x.shape[0], -1, *([1] * (x.dim() - 2))) * torch.sin(3 * tt)
        return out


def _inputs():
    g = torch.Generator().manual_seed(99)
    x = torch.randn(*SHAPE, generator=g)
    y = torch.randint(0, 5, (SHAPE[0],), generator=g)
    return x, y


def _seed(s):
    torch.manual_seed(s)
    np.random.seed(s)


def _loss(api, path, pred, weight, seed, create_kw=(), loss_kw=()):
    x1, y = _inputs()
    transport = api.create_transport(path, pred, weight, None, None, **dict(create_kw))
    _seed(seed)
    terms = transport.training_losses(TinyField(), x1, dict(y=y), **dict(loss_kw))
    after = torch.rand(2)  # the generator's position afterwards: the number of draws must match too
    return {**{k: v.detach() for k, v in terms.items()}, "rng_after": after,
            "np_after": torch.from_numpy(np.random.standard_normal(2))}


def _sample(api, kind, path, pred, seed, kw, dtype=torch.float32):
    x, y = _inputs()
    sampler = api.Sampler(api.create_transport(path, pred))
    fn = getattr(sampler, kind)(**kw)
    _seed(seed)
    with torch.no_grad():  # the published likelihood ODE needs grad mode off outside (as its sample.py sets)
        out = fn(x.to(dtype), TinyField(), y=y)
    if kind == "sample_ode_likelihood":
        return {"logp": out[0], "z": out[1]}
    return {"final": out[-1], "num_states": torch.tensor(len(out))}


def cases():
    """{name: (which published package: "sit" | "ldit", run(api) -> {name: tensor})}."""
    out = {}
    for i, (path, pred, weight) in enumerate(itertools.product(PATHS, PREDICTIONS, LOSS_WEIGHTS)):
        out[f"loss/{path}/{pred}/{weight}"] = ("sit", lambda api, a=(path, pred, weight, 100 + i): _loss(api, *a))
    ext = {
        "cos": dict(use_cosine_loss=True),
        "lognorm": dict(use_lognorm=True),
        "lognorm_cos": dict(use_lognorm=True, use_cosine_loss=True),
        "partial": dict(partitial_train=(0.2, 0.6), partial_ratio=0.7),
        "lognorm_partial": dict(use_lognorm=True, partitial_train=(0.2, 0.6), partial_ratio=0.7),
        "lognorm_shift": dict(use_lognorm=True, shift_lg=True),
    }
    for j, (name, kw) in enumerate(ext.items()):
        for path, pred in (("Linear", "velocity"), ("GVP", "noise")):
            out[f"loss_ext/{name}/{path}/{pred}"] = (
                "ldit", lambda api, a=(path, pred, None, 200 + j, kw, dict(shifted_mu=0.3)): _loss(api, *a))
    out["loss_ext/sp_timesteps/Linear/velocity"] = (
        "ldit", lambda api: _loss(api, "Linear", "velocity", None, 300, dict(use_cosine_loss=True),
                                  dict(sp_timesteps=(0.3, 0.5))))
    for i, (path, pred) in enumerate(itertools.product(PATHS, PREDICTIONS)):
        # dopri5 on the VP noise model: the toy field is too stiff near t = 1 (the published solver underflows)
        stiff = (path, pred) == ("VP", "noise")
        for method in ("euler", "heun2") if stiff else ("euler", "heun2", "dopri5"):
            out[f"ode/{path}/{pred}/{method}"] = (
                "sit", lambda api, a=(path, pred, 0, dict(sampling_method=method, num_steps=6)):
                _sample(api, "sample_ode", *a))
        if not stiff:  # reverse ODE and likelihood of the toy field on the VP noise model: NaN in the published code
            out[f"ode_reverse/{path}/{pred}"] = (
                "sit", lambda api, a=(path, pred, 0, dict(sampling_method="heun2", num_steps=5, reverse=True)):
                _sample(api, "sample_ode", *a))
        for method in ("Euler", "Heun"):
            kw = dict(sampling_method=method, num_steps=6, diffusion_form="sigma", last_step="Mean")
            out[f"sde/{path}/{pred}/{method}"] = ("sit", lambda api, a=(path, pred, 10 + i, kw):
                                                  _sample(api, "sample_sde", *a))
        if not stiff:
            out[f"likelihood/{path}/{pred}"] = (
                "sit", lambda api, a=(path, pred, 20 + i, dict(sampling_method="euler", num_steps=4)):
                _sample(api, "sample_ode_likelihood", *a))
    for last, form in itertools.product((None, "Tweedie", "Euler"), ("SBDM", "linear", "decreasing")):
        kw = dict(sampling_method="Euler", num_steps=5, diffusion_form=form, last_step=last)
        out[f"sde_last/{last}/{form}"] = ("sit", lambda api, a=("VP", "noise", 30, kw): _sample(api, "sample_sde", *a))
    out["likelihood_dopri5/Linear/velocity"] = (
        "sit", lambda api: _sample(api, "sample_ode_likelihood", "Linear", "velocity", 40,
                                   dict(sampling_method="dopri5", num_steps=3)))
    for shift in (0.3, 2.0):
        for method in ("euler", "heun2", "dopri5"):
            out[f"ode_shift/{shift}/{method}"] = (
                "ldit", lambda api, a=("Linear", "velocity", 0, dict(sampling_method=method, num_steps=6,
                                                                    timestep_shift=shift)):
                _sample(api, "sample_ode", *a))
    return out
