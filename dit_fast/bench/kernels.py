"""Per-op microbenchmarks of every fused op in dit_fast.ops, on every backend that runs.

The one engine behind `dit-fast kernels` and benchmarks/bench_ops.py (pytest-benchmark): both build
inputs with `make_case` and the timed callables and byte counts with `make_pass`.

Contenders per op (CONTENDERS): "eager" (the plain-PyTorch torch_backend op), "compile" (torch.compile
of that same op), "triton" and "ext" (the kernel families, where they run and implement the op), and
"triton-noprefetch" (the Triton adaLN kernels with kernels.adaln.PREFETCH off: the A/B of the next row
block's early loads against the registers they cost), "triton-nosplit" (kernels.adaln.SPLIT_D off: one
masked next_power_of_2(D) column tile instead of a head and a tail tile, the A/B of the idle lanes it
leaves, 44% at D = 1152), "triton-gemm" (linear_gelu_tanh only: the Triton fc1 GEMM with the bias + GELU
epilogue, DIT_FAST_FC1_GEMM=triton, against "triton"'s cuBLAS GEMM + one pass); `contender_status` says why
one does not run.

Inputs mirror the model under autocast: the residual stream x is float32 (weights too), the
GEMM outputs feeding an op (y, gate, shift, scale, h) are in the low-precision dtype, and h is
written in it. With dtype float32 everything is float32. Gradients are taken for what training
differentiates: not the latent image fed to patch_embed, not the fixed pos_embed.

Byte model (the floor a fused kernel can reach), at the tensors' actual dtypes:
  forward  = every tensor input read once + every output written once;
  backward = the output gradients read + what the backward needs read (per op, OpCase.bwd_reads:
             e.g. gated_residual needs y and gate but not x; gated_residual_adaln reads back x_out)
             + every input gradient written; an activation kept for the backward that is not an
             output (linear_gelu_tanh's pre-activation) is written by the forward and read back.
  The float32 row statistics (mean, rstd: 8 bytes per row) that the norm kernels keep are left out.
GB/s = bytes / time (median); "% copy" compares with the device-to-device copy bandwidth measured in the
same run (dit_fast.bench.env.measure_ceilings: 1 GiB on CUDA, 64 MiB on the CPU, i.e. DRAM). do_bench
flushes the GPU's L2 before every repeat; the CPU timer does not, so a CPU working set that fits in the
caches (B=2 L=256 D=1152 fp32: 2.4 MB per tensor) can exceed 100% of the DRAM copy.
linear_gelu_tanh is a GEMM: its TFLOP/s (2*M*K*N forward, x3 with backward) is reported beside the bytes.

Default shapes: on CUDA the DiT-XL/2 sizes at batch 256 (training) and 2 (one image with CFG), each at
the model's token count and at 1024 tokens (512px); on the CPU batch 2 and at most 64 tokens. The CPU
comparison of ext against eager and torch.compile:
    dit-fast kernels --device cpu --model DiT-XL/2 --batch 2 --dtype fp32 --compile \
        --op adaln_modulate,gated_residual,gated_residual_adaln --iters 20     (B=2 L=256 D=1152; again with bf16)
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..backends import ADALN_OPS, ALL_OPS, OPS, implements, module_for, probe
from . import stop
from .contenders import autocast_ctx
from .kernel_variants import NORM_VARIANTS, base_op, default_ops, runs_variant, variant_case  # noqa: F401
from .rounds import ratio_stats, run_rounds, spread
from .timing import sample_kernel, timer_name, warm_up

CONTENDERS = ("eager", "compile", "triton", "triton-noprefetch", "triton-nosplit", "triton-gemm", "ext", "liger")
# Contenders that run the Triton adaLN kernels with one kernels.adaln switch off: name -> the switch.
_ADALN_SWITCHES = {"triton-noprefetch": "PREFETCH", "triton-nosplit": "SPLIT_D"}
# Contenders that run one Triton op with an environment switch set: name -> (op, variable, value).
_ENV_SWITCHES = {"triton-gemm": ("linear_gelu_tanh", "DIT_FAST_FC1_GEMM", "triton")}
PASSES = ("fwd", "fwd+bwd")
BENCH_OPS = ALL_OPS + tuple(NORM_VARIANTS)  # every op name `dit-fast kernels --op` takes
TOKENS_512PX = 1024  # DiT /2 models at 512px: a 64x64 latent in 2x2 patches


@dataclass
class OpCase:
    op: str
    args: list  # positional arguments of the op (tensors and constants)
    grad_inputs: list[int]  # positions of the tensors that get gradients
    label: str
    bwd_reads: tuple[int, ...] = ()  # positions of the inputs the backward reads again
    bwd_reads_outputs: tuple[int, ...] = ()  # outputs the backward reads back (saved for it)
    saved_like_outputs: tuple[int, ...] = ()  # activations the size of these outputs, written and read back
    gemm_flops: int = 0
    notes: str = ""
    extra: dict = field(default_factory=dict)
    untouched: tuple[int, int] = (0, 0)  # (fwd, bwd) bytes counted above but never moved (views: qk_norm_rope's v)


def _t(shape, dtype, device, grad=False, scale=1.0):
    return (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_(grad)


def make_case(op: str, B: int, L: int, D: int, dtype: torch.dtype, device, patch: int = 2, channels: int = 4,
              residual_dtype: torch.dtype = torch.float32) -> OpCase:
    """Inputs of `op` at a DiT shape: B images, L tokens, hidden D.

    residual_dtype: the residual stream and weights (float32 under autocast; bf16 for a pure-bf16 model).
    On the "meta" device the case costs no memory (the roofline's byte counts use that).
    """
    res = residual_dtype
    lp = dtype
    label = f"B={B} L={L} D={D}"
    if op in NORM_VARIANTS:  # LightningDiT's RMSNorm / scale-only modes of the adaLN ops
        return variant_case(op, B, L, D, dtype, device, residual_dtype)
    if op == "adaln_modulate":  # backward: dh, x, scale -> dx, dshift, dscale
        args = [_t((B, L, D), res, device, True), _t((B, D), lp, device, True), _t((B, D), lp, device, True), 1e-6, lp]
        return OpCase(op, args, [0, 1, 2], label, bwd_reads=(0, 2))
    if op == "gated_residual":  # backward: dout, y, gate -> dx, dy, dgate (x is not needed)
        args = [_t((B, L, D), res, device, True), _t((B, L, D), lp, device, True), _t((B, D), lp, device, True)]
        return OpCase(op, args, [0, 1, 2], label, bwd_reads=(1, 2))
    if op == "gated_residual_adaln":  # backward: dx_out, dh, x_out, y, gate, scale -> dx, dy, dgate, dshift, dscale
        args = [_t((B, L, D), res, device, True), _t((B, L, D), lp, device, True), _t((B, D), lp, device, True),
                _t((B, D), lp, device, True), _t((B, D), lp, device, True), 1e-6, lp]
        return OpCase(op, args, [0, 1, 2, 3, 4], label, bwd_reads=(1, 2, 4), bwd_reads_outputs=(0,))
    side = int(round(L**0.5)) * patch
    if op == "patch_embed":  # backward: dout, image, weight -> dweight, dbias
        args = [_t((B, channels, side, side), res, device, False),
                _t((D, channels, patch, patch), res, device, True, 0.1),
                _t((D,), res, device, True), _t((1, L, D), res, device, False), patch]
        return OpCase(op, args, [1, 2], label, bwd_reads=(0, 1), gemm_flops=2 * B * L * channels * patch * patch * D)
    if op == "final_layer":  # backward: dout, x, shift, scale, weight -> dx, dshift, dscale, dweight, dbias
        out_c = 2 * channels
        args = [_t((B, L, D), res, device, True), _t((B, D), lp, device, True), _t((B, D), lp, device, True),
                _t((patch * patch * out_c, D), res, device, True, D**-0.5),
                _t((patch * patch * out_c,), res, device, True),
                patch, out_c, 1e-6]
        return OpCase(op, args, [0, 1, 2, 3, 4], label, bwd_reads=(0, 1, 2, 3),
                      gemm_flops=2 * B * L * D * patch * patch * out_c)
    if op == "linear_gelu_tanh":  # backward: dout, pre-activation, x, weight -> dx, dweight, dbias
        H = 4 * D
        args = [_t((B, L, D), lp, device, True), _t((H, D), res, device, True, D**-0.5), _t((H,), res, device, True)]
        return OpCase(op, args, [0, 1, 2], label, bwd_reads=(0, 1), saved_like_outputs=(0,),
                      gemm_flops=2 * B * L * D * H)
    from .lightning_cases import make_lightning_case  # swiglu, qk_norm_rope

    case = make_lightning_case(op, B, L, D, lp, res, device)
    if case is not None:
        return case
    raise ValueError(f"op must be one of {BENCH_OPS}, got {op!r}")


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def _outputs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def case_bytes(case: OpCase, outs: Sequence[torch.Tensor]) -> dict[str, int]:
    """{"fwd": bytes, "fwd+bwd": bytes} of the byte model (module docstring) for these forward outputs."""
    tensors = [a for a in case.args if isinstance(a, torch.Tensor)]
    fwd = _nbytes(tensors) + _nbytes(outs)
    saved = _nbytes([outs[i] for i in case.saved_like_outputs])
    bwd = (
        _nbytes(outs)  # output gradients, one per output, shaped and typed like it
        + _nbytes([case.args[i] for i in case.bwd_reads])
        + _nbytes([outs[i] for i in case.bwd_reads_outputs])
        + _nbytes([case.args[i] for i in case.grad_inputs])  # input gradients written
        + 2 * saved  # written by the forward, read by the backward
    )
    fwd -= case.untouched[0]
    return {"fwd": fwd, "fwd+bwd": fwd + bwd - case.untouched[1]}


def contender_status(name: str, device_type: str) -> tuple[bool, str]:
    """(runs, why not) for one contender on a device type, whatever the op."""
    if name in ("eager", "compile"):
        return True, ""
    if name == "liger":  # Liger-Kernel's SwiGLU, where installed
        from .lightning_cases import liger_status

        return liger_status(device_type)
    if name.startswith("triton") and device_type == "cpu":
        return False, "triton on the CPU is the interpreter, a correctness tool, not a speed path"
    if name not in ("triton", "ext", *_ADALN_SWITCHES, *_ENV_SWITCHES):
        raise ValueError(f"contender must be one of {CONTENDERS}, got {name!r}")
    ok, why = probe("triton" if name in (*_ADALN_SWITCHES, *_ENV_SWITCHES) else name, device_type)
    return ok, "" if ok else why


_compiled: dict[str, Callable] = {}


def op_fn(name: str, op: str) -> Callable | None:
    """The callable of contender `name` for `op` (same positional signature as the op), None if it lacks one.
    A NORM_VARIANTS op runs its base op (the case carries the mode)."""
    from ..ops import torch_backend

    op = base_op(op)

    if name == "eager":
        return getattr(torch_backend, op)
    if name == "compile":  # one compiled function per op, recompiled per shape and grad mode (dynamic=False)
        if op not in _compiled:
            _compiled[op] = torch.compile(getattr(torch_backend, op), dynamic=False)
        return _compiled[op]
    if name == "liger":
        from .lightning_cases import liger_fn

        return liger_fn(op)
    if name in _ENV_SWITCHES:
        only, var, value = _ENV_SWITCHES[name]
        if op != only or not implements("triton", op):
            return None
        return _with_context(getattr(module_for("triton"), op), functools.partial(_env_set, var, value))
    if name in _ADALN_SWITCHES:
        if op not in ADALN_OPS or not implements("triton", op):
            return None
        return _with_context(getattr(module_for("triton"), op), functools.partial(_adaln_off, _ADALN_SWITCHES[name]))
    return getattr(module_for(name), op) if implements(name, op) else None


@contextlib.contextmanager
def _adaln_off(switch: str):
    """kernels.adaln's module switch `switch` (PREFETCH, SPLIT_D) off inside the block."""
    from ..kernels import adaln

    old = getattr(adaln, switch)
    setattr(adaln, switch, False)
    try:
        yield
    finally:
        setattr(adaln, switch, old)


@contextlib.contextmanager
def _env_set(var: str, value: str):
    """Environment variable `var` set to `value` inside the block (the ops read theirs per call)."""
    import os

    old = os.environ.get(var)
    os.environ[var] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = old


def _with_context(fn: Callable, context: Callable) -> Callable:
    """fn, marked to run (forward and backward) inside context(): make_pass enters it for the whole pass."""
    def wrapped(*args):
        return fn(*args)

    wrapped.bench_context = context
    return wrapped


# Yardsticks every kernel table keeps whatever --backend asks for: plain PyTorch, compiled, third-party kernels.
YARDSTICKS = ("eager", "compile", "liger")


def family(name: str) -> str:
    """The kernel family a contender runs: "torch" for eager and compile, else the name's prefix (triton-gemm:
    triton)."""
    if name in ("eager", "compile"):
        return "torch"
    return name.split("-")[0]


def kernel_contenders(device_type: str, compile_: bool,
                      backends: Sequence[str] | None = None) -> dict[str, Callable[[str], Callable | None]]:
    """name -> (op name -> callable or None when it cannot run that op), for the contenders that run here.

    backends: the kernel families asked for (None or "auto": all that run); the YARDSTICKS that run here
    (eager, compile when asked, liger where installed) always run. A family asked for by name that cannot
    run here is a ValueError saying why: its rows are never dropped silently."""
    wanted = None if not backends or "auto" in backends else set(backends)
    if wanted is not None:
        for b in sorted(wanted - {"torch"}):
            ok, why = contender_status(b, device_type)
            if not ok:
                raise ValueError(f"backend {b!r} cannot run on {device_type} here: {why}")
    names = [n for n in CONTENDERS if (compile_ or n != "compile")
             and (wanted is None or n in YARDSTICKS or family(n) in wanted) and contender_status(n, device_type)[0]]
    return {n: (lambda name: lambda op: op_fn(name, op))(n) for n in names}


def make_pass(case: OpCase, fn: Callable, device, dtype, pass_: str) -> tuple[Callable[[], object], int]:
    """(zero-argument callable running one `pass_` of fn on the case's inputs, bytes it moves by the model).

    Runs fn once (which also compiles a torch.compile contender). The callable does not synchronize.
    fwd runs under no_grad; fwd+bwd takes torch.autograd.grad of the grad_inputs (nothing accumulates
    into .grad between repeats).
    """
    if pass_ not in PASSES:
        raise ValueError(f"pass_ must be one of {PASSES}, got {pass_!r}")
    dev = torch.device(device)
    args = case.args
    context = getattr(fn, "bench_context", contextlib.nullcontext)  # a kernel switch held over the whole pass
    if pass_ == "fwd":
        def fwd():
            with torch.no_grad(), autocast_ctx(dev, dtype), context():
                return fn(*args)

        return fwd, case_bytes(case, _outputs(fwd()))["fwd"]
    grad_args = [args[i] for i in case.grad_inputs]
    with autocast_ctx(dev, dtype), context():
        outs = _outputs(fn(*args))
    cots = [torch.randn_like(o) for o in outs]
    nbytes = case_bytes(case, [o.detach() for o in outs])["fwd+bwd"]
    del outs

    def fwd_bwd():
        with context():
            with autocast_ctx(dev, dtype):
                o = _outputs(fn(*args))
            return torch.autograd.grad(o, grad_args, cots)

    return fwd_bwd, nbytes


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def bench_interleaved(case: OpCase, fns: dict[str, Callable], device, dtype, with_backward: bool, rounds: int = 5,
                      cpu_iters: int = 3, rep_ms: float = 20) -> dict[str, dict]:
    """{contender: row fields} for one case: every pass timed in interleaved rounds (dit_fast.bench.rounds).

    Per pass and contender: `<pass>_ms` (median over rounds of each round's sample), `_min_ms`,
    `_max_ms`, `_spread_pct`, `_noisy`, `_ms_rounds`, and the bytes of the byte model. A contender
    whose pass fails gets `error` and sits out the rest.
    """
    dev = torch.device(device)
    rows: dict[str, dict] = {name: {"timer": timer_name(dev)} for name in fns}
    for pass_, pre in (("fwd", "fwd"), ("fwd+bwd", "fwd_bwd")):
        if pass_ == "fwd+bwd" and not with_backward:
            break
        runs = {}
        for name, fn in fns.items():
            if rows[name].get("error"):
                continue
            try:
                run, rows[name][f"{pre}_bytes"] = make_pass(case, fn, dev, dtype, pass_)
                warm_up(run, dev)
                runs[name] = run
            except Exception as e:
                stop.check()
                rows[name]["error"] = f"{pass_}: {_error(e)}"
        samplers = {name: (lambda r: lambda: sample_kernel(r, dev, rep_ms, cpu_iters))(run)
                    for name, run in runs.items()}
        times, errors = run_rounds(samplers, rounds)
        for name in runs:
            s = spread(times[name])
            if s:
                rows[name].update({f"{pre}_ms": s["median"], f"{pre}_min_ms": s["min"], f"{pre}_max_ms": s["max"],
                                   f"{pre}_spread_pct": s["spread_pct"], f"{pre}_noisy": s["noisy"],
                                   f"{pre}_ms_rounds": times[name]})
            if name in errors:
                rows[name]["error"] = f"{pass_}: {errors[name]}"
        del runs, samplers
    return rows


def default_shapes(device_type: str, tokens: int, hidden: int, batches: list[int] | None) -> list[tuple[int, int, int]]:
    """(B, L, D) to time. CUDA: batch 256 and 2, each at `tokens` and at 512px's 1024 tokens."""
    if batches:
        return [(b, tokens, hidden) for b in batches]
    if device_type == "cuda":
        lengths = list(dict.fromkeys((tokens, TOKENS_512PX))) if tokens <= TOKENS_512PX else [tokens]
        return [(b, n, hidden) for n in lengths for b in (256, 2)]
    return [(2, min(tokens, 64), hidden)]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def run_kernels(
    *,
    device: torch.device,
    dtype: torch.dtype | Sequence[torch.dtype],
    shapes: list[tuple[int, int, int]],
    ops: list[str] | None = None,
    compile_: bool = False,
    with_backward: bool = True,
    copy_gb_per_s: float | None = None,
    rounds: int = 5,
    cpu_iters: int = 3,
    progress: bool = True,
    on_result: Callable[[dict], None] | None = None,
    backends: Sequence[str] | None = None,
) -> list[dict]:
    """One row per (dtype, op, shape, contender); dtype may be a list (e.g. float32 and bfloat16).

    The contenders of one (dtype, op, shape) are timed in interleaved rounds; on_result(row) runs for
    each of their rows once that case is done.
    """
    dtypes = [dtype] if isinstance(dtype, torch.dtype) else list(dtype)
    contenders = kernel_contenders(device.type, compile_, backends)
    ops = list(ops or OPS)
    for op in ops:
        if op not in BENCH_OPS:
            raise ValueError(f"op must be one of {BENCH_OPS}, got {op!r}")
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(dtypes) * len(ops) * len(shapes), desc="kernels", leave=False, dynamic_ncols=True)
        except ImportError:
            pass
    rows = []
    for dt in dtypes:
        for op in ops:
            for B, L, D in shapes:
                torch.manual_seed(0)
                case = make_case(op, B, L, D, dt, device)
                fns, case_rows = {}, {}
                for name, get in contenders.items():
                    row = case_rows[name] = {"op": op, "shape": case.label, "B": B, "L": L, "D": D, "backend": name,
                                             "dtype": _dtype_name(dt)}
                    try:
                        fn = get(op)
                    except Exception as e:
                        stop.check()
                        row["error"] = _error(e)
                        continue
                    if fn is not None and not runs_variant(family(name), op, device.type):
                        row["skipped"] = f"{name} has no RMSNorm / scale-only {base_op(op)} on {device.type}"
                    elif fn is None:
                        row["skipped"] = f"{name} has no {op} kernel"
                    else:
                        fns[name] = fn
                timed = bench_interleaved(case, fns, device, dt, with_backward, rounds, cpu_iters)
                for name, row in case_rows.items():
                    row.update(timed.get(name, {}))
                    if name in timed:
                        _derive(row, case, copy_gb_per_s)
                _add_speedups(list(case_rows.values()))
                for row in case_rows.values():
                    rows.append(row)
                    if on_result:
                        on_result(row)
                if bar:
                    bar.update()
                del case
    if bar:
        bar.close()
    _add_speedups(rows)
    return rows


