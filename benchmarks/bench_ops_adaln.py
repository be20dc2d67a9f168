"""Microbenchmark of the adaLN ops at DiT-XL shapes: torch eager, torch.compile, triton, ext.

GB/s counts each input read once and each output written once (the fused floor); pct_copy is
that against a device-to-device copy measured in the same run. CUDA times are medians of
triton.testing.do_bench; on the CPU (quick=True) a few perf_counter repeats of tiny shapes.

    python benchmarks/bench_ops_adaln.py [--quick] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import dit_fast.ops as ops
from dit_fast import backends
from dit_fast.ops import torch_backend

EPS = 1e-6
OP_NAMES = ("adaln_modulate", "gated_residual", "gated_residual_adaln")
# Per op: (token tensors read, token tensors written) forward and backward, in units of B*L*D elements.
TRAFFIC = {
    "adaln_modulate": {"fwd": (1, 1), "bwd": (2, 1)},  # bwd reads dh, x; writes dx
    "gated_residual": {"fwd": (2, 1), "bwd": (2, 2)},  # bwd reads dout, y; writes dx, dy
    "gated_residual_adaln": {"fwd": (2, 2), "bwd": (4, 2)},  # bwd reads dx_out, dh, x_out, y; writes dx, dy
}
N_MODS = {"adaln_modulate": 2, "gated_residual": 1, "gated_residual_adaln": 3}


def _timer(device: str):
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, return_mode="median")

    def cpu_ms(fn, repeats=10):
        fn(), fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu_ms


def copy_bandwidth_gbs(device: str, dtype: torch.dtype, quick: bool) -> float:
    n = (1 << 20) if quick or device != "cuda" else (1 << 30) // torch.tensor([], dtype=dtype).element_size()
    src = torch.randn(n, device=device).to(dtype)
    dst = torch.empty_like(src)
    ms = _timer(device)(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def _op_fn(op: str, backend: str):
    """fn(x, y, gate, shift, scale) -> tuple of outputs, for a backend name or "compile"."""
    if backend in ("eager", "compile"):
        mod = torch_backend
        fns = {
            "adaln_modulate": lambda x, y, g, sh, sc: (mod.adaln_modulate(x, sh, sc, EPS, None),),
            "gated_residual": lambda x, y, g, sh, sc: (mod.gated_residual(x, y, g),),
            "gated_residual_adaln": lambda x, y, g, sh, sc: mod.gated_residual_adaln(x, y, g, sh, sc, EPS, None),
        }
        fn = fns[op]
        return torch.compile(fn) if backend == "compile" else fn
    fns = {
        "adaln_modulate": lambda x, y, g, sh, sc: (ops.adaln_modulate(x, sh, sc, EPS, backend=backend),),
        "gated_residual": lambda x, y, g, sh, sc: (ops.gated_residual(x, y, g, backend=backend),),
        "gated_residual_adaln": lambda x, y, g, sh, sc: ops.gated_residual_adaln(x, y, g, sh, sc, EPS, backend=backend),
    }
    return fns[op]


def _inputs_used(op: str, t: dict) -> list:
    names = {"adaln_modulate": ("x", "shift", "scale"), "gated_residual": ("x", "y", "gate")}.get(
        op, ("x", "y", "gate", "shift", "scale"))
    return [t[k] for k in names]


def _backends(device: str) -> list[str]:
    names = ["eager"] + (["compile"] if device == "cuda" else [])
    for b in ("triton", "ext"):
        if backends.probe(b, device)[0] and (device == "cuda" or b == "ext"):
            names.append(b)
    return names


def run(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, quick: bool = False) -> list[dict]:
    """Rows of {op, shape, pass, backend, ms, GB/s, pct_copy}; quick: tiny shapes, seconds on a CPU."""
    timer = _timer(device)
    copy_gbs = copy_bandwidth_gbs(device, dtype, quick)
    shapes = [(2, 16, 1152)] if quick else [(256, 256, 1152), (256, 1024, 1152), (2, 256, 1152), (2, 1024, 1152)]
    elem = torch.tensor([], dtype=dtype).element_size()
    rows = []
    for B, L, D in shapes:
        t = {k: torch.randn(B, L, D, device=device).to(dtype) for k in ("x", "y")}
        t.update({k: (0.5 * torch.randn(B, D, device=device)).to(dtype) for k in ("gate", "shift", "scale")})
        for op in OP_NAMES:
            for backend in _backends(device):
                if backend in ("triton", "ext") and not backends.implements(backend, op):
                    continue
                fn = _op_fn(op, backend)
                args = [t[k] for k in ("x", "y", "gate", "shift", "scale")]
                leaves = [a.detach().requires_grad_() for a in args]
                used = _inputs_used(op, dict(zip(("x", "y", "gate", "shift", "scale"), leaves)))
                cot = [torch.randn_like(o) for o in fn(*args)]

                def fwd_bwd():
                    return torch.autograd.grad(fn(*leaves), used, cot)

                for pass_, call in (("fwd", lambda: fn(*args)), ("fwd+bwd", fwd_bwd)):
                    reads, writes = TRAFFIC[op]["fwd"]
                    mods = N_MODS[op]
                    if pass_ == "fwd+bwd":
                        r2, w2 = TRAFFIC[op]["bwd"]
                        reads, writes = reads + r2, writes + w2
                        mods *= 3  # read in fwd, read again and grad written in bwd
                    nbytes = ((reads + writes) * B * L * D + mods * B * D) * elem
                    ms = timer(call)
                    gbs = nbytes / ms / 1e6
                    rows.append({
                        "op": op, "shape": [B, L, D], "pass": pass_, "backend": backend,
                        "ms": round(ms, 5), "GB/s": round(gbs, 1), "pct_copy": round(100 * gbs / copy_gbs, 1),
                    })
    for r in rows:
        r["copy_GB/s"] = round(copy_gbs, 1)
        r["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        r["dtype"] = str(dtype).replace("torch.", "")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args()
    rows = run(a.device, quick=a.quick or a.device != "cuda")
    for r in rows:
        print(f"{r['op']:22s} {str(r['shape']):18s} {r['pass']:8s} {r['backend']:8s} "
              f"{r['ms']:9.4f} ms {r['GB/s']:8.1f} GB/s {r['pct_copy']:6.1f}% of copy")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
