"""Gaussian diffusion: the forward process, the learned reverse process, its losses and samplers.

Written from the papers: DDPM (Ho et al. 2020), Improved DDPM (Nichol & Dhariwal 2021: learned-range
variance, hybrid loss) and DDIM (Song et al. 2021), with the call shapes and the numerics of the
published code the DiT scripts use, so that those scripts only change their import:

- all schedule tables are float64 numpy arrays; a value is gathered at the batch's timesteps in
  float64 and cast to float32 (``_gather``), then broadcast against x;
- every sampling step draws exactly one standard-normal tensor shaped like x (also the last, noise-free
  step, and DDIM with eta=0), and the initial noise is one ``torch.randn(*shape)``: a seed gives the
  published samples.
"""
from __future__ import annotations

import enum

import numpy as np
import torch

from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl

__all__ = ["GaussianDiffusion", "ModelMeanType", "ModelVarType", "LossType"]


class ModelMeanType(enum.Enum):
    PREVIOUS_X = enum.auto()  # the model predicts x_{t-1}
    START_X = enum.auto()  # the model predicts x_0
    EPSILON = enum.auto()  # the model predicts the noise


class ModelVarType(enum.Enum):
    LEARNED = enum.auto()  # the model predicts log variance directly
    FIXED_SMALL = enum.auto()  # the posterior variance beta~_t
    FIXED_LARGE = enum.auto()  # beta_t (beta~_1 at t=0, so the first step has a finite log variance)
    LEARNED_RANGE = enum.auto()  # v in [-1, 1] interpolates log beta~_t .. log beta_t


class LossType(enum.Enum):
    MSE = enum.auto()  # L_simple, plus the vb term when the variance is learned (hybrid loss)
    RESCALED_MSE = enum.auto()  # the same with the vb term scaled by T / 1000
    KL = enum.auto()  # the variational bound
    RESCALED_KL = enum.auto()  # the variational bound times T

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


# Schedule tables already on a device, keyed by their contents: a host-to-device copy of pageable memory
# synchronizes the stream, and a training step gathers from the tables several times (also from arrays
# computed on the fly, like 1 - alphas_cumprod, hence contents, not identity). A few KB each, few of them.
_DEVICE_TABLES: dict = {}
_MAX_DEVICE_TABLES = 256


def _device_table(table: np.ndarray, device: torch.device) -> torch.Tensor:
    key = (table.dtype.str, table.shape, table.tobytes(), str(device))
    out = _DEVICE_TABLES.get(key)
    if out is None:
        if len(_DEVICE_TABLES) >= _MAX_DEVICE_TABLES:
            _DEVICE_TABLES.clear()
        out = _DEVICE_TABLES[key] = torch.from_numpy(np.ascontiguousarray(table)).to(device=device)
    return out


def _gather(table: np.ndarray, t: torch.Tensor, shape) -> torch.Tensor:
    """table[t] (float64) cast to float32, broadcast to `shape` with t indexing dim 0."""
    vals = _device_table(table, t.device)[t].float()
    while vals.dim() < len(shape):
        vals = vals[..., None]
    return vals.expand(shape)


