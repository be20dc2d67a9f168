"""CPU microbenchmarks of the fused adaLN ops: the C++ kernels of dit_fast._C ("ext") against the
eager PyTorch composition ("torch", dit_fast.ops.torch_backend) and torch.compile of it.

    python benchmarks/bench_ops_cpu.py [--quick] [--out results.json]

Wall-clock median of repeats (torch.utils.benchmark); GB/s counts each input read once and each
output written once.
"""
from __future__ import annotations

import argparse
import json
import platform

import torch
from torch.utils import benchmark

from dit_fast.ops import ext_backend, torch_backend

EPS = 1e-6
OPS = ("adaln_modulate", "gated_residual", "gated_residual_adaln")


def _inputs(op, B, L, D, dtype, requires_grad):
    big = [torch.randn(B, L, D, dtype=dtype, requires_grad=requires_grad) for _ in range(2)]
    mods = [torch.randn(B, D, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]
    return {
        "adaln_modulate": (big[0], mods[1], mods[2]),
        "gated_residual": (big[0], big[1], mods[0]),
        "gated_residual_adaln": (big[0], big[1], *mods),
    }[op]


def _fn(module, op):
    if op == "adaln_modulate":
        return lambda x, shift, scale: (module.adaln_modulate(x, shift, scale, EPS, None),)
    if op == "gated_residual":
        return lambda x, y, gate: (module.gated_residual(x, y, gate),)
    return lambda *a: tuple(module.gated_residual_adaln(*a, EPS, None))


def _bytes(op, B, L, D, dtype, backward):
    """Bytes moved by a fused implementation: [B, L, D] tensors in and out, plus the [B, D] vectors."""
    big, small = B * L * D * dtype.itemsize, B * D * dtype.itemsize
    fwd = {"adaln_modulate": 2 * big + 2 * small, "gated_residual": 3 * big + small,
           "gated_residual_adaln": 4 * big + 3 * small}[op]
    if not backward:
        return fwd
    # backward reads: modulate dh, x; gated dout, y; fused dh, dx_out, x_out, y. Writes dx (and dy).
    bwd = {"adaln_modulate": 3 * big + 3 * small, "gated_residual": 3 * big + 2 * small,
           "gated_residual_adaln": 6 * big + 6 * small}[op]
    return fwd + bwd


def _time_ms(stmt_fn, min_run_time):
    t = benchmark.Timer(stmt="f()", globals={"f": stmt_fn}).blocked_autorange(min_run_time=min_run_time)
    return t.median * 1e3


def run(quick: bool = False) -> list[dict]:
    ok, why = ext_backend.available("cpu")
    if not ok:
        raise RuntimeError(f"the ext backend is not usable on the CPU: {why}")
    B, L, D = 2, 256, 1152
    min_run_time = 0.2 if quick else 1.0
    dtypes = (torch.float32,) if quick else (torch.float32, torch.bfloat16)
    rows = []
    for dtype in dtypes:
        for op in OPS:
            backends = {
                "ext": _fn(ext_backend, op),
                "torch": _fn(torch_backend, op),
                "torch.compile": torch.compile(_fn(torch_backend, op), dynamic=False),
            }
            for pass_ in ("fwd", "fwd+bwd"):
                backward = pass_ == "fwd+bwd"
                args = _inputs(op, B, L, D, dtype, backward)
                grads = [torch.randn(B, L, D, dtype=dtype) for _ in range(2)]
                for name, fn in backends.items():
                    if backward:
                        def step(fn=fn):
                            outs = fn(*args)
                            torch.autograd.backward(outs, grads[: len(outs)])
                    else:
                        def step(fn=fn):
                            with torch.no_grad():
                                fn(*args)
                    step()  # warm-up (and compilation)
                    ms = _time_ms(step, min_run_time)
                    rows.append({
                        "op": op,
                        "shape": [B, L, D],
                        "dtype": str(dtype).replace("torch.", ""),
                        "pass": pass_,
                        "backend": name,
                        "ms": round(ms, 4),
                        "GB/s": round(_bytes(op, B, L, D, dtype, backward) / ms / 1e6, 2),
                    })
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", help="write the rows as JSON here")
    a = parser.parse_args()
    rows = run(quick=a.quick)
    print(f"{'op':22} {'dtype':9} {'pass':8} {'backend':14} {'ms':>9} {'GB/s':>8}")
    for r in rows:
        print(f"{r['op']:22} {r['dtype']:9} {r['pass']:8} {r['backend']:14} {r['ms']:9.3f} {r['GB/s']:8.2f}")
    if a.out:
        meta = {"device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                "torch": torch.__version__}
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
