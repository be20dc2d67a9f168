"""Model throughput: images/s, ms/iteration, TFLOP/s, MFU and peak memory of every contender and mode.

All contenders run in one process on the same inputs and the same weights (each starts from the
same pristine copy). They are timed in interleaved rounds (dit_fast.bench.rounds): round r runs one
step of every contender, in an order rotated by r, so that load from another job hits all of them
alike; each row reports the median over the rounds and its spread, and each speedup is the median of
per-round ratios. A contender that fails (out of memory, compile error) is recorded with its error
and the run goes on.

Phases per mode: the eager contenders are warmed up and timed first (and saved), then the compiled
ones are warmed up (compiling is the slow part) and the rounds run again with every contender; the
second set of rows replaces the first. A run cut by a timeout while compiling keeps the eager numbers.
Memory: every contender of a phase holds its model (and, for train, its optimizer state) at once.
"""
from __future__ import annotations

import gc
from typing import Callable

import torch

from .contenders import Contender, contender_list, instantiate, make_inputs, make_step
from .flops import DiTShape, flops_per_step
from .rounds import ratio_stats, run_rounds, spread
from .timing import time_fn

REFERENCES = (("speedup_vs_eager", "reference"), ("speedup_vs_compile", "reference+compile"))


def _progress_bar(total: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


class _Timed:
    """One contender in one mode: its model, its step, its memory figures."""

    def __init__(self, c: Contender, model, step, persistent_bytes: int):
        self.c, self.model, self.step = c, model, step
        self.persistent_bytes = persistent_bytes
        self.transient_peak = 0

    def sample(self, device) -> float:
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        ms = time_fn(self.step, device, warmup=0, iters=1)["median_ms"]
        if cuda:
            self.transient_peak = max(self.transient_peak, torch.cuda.max_memory_allocated(device) - before)
        return ms


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
    on_update: Callable[[list[dict]], None] | None = None,
    progress: bool = True,
) -> list[dict]:
    """One row per (contender, mode); `iters` is the number of rounds; batch is one size or one per mode.

    on_update(rows) runs after every round with every row measured so far (to checkpoint them).
    """
    from .contenders import build_reference

    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    torch.manual_seed(0)
    pristine = build_reference(shape, device)
    # Random weights: the published init zeroes adaLN and the final layer, which some kernels
    # could exploit (zeros run faster than real data).
    from ..testing import randomize_weights_

    randomize_weights_(pristine)
    batches = batch if isinstance(batch, dict) else {m: batch for m in modes}
    inputs = {n: make_inputs(shape, n, device) for n in set(batches[m] for m in modes)}
    contenders = contender_list(device.type, backends, compile_ref, compile_fast, attn)
    eager = [c for c in contenders if not c.compiled]
    phases = [eager] + ([contenders] if len(eager) < len(contenders) else [])
    done: list[dict] = []  # rows of finished modes
    forward_models: dict[str, object] = {}  # fwd and cfg share one eval copy per contender
    for mode in modes:
        if mode == "train":
            forward_models.clear()
            _free(device)
        n = batches[mode]
        flops = flops_per_step(shape, mode, n)
        rows: list[dict] = []
        for phase in phases:
            timed, failed = _prepare(phase, mode, pristine, inputs[n], device, dtype, warmup, forward_models, progress)
            bar = (_progress_bar(iters * len(timed), f"{mode}: {len(timed)} contenders x {iters} rounds")
                   if progress else None)

            def sampler(t: _Timed, bar=bar):
                def run():
                    ms = t.sample(device)
                    if bar:
                        bar.update()
                    return ms
                return run

            def rows_of(times, errors, phase=phase, failed=failed, mode=mode, n=n, flops=flops, timed=timed):
                out = []
                for c in phase:
                    if c.name in failed:
                        out.append(_row(c, mode, n, dtype, flops, None, failed[c.name], warmup))
                        continue
                    t = timed[c.name]
                    out.append(_row(c, mode, n, dtype, flops, times.get(c.name), errors.get(c.name), warmup,
                                    gemm_tflops, t, device))
                add_speedups(out)
                return out

            def save(_r, times, errors, done=done):
                nonlocal rows
                rows = rows_of(times, errors)
                if on_update:
                    on_update(done + rows)

            try:
                times, errors = run_rounds({name: sampler(t) for name, t in timed.items()}, iters, on_round=save)
                rows = rows_of(times, errors)
            finally:
                if bar:
                    bar.close()
                if mode == "train":
                    timed.clear()
                    _free(device)
        done += rows
        if on_update:
            on_update(done)
    forward_models.clear()
    _free(device)
    return done


