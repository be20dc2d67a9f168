"""Numerical parity of dit_fast against the reference model (DiT, SiT or LightningDiT: the shape's family):
outputs and gradients, per backend and dtype.

Method (docs/DESIGN.md section 6): all weights randomized (the published init zeroes adaLN and the
final layer, so any two fresh models agree trivially); the reference in float64 is the truth.
For each dtype, the reference itself at that precision sets the bar: dit_fast's relative error
against float64 must be at most 2x the reference's own (+1e-6) -- for float32 at most
max(1e-5, that), since errors grow over a deep model's layers. Low precision runs with float32
weights under autocast, as in training. Gradients: of every trainable parameter (concatenated)
and of the input latent, for a random cotangent on the output.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn

from . import stop
from .contenders import autocast_ctx, available_backends, build_reference
from .flops import DiTShape

FP32_RTOL = 1e-5
LOWP_FACTOR = 2.0
LOWP_SLACK = 1e-6


# Computed in float64 on the tensors' own device: a DiT-XL/2 gradient has 675M elements.
def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    d = ref.norm().item()
    e = (out - ref).norm().item()
    return e / d if d > 0 else e


def _max_abs(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.detach().double() - ref.detach().double()).abs().max().item()


def _run(model: nn.Module, x, t, y, cot, device, dtype) -> dict[str, torch.Tensor]:
    """Output, input gradient and every trainable parameter's gradient (flattened, concatenated)."""
    model.eval()
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with autocast_ctx(device, dtype):
        out = model(x, t, y)
    (out.to(cot.dtype) * cot).sum().backward()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    grads = {n: (params[n].grad if params[n].grad is not None else torch.zeros_like(params[n])) for n in names}
    return {
        "output": out.detach(),
        "grad_input": x.grad.detach(),
        "grad_params": torch.cat([g.reshape(-1).double() for g in grads.values()]),
        "_per_param": grads,
    }


def _bound(dtype: torch.dtype, ref_err: float) -> float:
    if dtype == torch.float32:
        return max(FP32_RTOL, LOWP_FACTOR * ref_err)
    return LOWP_FACTOR * ref_err + LOWP_SLACK


def run_parity(
    shape: DiTShape,
    *,
    device: torch.device,
    batch: int = 2,
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16),
    backends: list[str] | None = None,
    attn: str = "auto",
    tamper: Callable[[nn.Module], None] | None = None,
    seed: int = 0,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """One row per (backend, dtype, quantity); tamper(fast_model) lets a test break the fast model on purpose.
    on_row(row) runs as soon as each row is measured (to checkpoint it)."""
    from ..models import from_reference
    from ..testing import randomize_weights_

    torch.manual_seed(seed)
    ref = build_reference(shape, device)
    randomize_weights_(ref)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    s = shape.input_size
    x = torch.randn(batch, shape.in_channels, s, s, generator=g).to(device)
    t = (torch.rand(batch, generator=g) * (1 if shape.flow else 1000)).to(device)  # flow models: t in [0, 1]
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    cot = torch.randn(batch, shape.returned_channels, s, s, generator=g, dtype=torch.float64).to(device)

    truth = _run(copy.deepcopy(ref).double(), x.double(), t.double(), y, cot, device, torch.float64)
    rows: list[dict] = []

    def add(row: dict) -> None:
        rows.append(row)
        if on_row:
            on_row(row)

    for dtype in dtypes:
        base = _run(ref, x, t, y, cot.float(), device, dtype)
        base_err = {q: _rel(base[q], truth[q]) for q in ("output", "grad_input", "grad_params")}
        for backend in backends or available_backends(device.type):
            fast = from_reference(ref, backend=backend, attn_backend=attn)
            if tamper is not None:
                tamper(fast)
            try:
                ours = _run(fast, x, t, y, cot.float(), device, dtype)
            except Exception as e:
                stop.check()
                add({"backend": backend, "dtype": str(dtype).replace("torch.", ""), "quantity": "all",
                             "pass": False, "error": f"{type(e).__name__}: {e}"[:300]})
                continue
            for q in ("output", "grad_input", "grad_params"):
                ref_err = base_err[q]
                err = _rel(ours[q], truth[q])
                bound = _bound(dtype, ref_err)
                finite = bool(torch.isfinite(ours[q]).all())
                row = {
                    "backend": backend,
                    "dtype": str(dtype).replace("torch.", ""),
                    "quantity": q,
                    "rel_err_vs_fp64": err,
                    "ref_rel_err_vs_fp64": ref_err,
                    "bound": bound,
                    "rel_err_vs_ref": _rel(ours[q], base[q]),
                    "max_abs_vs_ref": _max_abs(ours[q], base[q]),
                    "pass": finite and err <= bound,
                }
                if q == "grad_params":
                    per = {n: _rel(g, truth["_per_param"][n]) for n, g in ours["_per_param"].items()}
                    row["worst_param"] = max(per, key=per.get)
                    row["worst_param_rel_err"] = per[row["worst_param"]]
                add(row)
            del fast
    return rows


def all_pass(rows: list[dict]) -> bool:
    return bool(rows) and all(r["pass"] for r in rows)
