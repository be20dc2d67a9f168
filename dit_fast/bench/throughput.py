"""Model throughput: images/s, ms/iteration, TFLOP/s, MFU and peak memory of every contender and mode.

All contenders run in one process on the same inputs and the same weights (each starts from the
same pristine copy). They are timed in interleaved rounds (dit_fast.bench.rounds): round r runs one
step of every contender, in an order rotated by r, so that load from another job hits all of them
alike; each row reports the median over the rounds and its spread, and each speedup is the median of
per-round ratios. A contender that fails (out of memory, compile error) is recorded with its error
and the run goes on.

Phases per (mode, batch): the eager contenders are warmed up and timed first (and saved), then the
compiled ones are warmed up (compiling is the slow part) and the rounds run again with every contender;
the second set of rows replaces the first. A run cut by a timeout while compiling keeps the eager numbers.
Memory in the forward modes: every contender of a phase holds its model at once (peak_mem_gib = its own
model's bytes + the peak above them during its steps).

Training steps share ONE set of weights and ONE optimizer (contenders.instantiate(share_weights=True)):
every contender of a phase is a view of the same Parameters (the reference's module tree copied around the
very same Parameter objects, dit_fast from_reference(share_weights=True), compiled variants wrapping those),
so memory holds one model + one AdamW state + one step's activations, and the training steps are
interleaved in rounds like the forward modes (each contender's step trains the weights the next one
uses; every contender computes the same function, so the run is one training run). Each phase starts
from a fresh copy of the pristine weights. peak_mem_gib of a training row = the largest
torch.cuda.max_memory_allocated over its steps (reset before each of its steps) above what was allocated
before the phase's model was built: weights, gradients, optimizer state and that contender's activations.
Each row keeps its steps' losses (`losses`, in the order of its rounds).

isolate_train=True keeps the issue-20 way: one contender at a time ("isolated"), each alone in memory
with its own model and optimizer, `iters` consecutive steps, speedups as ratios of medians (no paired
rounds). The largest batch that fits (max_batch, CUDA) is found per eager contender, alone in memory, by
doubling the batch, then bisecting in multiples of 32, one step per try, each try's CUDA out-of-memory
error caught and its memory freed before the next.
"""
from __future__ import annotations

import copy
import gc
from typing import Callable

import torch

from . import stop
from .contenders import Contender, contender_list, instantiate, make_inputs, make_optimizer, make_step
from .flops import DiTShape, flops_per_step
from .rounds import ratio_stats, run_rounds, spread
from .timing import time_fn

