"""Per-op microbenchmarks of every fused op in dit_fast.ops, on every backend that runs.

Contenders per op: "eager" (the plain-PyTorch torch_backend op), "compile" (torch.compile of that
same op), "triton" and "ext" (the kernel families, where they run and implement the op).

Inputs mirror the model under autocast: the residual stream x is float32 (weights too), the
GEMM outputs feeding an op (y, gate, shift, scale, h) are in the low-precision dtype, and h is
written in it. With dtype float32 everything is float32.

Byte model (the floor a fused kernel can reach): forward = every tensor input read once + every
output written once, at their actual dtypes. Backward = every input read again + every output
gradient read + every input gradient written. GB/s = bytes / time; "% copy" compares with the
device-to-device copy bandwidth measured in the same run. linear_gelu_tanh is a GEMM: its
TFLOP/s (2*M*K*N forward, x3 with backward) is reported beside the bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..backends import OPS, implements, module_for, probe
from .contenders import autocast_ctx
from .timing import time_kernel


@dataclass
class OpCase:
    op: str
    args: list  # positional arguments of the op (tensors and constants)
    grad_inputs: list[int]  # positions of the tensors that get gradients
    label: str
    gemm_flops: int = 0
    notes: str = ""
    extra: dict = field(default_factory=dict)


def _t(shape, dtype, device, grad=False, scale=1.0):
    return (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_(grad)


def make_case(op: str, B: int, L: int, D: int, dtype: torch.dtype, device, patch: int = 2, channels: int = 4) -> OpCase:
    """Inputs of `op` at a DiT shape: B images, L tokens, hidden D."""
    res = torch.float32  # residual stream and weights under autocast
    lp = dtype
    label = f"B={B} L={L} D={D}"
    if op == "adaln_modulate":
        args = [_t((B, L, D), res, device, True), _t((B, D), lp, device, True), _t((B, D), lp, device, True), 1e-6, lp]
        return OpCase(op, args, [0, 1, 2], label)
    if op == "gated_residual":
        args = [_t((B, L, D), res, device, True), _t((B, L, D), lp, device, True), _t((B, D), lp, device, True)]
        return OpCase(op, args, [0, 1, 2], label)
    if op == "gated_residual_adaln":
        args = [_t((B, L, D), res, device, True), _t((B, L, D), lp, device, True), _t((B, D), lp, device, True),
                _t((B, D), lp, device, True), _t((B, D), lp, device, True), 1e-6, lp]
        return OpCase(op, args, [0, 1, 2, 3, 4], label)
    side = int(round(L**0.5)) * patch
    if op == "patch_embed":
        args = [_t((B, channels, side, side), res, device, True), _t((D, channels, patch, patch), res, device, True, 0.1),
                _t((D,), res, device, True), _t((1, L, D), res, device, False), patch]
        return OpCase(op, args, [0, 1, 2], label, gemm_flops=2 * B * L * channels * patch * patch * D)
    if op == "final_layer":
        out_c = 2 * channels
        args = [_t((B, L, D), res, device, True), _t((B, D), lp, device, True), _t((B, D), lp, device, True),
                _t((patch * patch * out_c, D), res, device, True, D**-0.5), _t((patch * patch * out_c,), res, device, True),
                patch, out_c, 1e-6]
        return OpCase(op, args, [0, 1, 2, 3, 4], label, gemm_flops=2 * B * L * D * patch * patch * out_c)
    if op == "linear_gelu_tanh":
        H = 4 * D
        args = [_t((B, L, D), lp, device, True), _t((H, D), res, device, True, D**-0.5), _t((H,), res, device, True)]
        return OpCase(op, args, [0, 1, 2], label, gemm_flops=2 * B * L * D * H)
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def _outputs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def kernel_contenders(device_type: str, compile_: bool) -> dict[str, Callable[[str], Callable | None]]:
    """name -> (op name -> callable or None when it cannot run that op)."""
    from ..ops import torch_backend

    out: dict[str, Callable[[str], Callable | None]] = {"eager": lambda op: getattr(torch_backend, op)}
    if compile_:
        cache: dict[str, Callable] = {}

        def compiled(op):
            if op not in cache:
                cache[op] = torch.compile(getattr(torch_backend, op), dynamic=False)
            return cache[op]

        out["compile"] = compiled
    for b in ("triton", "ext"):
        ok, _ = probe(b, device_type)
        if ok and not (b == "triton" and device_type == "cpu"):
            out[b] = (lambda backend: lambda op: getattr(module_for(backend), op) if implements(backend, op) else None)(b)
    return out


def bench_case(case: OpCase, fn: Callable, device, dtype, with_backward: bool, cpu_iters: int = 5) -> dict:
    dev = torch.device(device)
    args = case.args
    grad_args = [args[i] for i in case.grad_inputs]

    def fwd():
        with torch.no_grad(), autocast_ctx(dev, dtype):
            return fn(*args)

    outs = _outputs(fwd())
    fwd_bytes = _nbytes([a for a in args if isinstance(a, torch.Tensor)]) + _nbytes(outs)
    row = {"fwd_bytes": fwd_bytes}
    t = time_kernel(fwd, dev, cpu_iters=cpu_iters)
    row["fwd_ms"] = t["median_ms"]
    row["timer"] = t["timer"]
    if with_backward:
        with autocast_ctx(dev, dtype):
            probe_out = _outputs(fn(*args))
        cots = [torch.randn_like(o) for o in probe_out]
        bwd_bytes = _nbytes([a for a in args if isinstance(a, torch.Tensor)]) + _nbytes(cots) + _nbytes(grad_args)

        def fwd_bwd():
            with autocast_ctx(dev, dtype):
                o = _outputs(fn(*args))
            return torch.autograd.grad(o, grad_args, cots)

        t = time_kernel(fwd_bwd, dev, cpu_iters=cpu_iters)
        row["fwd_bwd_ms"] = t["median_ms"]
        row["fwd_bwd_bytes"] = fwd_bytes + bwd_bytes
    return row


def default_shapes(device_type: str, tokens: int, hidden: int, batches: list[int] | None) -> list[tuple[int, int, int]]:
    if batches:
        return [(b, tokens, hidden) for b in batches]
    if device_type == "cuda":
        return [(256, tokens, hidden), (2, tokens, hidden)]
    return [(2, min(tokens, 64), hidden)]


def run_kernels(
    *,
    device: torch.device,
    dtype: torch.dtype,
    shapes: list[tuple[int, int, int]],
    ops: list[str] | None = None,
    compile_: bool = False,
    with_backward: bool = True,
    copy_gb_per_s: float | None = None,
    cpu_iters: int = 5,
    progress: bool = True,
    on_result: Callable[[dict], None] | None = None,
) -> list[dict]:
    contenders = kernel_contenders(device.type, compile_)
    ops = list(ops or OPS)
    jobs = [(op, shape, name) for op in ops for shape in shapes for name in contenders]
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(jobs), desc="kernels", leave=False, dynamic_ncols=True)
        except ImportError:
            pass
    rows = []
    for op in ops:
        for B, L, D in shapes:
            torch.manual_seed(0)
            case = make_case(op, B, L, D, dtype, device)
            for name, get in contenders.items():
                row = {"op": op, "shape": case.label, "B": B, "L": L, "D": D, "backend": name,
                       "dtype": str(dtype).replace("torch.", "")}
                try:
                    fn = get(op)
                    if fn is None:
                        row["skipped"] = f"{name} has no {op} kernel"
                    else:
                        row.update(bench_case(case, fn, device, dtype, with_backward, cpu_iters))
                        _derive(row, case, copy_gb_per_s)
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
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
    eager = {(r["op"], r["shape"]): r for r in rows if r["backend"] == "eager" and r.get("fwd_ms")}
    for r in rows:
        e = eager.get((r["op"], r["shape"]))
        if e and r.get("fwd_ms"):
            r["fwd_speedup_vs_eager"] = e["fwd_ms"] / r["fwd_ms"]
            if r.get("fwd_bwd_ms") and e.get("fwd_bwd_ms"):
                r["fwd_bwd_speedup_vs_eager"] = e["fwd_bwd_ms"] / r["fwd_bwd_ms"]
