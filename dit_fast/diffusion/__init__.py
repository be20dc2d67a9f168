"""Diffusion for DiT: DDPM / Improved DDPM (learned-range variance, hybrid loss) / DDIM.

    from dit_fast.diffusion import create_diffusion
    diffusion = create_diffusion(timestep_respacing="")        # training: all 1000 steps
    loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
    diffusion = create_diffusion("250")                          # sampling: 250 respaced steps
    z = diffusion.p_sample_loop(model.forward_with_cfg, z.shape, z, clip_denoised=False,
                                model_kwargs=dict(y=y, cfg_scale=4.0), device=device)

Same call shapes as the published DiT scripts' `diffusion` package, so they switch only the import; its
module names work too (`dit_fast.diffusion.gaussian_diffusion`, `.diffusion_utils`, `.respace`,
`.timestep_sampler`).
"""
from __future__ import annotations

from . import diffusion_utils, gaussian_diffusion, losses, respace, schedules, timestep_sampler
from .gaussian import GaussianDiffusion, LossType, ModelMeanType, ModelVarType
from .respace import SpacedDiffusion
from .schedules import get_named_beta_schedule, space_timesteps

__all__ = [
    "create_diffusion",
    "GaussianDiffusion",
    "SpacedDiffusion",
    "ModelMeanType",
    "ModelVarType",
    "LossType",
    "get_named_beta_schedule",
    "space_timesteps",
    "losses",
    "schedules",
    "timestep_sampler",
    "diffusion_utils",
    "gaussian_diffusion",
    "respace",
]


def create_diffusion(
    timestep_respacing,
    noise_schedule: str = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
) -> SpacedDiffusion:
    """The diffusion DiT trains (timestep_respacing="") and samples ("250", "ddim50", ...) with.

    Defaults are DiT's: linear schedule over 1000 steps, epsilon prediction, learned-range variance,
    hybrid loss (MSE + vb). use_kl trains on the variational bound alone (times T).
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
    )
