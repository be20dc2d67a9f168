"""The one timing helper: warm-up, then the median of repeats.

CUDA: CUDA events around each repeat (device time, no host sync inside the timed region), or
triton.testing.do_bench (which also flushes L2 between repeats) for kernel microbenchmarks.
CPU: time.perf_counter around each repeat.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable


def _summary(times_ms: list[float]) -> dict:
    return {
        "median_ms": statistics.median(times_ms),
        "min_ms": min(times_ms),
        "max_ms": max(times_ms),
        "mean_ms": statistics.fmean(times_ms),
        "repeats": len(times_ms),
    }


def time_fn(fn: Callable[[], object], device, warmup: int = 3, iters: int = 10, progress=None) -> dict:
    """Run fn `warmup` times untimed, then `iters` timed repeats; returns the median and spread in ms.

    progress: optional callable invoked once per run (warm-up and timed) to advance a progress bar.
    """
    import torch

    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
        if progress:
            progress()
    times = []
    if cuda:
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
            if progress:
                progress()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            if progress:
                progress()
    return _summary(times)


def time_kernel(fn: Callable[[], object], device, warmup_ms: float = 25, rep_ms: float = 100,
                cpu_iters: int = 5) -> dict:
    """Microbenchmark timing: do_bench (median, L2 flushed) on CUDA when triton is present, else time_fn."""
    import torch

    if torch.device(device).type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
            return {"median_ms": float(ms), "repeats": None, "timer": "triton.do_bench"}
        return time_fn(fn, device, warmup=10, iters=50) | {"timer": "cuda_events"}
    return time_fn(fn, device, warmup=1, iters=cpu_iters) | {"timer": "perf_counter"}


def sample_kernel(fn: Callable[[], object], device, rep_ms: float = 20, cpu_iters: int = 3) -> float:
    """One sample (ms) of a microbenchmark for interleaved rounds: the median of a short burst.

    CUDA: do_bench over ~rep_ms (L2 flushed before each call), or CUDA events without triton; the CPU:
    perf_counter around cpu_iters calls. The caller warms fn up once before the rounds (warm_up).
    """
    import torch

    if torch.device(device).type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            return float(do_bench(fn, warmup=1, rep=rep_ms, return_mode="median"))
        return time_fn(fn, device, warmup=0, iters=10)["median_ms"]
    return time_fn(fn, device, warmup=0, iters=cpu_iters)["median_ms"]


def timer_name(device) -> str:
    import torch

    if torch.device(device).type != "cuda":
        return "perf_counter"
    try:
        import triton.testing  # noqa: F401
    except ImportError:
        return "cuda_events"
    return "triton.do_bench"


def warm_up(fn: Callable[[], object], device, n: int = 3) -> None:
    """n untimed calls (compiles, autotunes, fills caches), then a device synchronize."""
    import torch

    for _ in range(n):
        fn()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
