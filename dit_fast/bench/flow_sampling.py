"""The sampling bench's contenders for flow models (SiT, LightningDiT): the published transport Sampler loop
against dit_fast.sample_flow.

Per model family, the samplers people run (FLOW_PLANS):
  SiT           ODE euler, and SDE Euler (diffusion_form "sigma", last step "Mean" of 0.04: sample.py's defaults)
  LightningDiT  ODE euler with timestep_shift 0.3 and guidance only for t >= 0.11 (its inference recipe)
Contenders of a plan (every one samples the same noise and labels with the same weights):
  reference                   Sampler(create_transport("Linear", "velocity")).sample_ode / sample_sde, the
                              returned function driving the reference model's forward_with_cfg (LightningDiT's
                              with cfg_interval=True, cfg_interval_start), on [z; z] and [y; null]
  reference+compile           the same loop on torch.compile(reference) (forward compiled, guidance eager)
  reference+compile-blocks    LightningDiT: the loop on the model with each block, embedder and the final layer
                              compiled on its own, as its authors run it
  dit_fast                    dit_fast.sample_flow, eager steps (one fused update per model call)
  dit_fast+graph              the same with the step captured as one CUDA graph (CUDA only)
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch

from .contenders import NUM_CLASSES, compile_blocks, shared_copy


@dataclass(frozen=True)
class FlowPlan:
    name: str
    mode: str  # "ode" | "sde"
    sampling_method: str
    timestep_shift: float = 0.0
    cfg_interval_start: float | None = None  # LightningDiT: guide only for t >= this


FLOW_PLANS = {
    "SiT": (FlowPlan("ode-euler", "ode", "euler"), FlowPlan("sde-Euler", "sde", "Euler")),
    "LightningDiT": (FlowPlan("ode-euler shift=0.3 cfg t>=0.11", "ode", "euler", 0.3, 0.11),),
}
SDE_SETTINGS = dict(diffusion_form="sigma", diffusion_norm=1.0, last_step="Mean", last_step_size=0.04)


def _published_flow_loop(model, plan: FlowPlan, lightning: bool, z, y, num_steps: int, cfg_scale: float):
    from ..reference import forward_with_cfg, lightning_forward_with_cfg
    from ..transport import Sampler, create_transport

    sampler = Sampler(create_transport("Linear", "velocity"))
    if plan.mode == "ode":
        fn = sampler.sample_ode(sampling_method=plan.sampling_method, num_steps=num_steps,
                                timestep_shift=plan.timestep_shift)
    else:
        fn = sampler.sample_sde(sampling_method=plan.sampling_method, num_steps=num_steps, **SDE_SETTINGS)
    kwargs = dict(y=torch.cat([y, torch.full_like(y, NUM_CLASSES)]), cfg_scale=cfg_scale)
    if lightning:
        def model_fn(x, t, y, cfg_scale):
            interval = plan.cfg_interval_start is not None
            return lightning_forward_with_cfg(model, x, t, y, cfg_scale, cfg_interval=interval or None,
                                              cfg_interval_start=plan.cfg_interval_start)
    else:
        def model_fn(x, t, y, cfg_scale):
            return forward_with_cfg(model, x, t, y, cfg_scale)
    return fn(torch.cat([z, z]), model_fn, **kwargs)[-1][: len(z)]


def flow_contenders(reference: torch.nn.Module, family: str, plan: FlowPlan, device: torch.device, *,
                    compile_ref: bool = False, backend: str = "auto",
                    ) -> dict[str, Callable[[torch.Tensor, torch.Tensor, int, float], torch.Tensor]]:
    """name -> fn(z, y, num_steps, cfg_scale) returning latents; every model holds `reference`'s weights."""
    from .. import from_reference, sample_flow

    ref = reference.eval()
    lightning = family == "LightningDiT"
    fast = from_reference(copy.deepcopy(ref)).to(device).eval()
    fast.set_backend(backend)
    out = {"reference": lambda z, y, s, c: _published_flow_loop(ref, plan, lightning, z, y, s, c)}
    if compile_ref:
        if lightning:
            blocks = compile_blocks(shared_copy(ref))
            out["reference+compile-blocks"] = lambda z, y, s, c: _published_flow_loop(blocks, plan, True, z, y, s, c)
        compiled = torch.compile(ref)
        out["reference+compile"] = lambda z, y, s, c: _published_flow_loop(compiled, plan, lightning, z, y, s, c)
    settings = dict(mode=plan.mode, sampling_method=plan.sampling_method, timestep_shift=plan.timestep_shift,
                    cfg_interval=plan.cfg_interval_start, backend=backend,
                    **(SDE_SETTINGS if plan.mode == "sde" else {}))

    def fast_fn(graph: bool):
        return lambda z, y, s, c: sample_flow(fast, z, y, num_steps=s, cfg_scale=c, cuda_graph=graph, **settings)

    out["dit_fast"] = fast_fn(False)
    if device.type == "cuda":
        out["dit_fast+graph"] = fast_fn(True)
    return out
