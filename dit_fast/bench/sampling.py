"""Sampling latency: N-step classifier-free-guided sampling, the published loop against dit_fast.sample.

Contenders (each samples `batch` images from the same noise, labels and weights):
  reference          the published loop, create_diffusion(str(steps)).p_sample_loop(forward_with_cfg), eager
  reference+compile  the same loop on torch.compile(reference) (CUDA: mode="max-autotune-no-cudagraphs"
                     would hide nothing the loop does; the default mode is used)
  dit_fast           dit_fast.sample, eager steps (fused update, no graph)
  dit_fast+graph     dit_fast.sample with the step captured as one CUDA graph (CUDA only); the capture
                     (two warm-up steps + one capture) happens inside every call and is timed with it

Contenders are interleaved in rounds (dit_fast.bench.rounds): round r runs each once in an order
rotated by r; a row reports the median over rounds and the spread. Timing is wall clock around the
whole call with a device synchronize on each side. Importable and runnable without a GPU.

Flow models (SiT, LightningDiT: the shape's family) run the published transport Sampler loop against
dit_fast.sample_flow instead, one set of rounds per sampler of the family (dit_fast.bench.flow_sampling);
their rows name the sampler (`sampler`).
"""
from __future__ import annotations

import copy
import time
from typing import Callable

import torch

from ..diffusion import create_diffusion
from ..sampling import sample
from . import stop
from .contenders import NUM_CLASSES, build_reference
from .flops import DiTShape
from .rounds import ratio_stats, run_rounds, spread

__all__ = ["sampling_contenders", "run_sampling_bench", "GPU_BATCHES", "CPU_BATCHES"]

GPU_BATCHES = (1, 8, 64)
CPU_BATCHES = (1, 2)
CFG_SCALE = 4.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _published_loop(model, z: torch.Tensor, y: torch.Tensor, num_steps: int, cfg_scale: float):
    from ..reference import forward_with_cfg

    diffusion = create_diffusion(str(num_steps))
    z2 = torch.cat([z, z])
    y2 = torch.cat([y, torch.full_like(y, NUM_CLASSES)])

    def model_fn(x, t, y, cfg_scale):
        return forward_with_cfg(model, x, t, y, cfg_scale)

    out = diffusion.p_sample_loop(model_fn, z2.shape, z2, clip_denoised=False,
                                  model_kwargs=dict(y=y2, cfg_scale=cfg_scale), device=z.device)
    return out[: len(z)]


def sampling_contenders(
    reference: torch.nn.Module, device: torch.device, *, compile_ref: bool = False, backend: str = "auto"
) -> dict[str, Callable[[torch.Tensor, torch.Tensor, int, float], torch.Tensor]]:
    """name -> fn(z, y, num_steps, cfg_scale) returning latents; every model shares `reference`'s weights."""
    from .. import from_reference

    ref = reference.eval()
    fast = from_reference(copy.deepcopy(ref)).to(device).eval()
    fast.set_backend(backend)
    out = {"reference": lambda z, y, s, c: _published_loop(ref, z, y, s, c)}
    if compile_ref:
        compiled = torch.compile(ref)
        out["reference+compile"] = lambda z, y, s, c: _published_loop(compiled, z, y, s, c)
    out["dit_fast"] = lambda z, y, s, c: sample(fast, y, s, c, noise=z, cuda_graph=False, backend=backend)
    if device.type == "cuda":
        out["dit_fast+graph"] = lambda z, y, s, c: sample(fast, y, s, c, noise=z, cuda_graph=True, backend=backend)
    return out


def run_sampling_bench(
    shape: DiTShape,
    *,
    device: torch.device,
    batches=None,
    num_steps: int = 250,
    cfg_scale: float = CFG_SCALE,
    rounds: int = 3,
    compile_ref: bool = False,
    backend: str = "auto",
    on_result: Callable[[dict], None] | None = None,
) -> list[dict]:
    """One row per (contender, batch): median ms per sampling call, spread, images/s, speedup vs reference."""
    device = torch.device(device)
    batches = tuple(batches or (GPU_BATCHES if device.type == "cuda" else CPU_BATCHES))
    torch.manual_seed(0)
    reference = build_reference(shape, device)
    from ..testing import randomize_weights_

    randomize_weights_(reference)  # the published init zeroes the output: a degenerate workload
    if shape.flow:
        from .flow_sampling import FLOW_PLANS, flow_contenders

        plans = [(plan.name, flow_contenders(reference, shape.family, plan, device, compile_ref=compile_ref,
                                             backend=backend)) for plan in FLOW_PLANS[shape.family]]
    else:
        plans = [("ddpm", sampling_contenders(reference, device, compile_ref=compile_ref, backend=backend))]
    rows = []
    for (plan, contenders), batch in ((p, b) for p in plans for b in batches):
        g = torch.Generator(device).manual_seed(batch)
        z = torch.randn(batch, shape.in_channels, shape.input_size, shape.input_size, device=device, generator=g)
        y = torch.randint(0, NUM_CLASSES, (batch,), device=device, generator=g)

        def timed(fn, z=z, y=y):  # bind this batch's inputs
            def call() -> float:
                _sync(device)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    fn(z, y, num_steps, cfg_scale)
                _sync(device)
                return (time.perf_counter() - t0) * 1e3

            return call

        samplers = {name: timed(fn) for name, fn in contenders.items()}
        # one untimed call each: compilation, cuBLAS/Triton autotuning, lazy init
        warm_errors = {}
        for name, fn in list(samplers.items()):
            try:
                fn()
            except Exception as e:  # recorded in the row; the others go on
                stop.check()
                warm_errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                samplers.pop(name)
        times, errors = run_rounds(samplers, rounds)
        errors.update(warm_errors)
        for name in contenders:
            st = spread(times.get(name, []))
            row = {
                "bench": "sample", "sampler": plan, "contender": name, "batch": batch, "num_steps": num_steps,
                "cfg_scale": cfg_scale, "device": str(device), "rounds": rounds,
                "median_ms": st["median"] if st else None,
                "spread_pct": st["spread_pct"] if st else None,
                "noisy": st["noisy"] if st else None,
                "images_per_s": (batch * 1e3 / st["median"]) if st else None,
                "ms_per_step": (st["median"] / num_steps) if st else None,
                "error": errors.get(name),
            }
            sp = ratio_stats(times.get("reference", []), times.get(name, [])) if name != "reference" else None
            row["speedup_vs_reference"] = sp["median"] if sp else None
            rows.append(row)
            if on_result:
                on_result(row)
    return rows