def _prepare(phase, mode, pristine, inputs, device, dtype, warmup, forward_models, progress):
    """({name: _Timed} ready to time, {name: error}) for the contenders of a phase."""
    timed, failed = {}, {}
    for c in phase:
        try:
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            if mode == "train":
                model = instantiate(c, pristine)  # fresh weights: training updates them
            else:
                model = forward_models.get(c.name)
                if model is None:
                    model = forward_models[c.name] = instantiate(c, pristine)
            step = make_step(model, mode, inputs, device, dtype)
            # a compiled contender compiles in its first step: never time that one
            n_warm = max(warmup, 1) if c.compiled else warmup
            bar = _progress_bar(n_warm, f"warm-up {c.name} {mode}") if progress and n_warm else None
            time_fn(step, device, warmup=n_warm, iters=1, progress=bar.update if bar else None)
            if bar:
                bar.close()
            persistent = (torch.cuda.memory_allocated(device) - before) if device.type == "cuda" else 0
            timed[c.name] = _Timed(c, model, step, persistent)
        except Exception as e:
            failed[c.name] = _error(e)
            _free(device)
    return timed, failed


def _row(c: Contender, mode, batch, dtype, flops, times, error, warmup, gemm_tflops=None, t: _Timed | None = None,
         device=None) -> dict:
    row = {
        "contender": c.name,
        "backend": c.backend,
        "compiled": c.compiled,
        "attn": c.attn if c.kind == "dit_fast" else None,
        "mode": mode,
        "batch": batch,
        "dtype": str(dtype).replace("torch.", ""),
        "flops_per_iter": flops,
        "warmup": warmup,
    }
    s = spread(times or [])
    if s:
        ms = s["median"]
        row.update(
            ms_per_iter=ms,
            ms_min=s["min"],
            ms_max=s["max"],
            spread_pct=s["spread_pct"],
            iqr_pct=s["iqr_pct"],
            noisy=s["noisy"],
            rounds=s["n"],
            ms_rounds=list(times),
            images_per_s=batch / (ms * 1e-3),
            tflops=flops / (ms * 1e-3) / 1e12,
        )
        if gemm_tflops:
            row["mfu"] = row["tflops"] / gemm_tflops
        if device is not None and device.type == "cuda" and t is not None:
            row["peak_mem_gib"] = (t.persistent_bytes + t.transient_peak) / 2**30
    if error:
        row["error"] = error
    return row


def _free(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_eager / speedup_vs_compile per mode: the median over rounds of reference ms / this row's ms
    in the same round, with its spread (`*_spread_pct`, `*_min`, `*_max`, `*_noisy`).

    Rows without per-round times (older files) get the ratio of the medians, without a spread.
    """
    base = {}
    for r in rows:
        if r.get("ms_per_iter") and r["contender"] in ("reference", "reference+compile"):
            base[(r["contender"], r["mode"])] = r
    for r in rows:
        if not r.get("ms_per_iter"):
            continue
        for key, ref_name in REFERENCES:
            ref = base.get((ref_name, r["mode"]))
            if ref is None:
                continue
            s = None
            if r.get("ms_rounds") and ref.get("ms_rounds") and len(r["ms_rounds"]) == len(ref["ms_rounds"]):
                s = ratio_stats(ref["ms_rounds"], r["ms_rounds"])
            if s:
                r[key] = s["median"]
                r[f"{key}_min"], r[f"{key}_max"] = s["min"], s["max"]
                r[f"{key}_spread_pct"], r[f"{key}_noisy"] = s["spread_pct"], s["noisy"]
            else:
                r[key] = ref["ms_per_iter"] / r["ms_per_iter"]
