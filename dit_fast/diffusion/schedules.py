"""Noise schedules (betas, float64 as published) and the timestep subsets used for respacing."""
from __future__ import annotations

import math

import numpy as np

__all__ = ["get_named_beta_schedule", "betas_for_alpha_bar", "space_timesteps"]


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Betas [T] in float64.

    "linear": Ho et al.'s 1e-4 .. 0.02, defined for 1000 steps; for other T both ends are scaled by
    1000 / T so the total noise added stays about the same (Improved DDPM, as published).
    "squaredcos_cap_v2" (or "cosine"): Nichol & Dhariwal's cosine alpha_bar, betas capped at 0.999.
    """
    if not isinstance(num_diffusion_timesteps, int) or num_diffusion_timesteps < 1:
        raise ValueError(f"num_diffusion_timesteps must be a positive int, got {num_diffusion_timesteps!r}")
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name in ("squaredcos_cap_v2", "cosine"):
        return betas_for_alpha_bar(
            num_diffusion_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        )
    raise ValueError(
        f"noise_schedule must be 'linear' or 'squaredcos_cap_v2', got {schedule_name!r}"
    )


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
    """Discretize a continuous alpha_bar(t), t in [0, 1]: beta_i = 1 - alpha_bar(t_{i+1}) / alpha_bar(t_i)."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts) -> set[int]:
    """Which of the original steps a respaced process keeps.

    section_counts: a list of counts, or a string: "250" (one section), "10,20,30" (the T steps cut
    into 3 equal sections, keeping 10, 20 and 30 evenly spaced steps of each, ends included), or
    "ddimN" (a fixed integer stride from 0 giving exactly N steps, as the DDIM paper does).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            try:
                desired = int(section_counts[len("ddim"):])
            except ValueError:
                raise ValueError(f"timestep_respacing {section_counts!r}: expected 'ddim<N>'") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"timestep_respacing {section_counts!r}: no integer stride gives exactly {desired} "
                f"of {num_timesteps} steps"
            )
        try:
            section_counts = [int(s) for s in section_counts.split(",")]
        except ValueError:
            raise ValueError(
                f"timestep_respacing must be '', 'N', 'ddimN' or 'N1,N2,...', got {section_counts!r}"
            ) from None
    counts = list(section_counts)
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"timestep_respacing sections must be positive counts, got {counts}")
    size_per, extra = divmod(num_timesteps, len(counts))
    start = 0
    kept: list[int] = []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        # Evenly spaced positions 0 .. size-1 (both ends), rounded half-to-even like Python's round.
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        pos = 0.0
        for _ in range(count):
            kept.append(start + round(pos))
            pos += stride
        start += size
    return set(kept)
