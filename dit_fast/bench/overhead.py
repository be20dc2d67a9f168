"""Host overhead per call of every op wrapper in dit_fast.ops, per backend, with and without autograd.

What it decides: how small a batch the GPU path serves before the host (Python, dispatch, autograd
bookkeeping, launches) rather than the GPU sets the pace, without CUDA graphs.

Method: tiny inputs (B=1, L=4, D=8: a few hundred bytes per tensor) through the public wrapper
(`dit_fast.ops.<op>(..., backend=b)`: input checks, backend resolution, the backend's autograd
Function or custom op, output allocation), eager. "autograd" = inputs require grad, so the forward
also records the graph (the backward is not run). Per op, the contenders (backend x autograd) are
timed in interleaved rounds (dit_fast.bench.rounds); one sample = the mean over CALLS calls.

Backends on the CPU: torch and ext run their real (tiny) kernels, so their figure includes a few
microseconds of compute. triton on CPU tensors can only run under the Triton interpreter, whose
cost (milliseconds) says nothing about the GPU; so its kernel launches are stubbed (`kernel[grid]`
does nothing) and the figure is dit_fast's Python path around them: wrapper, checks, autograd
Function, output allocation, grid arithmetic. Triton's own launch cost (argument binding and the
driver call in JITFunction.run, a few to tens of microseconds depending on the version) is NOT in
it; on a GPU, `python -m dit_fast.bench.overhead --device cuda` measures the whole path for real.

The measurement runs in a child process with TRITON_INTERPRET=1 (so that the triton backend accepts
CPU tensors whatever this process imported before) and reports JSON lines.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from typing import Callable

TINY = dict(B=1, L=4, D=8)
CALLS = 200
MODEL_ROW = "model"  # --op model: the model's forward per block (dit_fast.bench.block_overhead)
H_DTYPE_LAST = ("adaln_modulate", "gated_residual_adaln")
NOTES = [
    "Host overhead: tiny tensors (B=1 L=4 D=8) through dit_fast.ops.<op>(..., backend=...), eager, microseconds per "
    "call (median over interleaved rounds of the mean of 200 calls). torch/ext include their tiny kernels' compute.",
    "Host overhead, triton on the CPU: kernel launches stubbed (the interpreter's cost means nothing for a GPU); the "
    "figure is dit_fast's Python path around the launches, without Triton's own launch cost (JITFunction.run: "
    "argument binding + driver call). On a GPU, `python -m dit_fast.bench.overhead --device cuda` times it all.",
]


@contextlib.contextmanager
def stubbed_triton_launches():
    """`kernel[grid](...)` does nothing inside this block (JIT and interpreted kernels alike)."""
    import triton.runtime.jit as jit

    classes = [jit.JITFunction]
    with contextlib.suppress(ImportError, AttributeError):
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    saved = {cls: cls.__dict__.get("__getitem__") for cls in classes}

    def no_launch(self, grid):
        return lambda *args, **kwargs: None

    for cls in classes:
        cls.__getitem__ = no_launch
    try:
        yield
    finally:
        for cls, original in saved.items():
            if original is None:
                del cls.__getitem__
            else:
                cls.__getitem__ = original


def _call(op: str, backend: str, case) -> Callable[[], object]:
    import dit_fast.ops as ops

    fn = getattr(ops, op)
    args, kwargs = list(case.args), {"backend": backend}
    if op in H_DTYPE_LAST:  # the backends take h_dtype positionally, the public wrapper by keyword
        kwargs["h_dtype"] = args.pop()
    return lambda: fn(*args, **kwargs)


def _sample(fn: Callable[[], object], device_type: str, calls: int = CALLS) -> float:
    """Microseconds per call, the mean over `calls` back-to-back calls (host time; no sync inside)."""
    import torch

    cuda = device_type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    if cuda:
        torch.cuda.synchronize()  # outside the timed span: the host's cost per call, not the queue's
    return (t1 - t0) / calls * 1e6


def measure(device_type: str = "cpu", rounds: int = 5, ops: list[str] | None = None, emit=None) -> list[dict]:
    """The overhead rows, measured in this process (the triton backend must be usable here)."""
    import torch

    from ..backends import OPS, implements, probe
    from .kernels import make_case
    from .rounds import run_rounds, spread

    device = torch.device(device_type)
    # One intra-op thread: tiny tensors never use more, and on a busy machine a spinning pool measures the load
    torch.set_num_threads(1)
    rows = []
    for op in [o for o in ops or OPS if o != MODEL_ROW]:
        torch.manual_seed(0)
        samplers, meta = {}, {}
        for backend in ("torch", "ext", "triton"):
            ok, why = probe(backend, device_type)
            if ok and not implements(backend, op):
                ok, why = False, f"{backend} has no {op} kernel"
            for grad in (False, True):
                key = f"{backend}/{'grad' if grad else 'no_grad'}"
                stub = backend == "triton" and device_type == "cpu"
                meta[key] = {"op": op, "backend": backend, "grad": "yes" if grad else "no",
                             "launcher": "stubbed" if stub else "real"}
                if not ok:
                    meta[key]["na"] = why
                    continue
                case = make_case(op, dtype=torch.float32, device=device, **TINY)
                for i, a in enumerate(case.args):
                    if isinstance(a, torch.Tensor):
                        case.args[i] = a.detach().requires_grad_(grad and i in case.grad_inputs)
                fn = _call(op, backend, case)
                samplers[key] = _stubbed(fn, device_type) if stub else (lambda f: lambda: _sample(f, device_type))(fn)
        for fn in samplers.values():  # warm-up: first calls import, resolve backends, build caches
            fn()
        times, errors = run_rounds(samplers, rounds)
        for key, row in meta.items():
            s = spread(times.get(key, []))
            if s:
                row.update(us_per_call=s["median"], us_min=s["min"], us_max=s["max"], spread_pct=s["spread_pct"],
                           noisy=s["noisy"], noise="NOISY" if s["noisy"] else None, rounds=s["n"],
                           calls_per_sample=CALLS, device=device_type)
            if key in errors:
                row["error"] = errors[key]
            rows.append(row)
            if emit:
                emit(row)
    if ops is None or MODEL_ROW in ops:
        from .block_overhead import measure_blocks

        rows += measure_blocks(device_type, rounds, emit=emit)
    return rows


def _stubbed(fn, device_type):
    def sample():
        with stubbed_triton_launches():
            return _sample(fn, device_type)

    return sample


def run_overhead(rounds: int = 5, ops: list[str] | None = None, on_result=None, timeout_s: float = 900) -> list[dict]:
    """The CPU overhead table, measured in a child process with TRITON_INTERPRET=1 (see the module doc)."""
    cmd = [sys.executable, "-m", "dit_fast.bench.overhead", "--rounds", str(rounds)]
    if ops:
        cmd += ["--op", ",".join(ops)]
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"overhead measurement failed (rc {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    rows = []
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            rows.append(row)
            if on_result:
                on_result(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="host overhead per op call (JSON lines on stdout)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--op", default=None, help=f"comma list of ops, '{MODEL_ROW}' for the model's cost per block "
                   "(default all)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"argument --rounds: expected an integer >= 1, got {args.rounds}")
    ops = [o for o in (args.op or "").split(",") if o] or None
    measure(args.device, args.rounds, ops, emit=lambda row: print(json.dumps(row), flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
