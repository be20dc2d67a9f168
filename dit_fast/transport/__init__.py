"""dit_fast.transport: SiT's interpolant objective and samplers (flow matching and diffusion on one API),
with LightningDiT's extensions (cosine loss, logit-normal t, timestep shift).

    from dit_fast.transport import create_transport, Sampler
    transport = create_transport("Linear", "velocity")
    loss = transport.training_losses(model, x1, dict(y=y))["loss"].mean()
    sample_fn = Sampler(transport).sample_ode(sampling_method="dopri5", num_steps=50)
    x1 = sample_fn(z, model.forward_with_cfg, y=y2, cfg_scale=4.0)[-1]

The API, its defaults and its random draws follow the published SiT code (willisma/SiT), so a seeded run
reproduces it; see docs/DESIGN.md for what differs. Adaptive ODE solvers need torchdiffeq. For fast
sampling of a DiT-type model (one fused update per step, CUDA graphs) see dit_fast.flow_sampling.
"""
from __future__ import annotations

from .choices import check_choice
from .integrators import FIXED_STEP_METHODS, ODE, SDE, TORCHDIFFEQ_METHODS, shift_timesteps
from .paths import GVPCPlan, GVPPath, ICPlan, LinearPath, VPCPlan, VPPath, expand_t_like_x
from .sampler import LAST_STEPS, Sampler
from .transport import ModelType, PathType, Transport, WeightType, mean_flat

__all__ = [
    "create_transport", "Transport", "Sampler", "ModelType", "PathType", "WeightType",
    "LinearPath", "GVPPath", "VPPath", "ICPlan", "GVPCPlan", "VPCPlan", "expand_t_like_x", "mean_flat",
    "ODE", "SDE", "FIXED_STEP_METHODS", "TORCHDIFFEQ_METHODS", "LAST_STEPS", "shift_timesteps",
    "PATH_TYPES", "PREDICTIONS", "LOSS_WEIGHTS",
]

PATH_TYPES = {"Linear": PathType.LINEAR, "GVP": PathType.GVP, "VP": PathType.VP}
PREDICTIONS = {"velocity": ModelType.VELOCITY, "noise": ModelType.NOISE, "score": ModelType.SCORE}
LOSS_WEIGHTS = {None: WeightType.NONE, "velocity": WeightType.VELOCITY, "likelihood": WeightType.LIKELIHOOD}


def default_eps(path_type: str, prediction: str, train_eps, sample_eps):
    """(train_eps, sample_eps) as the published create_transport settles them: VP 1e-5 / 1e-3;
    Linear and GVP with a noise or score model 1e-3 / 1e-3; a velocity model on Linear/GVP 0 / 0
    (whatever is passed). A given sample_eps counts only when train_eps is given too (published)."""
    if path_type == "VP":
        return (1e-5, 1e-3) if train_eps is None else (train_eps, sample_eps)
    if prediction != "velocity":
        return (1e-3, 1e-3) if train_eps is None else (train_eps, sample_eps)
    return 0, 0


def create_transport(path_type="Linear", prediction="velocity", loss_weight=None, train_eps=None, sample_eps=None,
                     use_cosine_loss=False, use_lognorm=False, partitial_train=None, partial_ratio=1.0,
                     shift_lg=False) -> Transport:
    """A Transport with the published arguments (SiT) and LightningDiT's: use_cosine_loss adds
    'cos_loss' = 1 - cos(pred, u_t) over channels; use_lognorm draws t logit-normal (NumPy's global
    generator); partitial_train=(lo, hi) with probability partial_ratio draws t in [lo, hi]; shift_lg
    takes training_losses(shifted_mu=...) as the logit-normal mean."""
    check_choice("path_type", path_type, PATH_TYPES)
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("loss_weight", loss_weight, LOSS_WEIGHTS)
    train_eps, sample_eps = default_eps(path_type, prediction, train_eps, sample_eps)
    return Transport(model_type=PREDICTIONS[prediction], path_type=PATH_TYPES[path_type],
                     loss_type=LOSS_WEIGHTS[loss_weight], train_eps=train_eps, sample_eps=sample_eps,
                     use_cosine_loss=use_cosine_loss, use_lognorm=use_lognorm, partitial_train=partitial_train,
                     partial_ratio=partial_ratio, shift_lg=shift_lg)
