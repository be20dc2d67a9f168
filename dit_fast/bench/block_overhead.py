"""Host cost per DiT block of the model's forward (dit-fast overhead's "model forward per block" rows).

What it decides: whether a change to the model's Python path (the stock-module checks of
dit_fast.stock, the carry, the adaLN projections) costs host time per block. Method: a tiny model
(D=8, 2 heads, 4 tokens, batch 1) at two depths, eager forward, the same contenders in interleaved
rounds; cost per block = (median at DEEP - median at SHALLOW) / (DEEP - SHALLOW), which cancels the
embedders, the final layer and the call overhead. triton on CPU tensors has its launches stubbed, as
in the per-op rows (the figure is dit_fast's Python path around them).
"""
from __future__ import annotations

SHALLOW, DEEP = 2, 10


def _model(depth: int, backend: str, device):
    import torch

    from ..models import DiT

    torch.manual_seed(0)
    return DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=8, depth=depth, num_heads=2,
               num_classes=10, backend=backend).to(device)


def measure_blocks(device_type: str = "cpu", rounds: int = 5, emit=None) -> list[dict]:
    import torch

    from ..backends import probe
    from .overhead import CALLS, _sample, _stubbed
    from .rounds import run_rounds, spread

    device = torch.device(device_type)
    x = torch.randn(1, 4, 4, 4, device=device)
    t, y = torch.tensor([10.0], device=device), torch.tensor([1], device=device)
    samplers, meta = {}, {}
    for backend in ("torch", "ext", "triton"):
        ok, why = probe(backend, device_type)
        for grad in (False, True):
            key = f"{backend}/{'grad' if grad else 'no_grad'}"
            stub = backend == "triton" and device_type == "cpu"
            meta[key] = {"op": "model forward per block", "backend": backend, "grad": "yes" if grad else "no",
                         "launcher": "stubbed" if stub else "real"}
            if not ok:
                meta[key]["na"] = why
                continue
            for depth in (SHALLOW, DEEP):
                model = _model(depth, backend, device).train(grad).requires_grad_(grad)

                def fwd(model=model, grad=grad):
                    with torch.set_grad_enabled(grad):
                        return model(x, t, y)

                fn = (lambda f: lambda: _sample(f, device_type))(fwd)
                samplers[f"{key}/{depth}"] = _stubbed(fwd, device_type) if stub else fn
    for fn in samplers.values():  # warm-up: first calls resolve backends and build caches
        fn()
    times, errors = run_rounds(samplers, rounds)
    rows = []
    for key, row in meta.items():
        shallow, deep = spread(times.get(f"{key}/{SHALLOW}", [])), spread(times.get(f"{key}/{DEEP}", []))
        if shallow and deep:
            per_block = (deep["median"] - shallow["median"]) / (DEEP - SHALLOW)
            noisy = shallow["noisy"] or deep["noisy"]
            row.update(us_per_call=per_block, us_model_shallow=shallow["median"], us_model_deep=deep["median"],
                       depths=[SHALLOW, DEEP], spread_pct=max(shallow["spread_pct"], deep["spread_pct"]),
                       noisy=noisy, noise="NOISY" if noisy else None, rounds=deep["n"], calls_per_sample=CALLS,
                       device=device_type)
        for depth in (SHALLOW, DEEP):
            if f"{key}/{depth}" in errors:
                row["error"] = errors[f"{key}/{depth}"]
        rows.append(row)
        if emit:
            emit(row)
    return rows