class GaussianDiffusion:
    """A diffusion process over T = len(betas) steps and the model-parameterised reverse process."""

    def __init__(self, *, betas, model_mean_type: ModelMeanType, model_var_type: ModelVarType, loss_type: LossType):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~_0 = 0: its log is replaced by log beta~_1 so that the t=0 log variance stays finite.
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if len(self.posterior_variance) > 1
            else np.array([], dtype=np.float64)
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(self, x_start, t):
        """Mean, variance and log variance of q(x_t | x_0)."""
        mean = _gather(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = _gather(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = _gather(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """A draw of x_t ~ q(x_t | x_0): sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise must have the shape of x_start {list(x_start.shape)}, got {list(noise.shape)}")
        return (
            _gather(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _gather(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start {list(x_start.shape)} and x_t {list(x_t.shape)} must have one shape")
        mean = (
            _gather(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + _gather(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        variance = _gather(self.posterior_variance, t, x_t.shape)
        log_variance = _gather(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ reverse process
    def _scale_timesteps(self, t):
        return t  # DiT feeds integer timesteps; SpacedDiffusion maps respaced ones back

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """p(x_{t-1} | x_t) from one model call: dict(mean, variance, log_variance, pred_xstart, extra)."""
        if model_kwargs is None:
            model_kwargs = {}
        B, C = x.shape[:2]
        if t.shape != (B,):
            raise ValueError(f"t must have shape [{B}] (one timestep per sample), got {list(t.shape)}")
        model_output = model(x, self._scale_timesteps(t), **model_kwargs)
        extra = None
        if isinstance(model_output, tuple):
            model_output, extra = model_output

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if model_output.shape != (B, C * 2, *x.shape[2:]):
                raise ValueError(
                    f"a learned-variance model must output {[B, 2 * C, *x.shape[2:]]} (eps | variance), "
                    f"got {list(model_output.shape)}"
                )
            model_output, var_values = torch.split(model_output, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = var_values
            else:
                min_log = _gather(self.posterior_log_variance_clipped, t, x.shape)
                max_log = _gather(np.log(self.betas), t, x.shape)
                frac = (var_values + 1) / 2  # the model's v in [-1, 1] -> [0, 1]
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                var = np.append(self.posterior_variance[1], self.betas[1:])
                table, log_table = var, np.log(var)
            else:
                table, log_table = self.posterior_variance, self.posterior_log_variance_clipped
            model_variance = _gather(table, t, x.shape)
            model_log_variance = _gather(log_table, t, x.shape)

        def process_xstart(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = process_xstart(model_output)
        elif self.model_mean_type == ModelMeanType.EPSILON:
            pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output))
        else:  # PREVIOUS_X
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output))
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            model_mean = model_output
        else:
            model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
            "extra": extra,
        }

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (
            _gather(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - _gather(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        # Invert the posterior mean: x_0 = (x_prev - coef2 x_t) / coef1.
        return (
            _gather(1.0 / self.posterior_mean_coef1, t, x_t.shape) * xprev
            - _gather(self.posterior_mean_coef2 / self.posterior_mean_coef1, t, x_t.shape) * x_t
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (_gather(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart) / _gather(
            self.sqrt_recipm1_alphas_cumprod, t, x_t.shape
        )

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Classifier guidance on the mean (Dhariwal & Nichol): mean + variance * grad log p(y | x_t)."""
        gradient = cond_fn(x, self._scale_timesteps(t), **(model_kwargs or {}))
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Classifier guidance on the score, for DDIM: eps - sqrt(1 - alpha_bar) grad log p(y | x_t)."""
        alpha_bar = _gather(self.alphas_cumprod, t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, self._scale_timesteps(t), **(model_kwargs or {}))
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    # ------------------------------------------------------------------ ancestral sampling (DDPM)
    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None):
        """One step x_t -> x_{t-1}: dict(sample, pred_xstart)."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        noise = torch.randn_like(x)
        nonzero = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))  # no noise at the last step
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs)
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                      model_kwargs=None, device=None, progress=False):
        """Samples of `shape` from the model; returns x_0."""
        _final = None
        for _final in self.p_sample_loop_progressive(
            model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress
        ):
            pass
        return _final["sample"]

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                  cond_fn=None, model_kwargs=None, device=None, progress=False):
        """Yields each step's dict(sample, pred_xstart), from t = T-1 down to 0."""
        yield from self._loop(self.p_sample, model, shape, noise, device, progress,
                              dict(clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
                                   model_kwargs=model_kwargs))

    def _loop(self, step_fn, model, shape, noise, device, progress, kwargs):
        if not isinstance(shape, (tuple, list)):
            raise TypeError(f"shape must be a tuple or list, got {type(shape).__name__}")
        if device is None:
            device = _model_device(model)
        img = noise if noise is not None else torch.randn(*shape, device=device)
        if tuple(img.shape) != tuple(shape):
            raise ValueError(f"noise must have shape {list(shape)}, got {list(img.shape)}")
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices)
        for i in indices:
            t = torch.tensor([i] * shape[0], device=device)
            with torch.no_grad():
                out = step_fn(model, img, t, **kwargs)
                yield out
                img = out["sample"]

    # ------------------------------------------------------------------ DDIM
    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
                    eta=0.0):
        """One DDIM step x_t -> x_{t-1} (eta=0: deterministic; eta=1: DDPM-like variance)."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs)
        # eps consistent with the (possibly clipped) x_0, as the DDIM update needs both to agree.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = _gather(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = _gather(self.alphas_cumprod_prev, t, x.shape)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        noise = torch.randn_like(x)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        nonzero = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))
        return {"sample": mean_pred + nonzero * sigma * noise, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None,
                            model_kwargs=None, eta=0.0):
        """x_t -> x_{t+1} with the deterministic DDIM ODE (eta must be 0)."""
        if eta != 0.0:
            raise ValueError(f"ddim_reverse_sample is deterministic: eta must be 0.0, got {eta}")
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = _gather(self.alphas_cumprod_next, t, x.shape)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                         model_kwargs=None, device=None, progress=False, eta=0.0):
        _final = None
        for _final in self.ddim_sample_loop_progressive(
            model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress, eta
        ):
            pass
        return _final["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                     cond_fn=None, model_kwargs=None, device=None, progress=False, eta=0.0):
        yield from self._loop(self.ddim_sample, model, shape, noise, device, progress,
                              dict(clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
                                   model_kwargs=model_kwargs, eta=eta))

    # ------------------------------------------------------------------ losses
    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """One term of the variational bound in bits per dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for
        t > 0, the discretized decoder NLL -log p(x_0|x_1) at t = 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / np.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-sample losses at timesteps t: dict with "loss", and "mse" / "vb" for the MSE losses.

        Hybrid loss (Improved DDPM): L_simple + lambda L_vb with lambda = 0.001. As published, the vb
        term here is one timestep's term averaged over dims, added with weight 1: L_vb sums T = 1000
        such terms, so the per-step term already carries the 1/1000 (RESCALED_MSE rescales it by
        T / 1000 for other T). The model's mean prediction is detached in that term, so L_vb trains only
        the variance channels and L_simple only the mean.
        """
        if model_kwargs is None:
            model_kwargs = {}
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False,
                                               model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output = model(x_t, self._scale_timesteps(t), **model_kwargs)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            B, C = x_t.shape[:2]
            if model_output.shape != (B, C * 2, *x_t.shape[2:]):
                raise ValueError(
                    f"a learned-variance model must output {[B, 2 * C, *x_t.shape[2:]]}, got {list(model_output.shape)}"
                )
            model_output, var_values = torch.split(model_output, C, dim=1)
            frozen = torch.cat([model_output.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(
                model=lambda *args, r=frozen: r, x_start=x_start, x_t=x_t, t=t, clip_denoised=False
            )["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        target = {
            ModelMeanType.PREVIOUS_X: lambda: self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0],
            ModelMeanType.START_X: lambda: x_start,
            ModelMeanType.EPSILON: lambda: noise,
        }[self.model_mean_type]()
        if model_output.shape != target.shape:
            raise ValueError(f"model output {list(model_output.shape)} does not match the target {list(target.shape)}")
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) in bits per dim: the bound's prior term (not trained)."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        mean, _, log_var = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / np.log(2.0)

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None):
        """The whole variational bound of x_start in bits per dim, one model call per timestep.

        Returns dict(total_bpd [N], prior_bpd [N], vb [N, T], xstart_mse [N, T], mse [N, T]); column j
        of the [N, T] terms is timestep T-1-j (loop order, as published). Per timestep, from t = T-1 down
        to 0, it draws one randn shaped like x_start for q_sample, then calls the model under no_grad:
        the published random stream.
        """
        if not isinstance(x_start, torch.Tensor) or x_start.dim() < 1 or x_start.shape[0] == 0:
            raise ValueError("x_start must be a tensor [N, ...] with N >= 1, got "
                             f"{list(x_start.shape) if isinstance(x_start, torch.Tensor) else type(x_start).__name__}")
        batch = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for i in range(self.num_timesteps - 1, -1, -1):
            t = torch.full((batch,), i, dtype=torch.long, device=x_start.device)
            noise = torch.randn_like(x_start)
            x_t = self.q_sample(x_start, t, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(model, x_start=x_start, x_t=x_t, t=t, clip_denoised=clip_denoised,
                                         model_kwargs=model_kwargs)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        vb = torch.stack(vb, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        return {
            "total_bpd": vb.sum(dim=1) + prior_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb,
            "xstart_mse": torch.stack(xstart_mse, dim=1),
            "mse": torch.stack(mse, dim=1),
        }


def _model_device(model) -> torch.device:
    """The device of a model (or of the module a bound method such as forward_with_cfg belongs to)."""
    owner = getattr(model, "__self__", model)
    params = getattr(owner, "parameters", None)
    if params is not None:
        for p in params():
            return p.device
    raise ValueError("device must be given when the model has no parameters to take it from")