def _derive(row: dict, case: OpCase, copy_gb_per_s: float | None) -> None:
    for pre in ("fwd", "fwd_bwd"):
        ms = row.get(f"{pre}_ms")
        if not ms:
            continue
        gbs = row[f"{pre}_bytes"] / (ms * 1e-3) / 1e9
        row[f"{pre}_gb_per_s"] = gbs
        if copy_gb_per_s:
            row[f"{pre}_pct_copy"] = 100 * gbs / copy_gb_per_s
        if case.gemm_flops:
            mult = 3 if pre == "fwd_bwd" else 1
            row[f"{pre}_tflops"] = mult * case.gemm_flops / (ms * 1e-3) / 1e12


def _add_speedups(rows: list[dict]) -> None:
    """`<pass>_speedup_vs_eager`: the median over rounds of eager ms / this row's ms in the same round, with
    its spread (`_spread_pct`, `_min`, `_max`, `_noisy`); rows without per-round times (older files) get
    the ratio of the medians."""
    def key(r):
        return r["op"], r["shape"], r.get("dtype")

    eager = {key(r): r for r in rows if r["backend"] == "eager" and r.get("fwd_ms")}
    for r in rows:
        e = eager.get(key(r))
        if not e:
            continue
        for pre in ("fwd", "fwd_bwd"):
            if not (r.get(f"{pre}_ms") and e.get(f"{pre}_ms")):
                continue
            name = f"{pre}_speedup_vs_eager"
            mine, theirs = r.get(f"{pre}_ms_rounds"), e.get(f"{pre}_ms_rounds")
            s = ratio_stats(theirs, mine) if mine and theirs and len(mine) == len(theirs) else None
            if s:
                r[name] = s["median"]
                r[f"{name}_min"], r[f"{name}_max"] = s["min"], s["max"]
                r[f"{name}_spread_pct"], r[f"{name}_noisy"] = s["spread_pct"], s["noisy"]
            else:
                r[name] = e[f"{pre}_ms"] / r[f"{pre}_ms"]