REFERENCES = (("speedup_vs_eager", "reference"), ("speedup_vs_compile", "reference+compile"),
              ("speedup_vs_compile_blocks", "reference+compile-blocks"))


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
    batch: int | dict[str, int | list[int]],
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
    contenders: list[str] | None = None,
    isolate_train: bool = False,
    max_batch: bool = False,
    max_batch_limit: int = 1024,
    lr: float = 1e-4,
) -> list[dict]:
    """One row per (contender, mode, batch); `iters` is the number of rounds (isolated: timed steps);
    batch is one size, or one size or a list of sizes per mode. shape.family picks the models and, for
    training, the objective (contenders.make_step).

    Training rows: interleaved rounds on one shared set of weights and one optimizer (module docstring);
    isolate_train: one contender at a time, each alone in memory with its own copy. max_batch: after the
    listed batches, find each eager contender's largest training batch that fits (alone in memory, CUDA)
    and time it. on_update(rows) runs after every round (every isolated row) with every row measured so
    far (to checkpoint them). lr: the training step's learning rate (0 leaves the weights as they are).
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if max_batch and device.type != "cuda":
        raise ValueError("max_batch needs a CUDA device (it catches CUDA out-of-memory errors), "
                         f"got device {device.type!r}")
    pristine = pristine_reference(shape, device)
    batches = {m: _as_list(batch[m] if isinstance(batch, dict) else batch) for m in modes}
    all_contenders = contender_list(device.type, backends, compile_ref, compile_fast, attn, only=contenders,
                                    family=shape.family)
    eager = [c for c in all_contenders if not c.compiled]
    phases = [eager] + ([all_contenders] if len(eager) < len(all_contenders) else [])
    done: list[dict] = []  # rows of finished (mode, batch) pairs
    forward_models: dict[str, object] = {}  # fwd and cfg share one eval copy per contender
    for mode in modes:
        if mode == "train":
            forward_models.clear()
            _free(device)
        for n in batches[mode]:
            inputs = make_inputs(shape, n, device)
            if mode == "train" and isolate_train:
                # eager contenders first, compiled last (the module order of contender_list)
                for c in all_contenders:
                    done.append(_isolated_row(c, n, pristine, inputs, shape, device, dtype, warmup, iters,
                                              gemm_tflops, progress, lr))
                    add_speedups(done)
                    if on_update:
                        on_update(done)
                continue
            if mode == "train":
                done += _shared_training_rows(phases, n, pristine, inputs, shape, device, dtype, warmup, iters,
                                              gemm_tflops, progress, done, on_update, lr)
                if on_update:
                    on_update(done)
                del inputs
                continue
            rows = _interleaved_rows(phases, mode, n, pristine, inputs, shape, device, dtype, warmup, iters,
                                     gemm_tflops, forward_models, progress, done, on_update)
            done += rows
            if on_update:
                on_update(done)
            del inputs
    forward_models.clear()
    _free(device)
    if max_batch and "train" in modes:
        start = max(batches["train"])
        for c in eager:
            done.append(_largest_batch_row(c, start, max_batch_limit, pristine, shape, device, dtype, warmup, iters,
                                           gemm_tflops, progress, lr))
            if on_update:
                on_update(done)
    return done


def pristine_reference(shape: DiTShape, device) -> torch.nn.Module:
    """The weights every contender starts from: the family's reference model, seeded (0), with random weights
    (the published init zeroes adaLN and the final layer, which some kernels could exploit: zeros run faster
    than real data). Draws from the global generator, as run_throughput does first thing."""
    from ..testing import randomize_weights_
    from .contenders import build_reference

    torch.manual_seed(0)
    return randomize_weights_(build_reference(shape, device))


def _as_list(b) -> list[int]:
    return list(b) if isinstance(b, (list, tuple)) else [b]


def _interleaved_rows(phases, mode, n, pristine, inputs, shape, device, dtype, warmup, iters, gemm_tflops,
                      forward_models, progress, done, on_update) -> list[dict]:
    """Every contender of (mode, n) timed in interleaved rounds, eager phase first, then all of them."""
    flops = flops_per_step(shape, mode, n)
    rows: list[dict] = []
    for phase in phases:
        timed, failed = _prepare(phase, mode, pristine, inputs, device, dtype, warmup, forward_models, progress)
        bar = (_progress_bar(iters * len(timed), f"{mode} B={n}: {len(timed)} contenders x {iters} rounds")
               if progress else None)

        def sampler(t: _Timed, bar=bar):
            def run():
                ms = t.sample(device)
                if bar:
                    bar.update()
                return ms
            return run

        def rows_of(times, errors, phase=phase, failed=failed, timed=timed):
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

        try:
            rows = _rounds_rows(timed, sampler, rows_of, iters, done, on_update, bar)
        finally:
            if mode == "train":
                timed.clear()
                _free(device)
    return rows


def _rounds_rows(timed: dict, sampler, rows_of, iters: int, done: list[dict], on_update, bar) -> list[dict]:
    """The phase's `iters` interleaved rounds (sampler(t): one timed step of t); its rows (rows_of(times,
    errors)) after the last. After every round, on_update gets the finished rows plus this phase's so far.
    The progress bar (or None) is closed however the rounds end."""
    def save(_r, times, errors):
        rows = rows_of(times, errors)
        if on_update:
            on_update(done + rows)

    try:
        times, errors = run_rounds({name: sampler(t) for name, t in timed.items()}, iters, on_round=save)
        return rows_of(times, errors)
    finally:
        if bar:
            bar.close()


class _SharedStep:
    """One contender's training step on the shared weights: its timed samples, peak memory and losses."""

    def __init__(self, c: Contender, step, base_bytes: int):
        self.c, self.step, self.base = c, step, base_bytes
        self.peak = 0
        self.losses: list[float] = []

    def sample(self, device) -> float:
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        ms = time_fn(self.step, device, warmup=0, iters=1)["median_ms"]  # synchronizes on CUDA
        if cuda:
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(device) - self.base)
        self.losses.append(float(self.step.last_loss))
        return ms


