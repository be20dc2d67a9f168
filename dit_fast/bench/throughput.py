"""Model throughput: images/s, ms/iteration, TFLOP/s, MFU and peak memory of every contender and mode.

All contenders run in one process, one after the other, on the same inputs and the same weights
(each starts from the same pristine copy), so that their numbers are comparable. A contender
that fails (out of memory, compile error) is recorded with its error and the run goes on.
"""
from __future__ import annotations

import gc
from typing import Callable

import torch

from .contenders import contender_list, instantiate, make_inputs, make_step
from .flops import DiTShape, flops_per_step
from .timing import time_fn


def _progress_bar(total: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def run_throughput(
    shape: DiTShape,
    *,
    device: torch.device,
    dtype: torch.dtype,
    batch: int | dict[str, int],
    modes: list[str],
    backends: list[str] | None = None,
    compile_ref: bool = False,
    compile_fast: bool = False,
    attn: str = "auto",
    warmup: int = 3,
    iters: int = 10,
    gemm_tflops: float | None = None,
    on_result: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> list[dict]:
    """One row per (contender, mode); batch is one size or a size per mode."""
    from .contenders import build_reference

    torch.manual_seed(0)
    pristine = build_reference(shape, device)
    # Random weights: the published init zeroes adaLN and the final layer, which some kernels
    # could exploit (zeros run faster than real data).
    try:
        from ..testing import randomize_weights_

        randomize_weights_(pristine)
    except ImportError:  # pragma: no cover
        pass
    batches = batch if isinstance(batch, dict) else {m: batch for m in modes}
    inputs = {n: make_inputs(shape, n, device) for n in set(batches[m] for m in modes)}
    # peak memory is reported net of what every contender shares (the pristine weights, the inputs)
    shared_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    rows = []
    for c in contender_list(device.type, backends, compile_ref, compile_fast, attn):
        model = None
        for mode in modes:
            batch = batches[mode]
            row = {
                "contender": c.name,
                "backend": c.backend,
                "compiled": c.compiled,
                "attn": c.attn if c.kind == "dit_fast" else None,
                "mode": mode,
                "batch": batch,
                "dtype": str(dtype).replace("torch.", ""),
                "flops_per_iter": flops_per_step(shape, mode, batch),
            }
            bar = _progress_bar(warmup + iters, f"{c.name} {mode}") if progress else None
            try:
                if model is None or mode == "train":
                    # Fresh weights for training, which updates them; forward modes share one copy.
                    model = None
                    _free(device)
                    model = instantiate(c, pristine)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats(device)
                step = make_step(model, mode, inputs[batch], device, dtype)
                t = time_fn(step, device, warmup=warmup, iters=iters, progress=bar.update if bar else None)
                del step
                ms = t["median_ms"]
                row.update(
                    ms_per_iter=ms,
                    ms_min=t["min_ms"],
                    ms_max=t["max_ms"],
                    repeats=t["repeats"],
                    warmup=warmup,
                    images_per_s=batch / (ms * 1e-3),
                    tflops=row["flops_per_iter"] / (ms * 1e-3) / 1e12,
                )
                if gemm_tflops:
                    row["mfu"] = row["tflops"] / gemm_tflops
                if device.type == "cuda":
                    row["peak_mem_gib"] = (torch.cuda.max_memory_allocated(device) - shared_bytes) / 2**30
            except Exception as e:  # one contender's failure must not lose the others' numbers
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            finally:
                if bar:
                    bar.close()
            if mode == "train":
                model = None
            rows.append(row)
            if on_result:
                on_result(row)
        model = None
        _free(device)
    add_speedups(rows)
    return rows


def _free(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_eager / speedup_vs_compile: the reference's ms over this row's, per mode."""
    base = {}
    for r in rows:
        if r.get("ms_per_iter") and r["contender"] in ("reference", "reference+compile"):
            base[(r["contender"], r["mode"])] = r["ms_per_iter"]
    for r in rows:
        ms = r.get("ms_per_iter")
        if not ms:
            continue
        for key, ref in (("speedup_vs_eager", "reference"), ("speedup_vs_compile", "reference+compile")):
            if (ref, r["mode"]) in base:
                r[key] = base[(ref, r["mode"])] / ms
