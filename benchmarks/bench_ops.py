"""pytest-benchmark harness of the fused ops: op x contender (eager, compile, triton, ext) x pass (fwd, fwd+bwd).

Two entry points share one engine (dit_fast.bench.kernels: inputs, contenders, byte model):

    dit-fast kernels [--compile] [--batch 256] [--dtype bf16]   # the numbers we report
        triton.testing.do_bench / CUDA events, copy bandwidth measured in the same run, JSON + Markdown +
        PNG with GB/s and % of copy bandwidth under benchmarks/results/.

    pytest benchmarks/bench_ops.py --benchmark-json out.json     # quick local comparisons
        pytest-benchmark wall clock (the timed function synchronizes on CUDA); bytes and GB/s go to
        extra_info. Compare runs with --benchmark-autosave / --benchmark-compare; select with -k, e.g.
        -k "gated_residual_adaln and not compile". --benchmark-disable runs each case once (a smoke test).

Shape and dtype: on CUDA DiT-XL/2 at B=256 L=256 D=1152, bf16 autocast; on the CPU a small B=2 L=64
D=384, float32. Override with DIT_FAST_BENCH_SHAPE="B,L,D" and DIT_FAST_BENCH_DTYPE=fp32|bf16|fp16.
The file name does not match test_*.py, so `pytest tests` (make test) never collects it; pytest
collects it when the path is given.
"""
from __future__ import annotations

import os

import pytest
import torch

from dit_fast.backends import OPS
from dit_fast.bench.contenders import parse_dtype
from dit_fast.bench.kernels import CONTENDERS, PASSES, contender_status, make_case, make_pass, op_fn

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"


def _shape() -> tuple[int, int, int]:
    text = os.environ.get("DIT_FAST_BENCH_SHAPE")
    if not text:
        return (256, 256, 1152) if CUDA else (2, 64, 384)
    try:
        B, L, D = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"DIT_FAST_BENCH_SHAPE must be 'B,L,D' (three integers), got {text!r}") from None
    return B, L, D


SHAPE = _shape()
DTYPE = parse_dtype(os.environ.get("DIT_FAST_BENCH_DTYPE") or ("bf16" if CUDA else "fp32"))
_cases: dict[str, object] = {}


def _case(op: str):
    # One set of inputs per op, shared by its contenders and passes (fwd+bwd uses autograd.grad:
    # nothing accumulates in them).
    if op not in _cases:
        _cases.clear()  # parametrize order is op-major: free the previous op's tensors
        torch.manual_seed(0)
        _cases[op] = make_case(op, *SHAPE, DTYPE, DEVICE)
    return _cases[op]


@pytest.mark.parametrize("pass_", PASSES, ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("op", OPS)
def test_op(benchmark, op, contender, pass_):
    ok, why = contender_status(contender, DEVICE.type)
    if not ok:
        pytest.skip(f"{contender} does not run on {DEVICE.type}: {why}")
    fn = op_fn(contender, op)
    if fn is None:
        pytest.skip(f"{contender} has no {op} kernel")
    case = _case(op)
    run, nbytes = make_pass(case, fn, DEVICE, DTYPE, pass_)
    run()  # warm-up outside the timing: the first backward of a compiled function compiles it

    if CUDA:
        def timed():
            out = run()
            torch.cuda.synchronize()  # pytest-benchmark reads a host clock
            return out
    else:
        timed = run

    benchmark.group = f"{op} {pass_} {case.label} {str(DTYPE).replace('torch.', '')}"
    benchmark.extra_info.update(op=op, contender=contender, pass_=pass_, shape=list(SHAPE), device=str(DEVICE),
                                dtype=str(DTYPE).replace("torch.", ""), bytes=nbytes)
    benchmark(timed)
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    if stats is not None:
        median_s = stats.stats.median
        benchmark.extra_info["gb_per_s"] = float(f"{nbytes / median_s / 1e9:.4g}")