def _shared_training_rows(phases, n, pristine, inputs, shape, device, dtype, warmup, iters, gemm_tflops, progress,
                          done, on_update, lr) -> list[dict]:
    """The training step of every contender in interleaved rounds on one shared model + optimizer (module
    docstring); eager phase first, then all (a fresh copy of the pristine weights per phase)."""
    flops = flops_per_step(shape, "train", n)
    cuda = device.type == "cuda"
    rows: list[dict] = []
    for phase in phases:
        if any(c.compiled for c in phase):
            # fresh compiles, as in a user's process: a second batch size of the same code would otherwise be
            # compiled with dynamic shapes (automatic dynamic), not for the batch it runs
            torch._dynamo.reset()
        _free(device)
        base = 0
        if cuda:
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
        master = copy.deepcopy(pristine)
        optimizer = make_optimizer(master.parameters(), device, lr, shape.family)
        timed: dict[str, _SharedStep] = {}
        failed: dict[str, str] = {}
        for c in phase:
            try:
                model = instantiate(c, master, share_weights=True)
                step = make_step(model, "train", inputs, device, dtype, lr, shape=shape, optimizer=optimizer)
                n_warm = max(warmup, 1) if c.compiled else warmup  # a compiled contender compiles in its first step
                bar = _progress_bar(n_warm, f"warm-up {c.name} train B={n}") if progress and n_warm else None
                for _ in range(n_warm):
                    step()
                    if bar:
                        bar.update()
                if bar:
                    bar.close()
                timed[c.name] = _SharedStep(c, step, base)
            except Exception as e:
                stop.check()
                failed[c.name] = _error(e)
                optimizer.zero_grad(set_to_none=True)  # a step that failed after its backward
        bar = (_progress_bar(iters * len(timed), f"train B={n}: {len(timed)} contenders x {iters} rounds (shared)")
               if progress else None)

        def sampler(t: _SharedStep, bar=bar, optimizer=optimizer):
            def run():
                try:
                    return t.sample(device)
                except Exception:
                    optimizer.zero_grad(set_to_none=True)  # the next contender starts without this one's gradients
                    raise
                finally:
                    if bar:
                        bar.update()
            return run

        def rows_of(times, errors, phase=phase, failed=failed, timed=timed):
            out = []
            for c in phase:
                if c.name in failed:
                    out.append(_row(c, "train", n, dtype, flops, None, failed[c.name], warmup))
                else:
                    t = timed[c.name]
                    out.append(_row(c, "train", n, dtype, flops, times.get(c.name), errors.get(c.name), warmup,
                                    gemm_tflops))
                    out[-1]["losses"] = list(t.losses)
                    if cuda and t.losses:
                        out[-1]["peak_mem_gib"] = t.peak / 2**30
                out[-1]["shared_weights"] = True
            add_speedups(out)
            return out

        try:
            rows = _rounds_rows(timed, sampler, rows_of, iters, done, on_update, bar)
        finally:
            timed.clear()
            master = optimizer = model = step = None  # noqa: F841 (the phase's memory goes before the next)
            _free(device)
    return rows


