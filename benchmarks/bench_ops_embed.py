"""Microbenchmark of patch_embed, final_layer and linear_gelu_tanh at DiT-XL/2 shapes.

Backends side by side in one process: the torch backend in eager mode, the same functions under
torch.compile, and the Triton kernels. Times are medians of triton.testing.do_bench on CUDA; GB/s counts
each input read once and each output written once (the floor a fused kernel can reach), reported as a
percentage of the copy bandwidth measured in the same run.

    python benchmarks/bench_ops_embed.py [--quick] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dit_fast import ops
from dit_fast.ops import torch_backend as tb

C_IN, PATCH, HIDDEN, C_OUT = 4, 2, 1152, 8  # DiT-XL/2, learn_sigma: 8 output channels


def _bench(fn, device: str, grad_to_none=None) -> float:
    """Median milliseconds of fn()."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
    fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy (read + write) of nbytes: the ceiling of memory-bound ops."""
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src), device)
    return 2 * nbytes / ms / 1e6


def _cases(quick: bool):
    """(op, shape label, builder) where builder(device, dtype) -> (inputs, call(backend_fn, *inputs), bytes fwd, bytes bwd)."""
    if quick:
        configs = [(2, 8, 64)]  # batch, image side, hidden
    else:
        configs = [(256, 32, HIDDEN), (2, 32, HIDDEN), (256, 64, HIDDEN), (2, 64, HIDDEN)]
    for B, side, D in configs:
        T = (side // PATCH) ** 2
        yield "patch_embed", f"B={B} {side}x{side} D={D}", _patch_embed_case(B, side, D, T)
        yield "final_layer", f"B={B} L={T} D={D}", _final_layer_case(B, T, D)
        yield "linear_gelu_tanh", f"M={B * T} {D}->{4 * D}", _linear_gelu_case(B * T, D)


def _patch_embed_case(B, side, D, T):
    def build(device, dtype):
        e = torch.tensor([], dtype=dtype).element_size()
        K = C_IN * PATCH * PATCH
        x = torch.randn(B, C_IN, side, side, device=device, dtype=dtype)
        w = torch.randn(D, C_IN, PATCH, PATCH, device=device, dtype=dtype, requires_grad=True)
        b = torch.randn(D, device=device, dtype=dtype, requires_grad=True)
        pos = torch.randn(1, T, D, device=device, dtype=dtype)
        fwd = (x.numel() + D * K + D + T * D + B * T * D) * e
        bwd = (B * T * D + x.numel() + D * K + D) * e  # read dout, x; write dweight, dbias
        return (x, w, b, pos), (lambda f, *a: f(*a, PATCH)), fwd, bwd

    return build


def _final_layer_case(B, L, D):
    def build(device, dtype):
        e = torch.tensor([], dtype=dtype).element_size()
        P = PATCH * PATCH * C_OUT
        x = torch.randn(B, L, D, device=device, dtype=dtype, requires_grad=True)
        shift = torch.randn(B, D, device=device, dtype=dtype, requires_grad=True)
        scale = torch.randn(B, D, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(P, D, device=device, dtype=dtype, requires_grad=True)
        b = torch.randn(P, device=device, dtype=dtype, requires_grad=True)
        fwd = (B * L * D + 2 * B * D + P * D + P + B * L * P) * e
        bwd = (B * L * P + B * L * D + P * D + B * L * D + 2 * B * D + P * D + P) * e
        return (x, shift, scale, w, b), (lambda f, *a: f(*a, PATCH, C_OUT, 1e-6)), fwd, bwd

    return build


def _linear_gelu_case(M, D):
    def build(device, dtype):
        e = torch.tensor([], dtype=dtype).element_size()
        x = torch.randn(M, D, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(4 * D, D, device=device, dtype=dtype) / D**0.5).requires_grad_()
        b = torch.randn(4 * D, device=device, dtype=dtype, requires_grad=True)
        fwd = (M * D + 4 * D * D + 4 * D + M * 4 * D) * e
        # read dout, pre, x, W; write dx, dW, db (d(pre) is an unavoidable GEMM operand, not counted)
        bwd = (2 * M * 4 * D + 2 * M * D + 2 * 4 * D * D + 4 * D) * e
        return (x, w, b), (lambda f, *a: f(*a)), fwd, bwd

    return build


ALL_BACKENDS = ("torch", "torch.compile", "triton")
_compiled: dict = {}


def _backend_fn(op: str, backend: str):
    if backend == "torch":
        return getattr(tb, op)
    if backend == "torch.compile":  # one compiled function per op, recompiled per shape (dynamic=False)
        if op not in _compiled:
            _compiled[op] = torch.compile(getattr(tb, op), dynamic=False)
        return _compiled[op]
    return lambda *a: getattr(ops, op)(*a, backend=backend)


def run(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, quick: bool = False, backends=None) -> list[dict]:
    """Rows of {op, shape, pass, backend, ms, GB/s, pct_copy}; the last row is the measured copy bandwidth.

    Default backends: all three on CUDA, the torch backend alone on the CPU (quick smoke run).
    """
    if backends is None:
        backends = ALL_BACKENDS if device == "cuda" else ("torch",)
    rows = []
    copy = copy_bandwidth(device, (1 << 24) if quick else (1 << 30))
    for op, shape, build in _cases(quick):
        inputs, call, bytes_fwd, bytes_bwd = build(device, dtype)
        leaves = [t for t in inputs if t.requires_grad]
        for backend in backends:
            fn = _backend_fn(op, backend)
            out = call(fn, *inputs)
            grad = torch.randn_like(out)

            def fwd():
                with torch.no_grad():
                    call(fn, *inputs)

            def fwd_bwd():
                call(fn, *inputs).backward(grad)

            for pass_name, f, nbytes in (("fwd", fwd, bytes_fwd), ("fwd+bwd", fwd_bwd, bytes_fwd + bytes_bwd)):
                ms = _bench(f, device, grad_to_none=leaves if pass_name != "fwd" else None)
                gbs = nbytes / ms / 1e6
                rows.append(
                    {"op": op, "shape": shape, "pass": pass_name, "backend": backend, "ms": round(ms, 4),
                     "GB/s": round(gbs, 1), "pct_copy": round(100 * gbs / copy, 1)}
                )
            del out, grad
    rows.append({"op": "copy", "shape": "", "pass": "", "backend": "torch", "ms": None,
                 "GB/s": round(copy, 1), "pct_copy": 100.0})
    return rows


def _main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    rows = run(args.device, getattr(torch, args.dtype), args.quick or args.device == "cpu")
    for r in rows:
        print(f"{r['op']:18s} {r['shape']:24s} {r['pass']:8s} {r['backend']:14s} "
              f"{r['ms'] if r['ms'] is not None else '':>9} ms {r['GB/s']:>8} GB/s {r['pct_copy']:>6}%")
    if args.out:
        meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                "torch": torch.__version__, "dtype": args.dtype}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    _main()