def _isolated_row(c: Contender, n: int, pristine, inputs, shape, device, dtype, warmup, iters, gemm_tflops,
                  progress, lr: float = 1e-4) -> dict:
    """One contender's training step alone in memory: `iters` timed steps after the warm-up; peak memory
    from a reset before its model is built (weights, gradients, optimizer state, activations)."""
    flops = flops_per_step(shape, "train", n)
    cuda = device.type == "cuda"
    _free(device)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    error, times = None, None
    if c.compiled:
        # a fresh compile as in a user's process: without the reset, the second batch size of the same code
        # would be compiled with dynamic shapes (automatic dynamic), not for the batch it runs
        torch._dynamo.reset()
    try:
        model = instantiate(c, pristine)
        step = make_step(model, "train", inputs, device, dtype, lr, shape=shape)
        n_warm = max(warmup, 1) if c.compiled else warmup  # a compiled contender compiles in its first step
        bar = _progress_bar(n_warm + iters, f"{c.name} train B={n}") if progress else None
        times = [time_fn(step, device, warmup=n_warm if i == 0 else 0, iters=1,
                         progress=bar.update if bar else None)["median_ms"] for i in range(iters)]
        if bar:
            bar.close()
    except Exception as e:
        stop.check()
        error = _error(e)
    finally:
        model = step = None  # noqa: F841 (released before the next contender is built)
    row = _row(c, "train", n, dtype, flops, times, error, warmup, gemm_tflops)
    row["isolated"] = True
    if cuda:
        row["peak_mem_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    _free(device)
    return row


def largest_fitting(fits: Callable[[int], bool], start: int, limit: int,
                    step: int = 32) -> tuple[int | None, int | None]:
    """(largest batch b <= limit with fits(b), smallest batch found not to fit) by doubling from `start`, then
    bisecting in multiples of `step`. Assumes that fitting is monotone in the batch."""
    good, bad = None, None
    b = start
    while b <= limit:
        if fits(b):
            good, b = b, 2 * b
        else:
            bad = b
            break
    if good is None:
        return None, bad
    if bad is None:
        return good, None
    while bad - good > step:
        mid = (good + bad) // 2 // step * step
        if mid <= good:
            break
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good, bad


def _largest_batch_row(c: Contender, start: int, limit: int, pristine, shape, device, dtype, warmup, iters,
                       gemm_tflops, progress, lr: float = 1e-4) -> dict:
    """The largest training batch of contender c that fits (one step per try; CUDA out-of-memory caught per
    try, the memory freed, the run goes on), timed alone like the other training rows."""
    tried: dict[int, str] = {}

    def fits(b: int) -> bool:
        ok = True
        model = step = inputs = None
        try:
            inputs = make_inputs(shape, b, device)
            model = instantiate(c, pristine)
            step = make_step(model, "train", inputs, device, dtype, lr, shape=shape)
            step()
            torch.cuda.synchronize(device)
        except torch.cuda.OutOfMemoryError:
            ok = False  # the traceback's frames hold tensors: freed below, outside the handler
        finally:
            model = step = inputs = None  # noqa: F841
        _free(device)
        tried[b] = "fits" if ok else "out of memory"
        return ok

    try:
        good, bad = largest_fitting(fits, start, limit)
    except Exception as e:  # not out of memory: recorded, the other contenders go on
        stop.check()
        row = _row(c, "train", start, dtype, flops_per_step(shape, "train", start), None, _error(e), warmup)
        row.update(largest_batch=True, batches_tried=tried)
        return row
    if good is None:
        row = _row(c, "train", start, dtype, flops_per_step(shape, "train", start), None,
                   f"OutOfMemoryError: batch {start} does not fit", warmup)
    else:
        row = _isolated_row(c, good, pristine, make_inputs(shape, good, device), shape, device, dtype, warmup,
                            iters, gemm_tflops, progress, lr)
    row.update(largest_batch=True, oom_batch=bad, batches_tried=tried)
    return row


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
            stop.check()
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
    """speedup_vs_eager / speedup_vs_compile (/ speedup_vs_compile_blocks: LightningDiT's published way to run)
    per mode: the median over rounds of reference ms / this row's ms
    in the same round, with its spread (`*_spread_pct`, `*_min`, `*_max`, `*_noisy`).

    Rows without per-round times (older files) get the ratio of the medians, without a spread.
    """
    base = {}
    for r in rows:
        if r.get("ms_per_iter") and r["contender"] in {name for _, name in REFERENCES}:
            base[(r["contender"], r["mode"], r.get("batch"))] = r
    for r in rows:
        if not r.get("ms_per_iter"):
            continue
        for key, ref_name in REFERENCES:
            ref = base.get((ref_name, r["mode"], r.get("batch")))
            if ref is None:
                continue
            s = None
            paired = not (r.get("isolated") or ref.get("isolated"))  # isolated rows share no rounds
            if (paired and r.get("ms_rounds") and ref.get("ms_rounds")
                    and len(r["ms_rounds"]) == len(ref["ms_rounds"])):
                s = ratio_stats(ref["ms_rounds"], r["ms_rounds"])
            if s:
                r[key] = s["median"]
                r[f"{key}_min"], r[f"{key}_max"] = s["min"], s["max"]
                r[f"{key}_spread_pct"], r[f"{key}_noisy"] = s["spread_pct"], s["noisy"]
            else:
                r[key] = ref["ms_per_iter"] / r["ms_per_iter"]
