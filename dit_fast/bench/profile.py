"""Per-kernel latency tables and Chrome traces from torch.profiler, with ranges per part of a block.

Ranges (record_function, and NVTX on CUDA when asked) are added by forward hooks installed for
the profile only and removed afterwards, so the models carry no profiling code and pay nothing
outside a profile. The hooks mark segments of each block:
  adaLN (the modulation GEMM), norm_modulate, qkv, attention, proj, residual (reference),
  residual_norm (dit_fast's fused gated residual + next LayerNorm + modulate), mlp.
A segment runs from one hook to the next, so the arithmetic between modules (modulate, gated
residual) lands in the segment it belongs to.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn as nn

from ..models import DiTBlock as FastBlock
from .contenders import autocast_ctx, instantiate, make_inputs, make_step


class BlockRanges:
    """Installs segment hooks on every DiT block of a model (reference or dit_fast)."""

    def __init__(self, model: nn.Module, nvtx: bool = False):
        self.nvtx = nvtx and torch.cuda.is_available()
        self.handles = []
        self.stack: list = []  # open block ranges: (block index, record_function context)
        self.segment = None
        for i, block in enumerate(model.blocks):
            # dit_fast fuses the gated residual with the next norm + modulate; the reference does not.
            # Its norms are never hooked: a hook there would switch the block to the unfused computation.
            fast = isinstance(block, FastBlock)
            after = "residual_norm" if fast else "residual"
            self._hook(block, pre=lambda i=i: self._enter_block(i), post=lambda i=i: self._exit_block(i))
            self._hook(block.attn.qkv, pre=lambda: self._switch("qkv"), post=lambda: self._switch("attention"))
            self._hook(block.attn.proj, pre=lambda: self._switch("proj"), post=lambda a=after: self._switch(a))
            self._hook(block.mlp, pre=lambda: self._switch("mlp"), post=lambda a=after: self._switch(a))
            if not fast:  # the reference: norms are modules, modulate follows them
                self._hook(block.norm1, pre=lambda: self._switch("norm_modulate"))
                self._hook(block.norm2, pre=lambda: self._switch("norm_modulate"))
            self._hook(block.adaLN_modulation[-1], pre=lambda: self._switch("adaLN"), post=self._end_segment)
        # whatever segment is still open when the model (or a lone block) returns ends there
        self._hook(model, post=self._end_segment)

    def _enter_block(self, i):
        self._end_segment()
        self.stack.append((i, self._open(f"block{i}")))

    def _exit_block(self, i):
        self._end_segment()
        if self.stack and self.stack[-1][0] == i:
            self._close(self.stack.pop()[1])

    def _hook(self, module, pre=None, post=None):
        # hooks must return None: a value returned would replace the module's inputs / output
        if pre:
            self.handles.append(module.register_forward_pre_hook(lambda m, a: (pre(), None)[1]))
        if post:
            self.handles.append(module.register_forward_hook(lambda m, a, o: (post(), None)[1]))

    def _open(self, name):
        rf = torch.profiler.record_function(name)
        rf.__enter__()
        if self.nvtx:
            torch.cuda.nvtx.range_push(name)
        return rf

    def _close(self, rf):
        if self.nvtx:
            torch.cuda.nvtx.range_pop()
        rf.__exit__(None, None, None)

    def _switch(self, name):
        self._end_segment()
        self.segment = self._open(name)

    def _end_segment(self):
        if self.segment is not None:
            self._close(self.segment)
            self.segment = None

    def remove(self):
        self._end_segment()
        while self.stack:
            self._close(self.stack.pop()[1])
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _device_time(evt) -> float:
    return _first_time(evt, ("self_device_time_total", "self_cuda_time_total"))


def _first_time(evt, attrs) -> float:
    """The first of `attrs` the profiler event has (torch renamed cuda_* to device_*), else 0."""
    for attr in attrs:
        v = getattr(evt, attr, None)
        if v is not None:
            return float(v)
    return 0.0


def _is_device_event(evt) -> bool:
    """A GPU kernel / memcpy / memset, not a CPU operator (whose device time is its kernels')."""
    kind = getattr(evt, "device_type", None)
    if kind is not None:
        return kind != torch.autograd.DeviceType.CPU
    return evt.self_cpu_time_total == 0


def kernel_table(prof, device_type: str, top: int = 40) -> list[dict]:
    """Rows: name, calls, total_us, mean_us, pct (of the summed time of all rows' kind).

    CUDA: GPU kernels (and memcpy/memset) by self device time. CPU: operators by self CPU time.
    """
    events = prof.key_averages()
    rows = []
    for e in events:
        if _is_range(e.key):
            continue  # our own annotations (and their GPU-side copies) are not kernels
        if device_type == "cuda":
            us = _device_time(e)
            if us <= 0 or not _is_device_event(e):
                continue
        else:
            us = float(e.self_cpu_time_total)
            if us <= 0:
                continue
        rows.append({"name": e.key, "calls": e.count, "total_us": us})
    total = sum(r["total_us"] for r in rows) or 1.0
    for r in rows:
        r["mean_us"] = r["total_us"] / max(r["calls"], 1)
        r["pct"] = 100 * r["total_us"] / total
    rows.sort(key=lambda r: -r["total_us"])
    return rows[:top]


_RANGE_NAMES = {"adaLN", "norm_modulate", "qkv", "attention", "proj", "residual", "residual_norm", "mlp"}


def _is_range(name: str) -> bool:
    return name in _RANGE_NAMES or name == "step" or name.startswith("ProfilerStep") or (
        name.startswith("block") and name[5:].isdigit()
    )


def range_table(prof, device_type: str) -> list[dict]:
    """Time inside each block-segment range: CPU time on the CPU; on CUDA the device time of the kernels
    launched inside it (read from the raw CPU-side range events, not from GPU annotation copies)."""
    acc: dict[str, list] = {}
    for e in prof.events():
        if e.name not in _RANGE_NAMES or _is_device_event(e):
            continue
        us = _total_device_time(e) if device_type == "cuda" else float(e.cpu_time_total)
        row = acc.setdefault(e.name, [0, 0.0])
        row[0] += 1
        row[1] += us
    rows = [{"range": k, "calls": n, "total_us": us, "mean_us": us / max(n, 1)} for k, (n, us) in acc.items()]
    total = sum(r["total_us"] for r in rows) or 1.0
    for r in rows:
        r["pct"] = 100 * r["total_us"] / total
    rows.sort(key=lambda r: -r["total_us"])
    return rows


def _total_device_time(evt) -> float:
    return _first_time(evt, ("device_time_total", "cuda_time_total"))


def _block_step(block: nn.Module, shape, batch: int, device, dtype, train: bool, rope=None):
    """One block's forward (or forward + backward) on random inputs of the model's shapes (LightningDiT's
    blocks also take the model's rotary embedding, as its forward passes it)."""
    L, D = shape.tokens, shape.hidden_size
    x = torch.randn(batch, L, D, device=device, requires_grad=train)
    c = torch.randn(batch, D, device=device)
    block.train(train)

    def run():
        # A block called on its own computes its own adaLN projection and first norm (the published call);
        # inside the model those come batched / carried from the previous block.
        with torch.set_grad_enabled(train), autocast_ctx(torch.device(device), dtype):
            out = block(x, c) if rope is None else block(x, c, rope)
        if train:
            out.float().sum().backward()
        return out

    return run


def profile_model(
    contender,
    reference: nn.Module,
    shape,
    *,
    device: torch.device,
    dtype: torch.dtype,
    batch: int,
    mode: str,
    target: str = "model",
    warmup: int = 2,
    iters: int = 2,
    trace_path: str | None = None,
    nvtx: bool = False,
) -> dict:
    """Profile `iters` steps of a contender (target "model": the whole step of `mode`; "block": block 0 alone)."""
    model = instantiate(contender, reference)
    if target == "block":
        step = _block_step(model.blocks[0], shape, batch, device, dtype, train=(mode == "train"),
                           rope=getattr(model, "feat_rope", None))
    else:
        step = make_step(model, mode, make_inputs(shape, batch, device), device, dtype, shape=shape)
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    ranges = BlockRanges(model, nvtx=nvtx)
    try:
        with torch.profiler.profile(activities=activities, record_shapes=False) as prof:
            for _ in range(iters):
                with torch.profiler.record_function("step"):
                    step()
            if device.type == "cuda":
                torch.cuda.synchronize()
    finally:
        ranges.remove()
    if trace_path:
        os.makedirs(os.path.dirname(os.path.abspath(trace_path)), exist_ok=True)
        prof.export_chrome_trace(trace_path)
    kernels = kernel_table(prof, device.type)
    step_us = None
    for e in prof.key_averages():
        if e.key == "step":
            step_us = float(e.cpu_time_total) / max(e.count, 1)
    return {
        "contender": contender.name,
        "target": target,
        "mode": mode,
        "batch": batch,
        "iters": iters,
        "step_cpu_us": step_us,
        "kernels": kernels,
        "ranges": range_table(prof, device.type),
        "trace": os.path.basename(trace_path) if trace_path else None,
    }


@contextlib.contextmanager
def nvtx_ranges(model: nn.Module):
    """For nsys: the same block-segment ranges as NVTX ranges while the context is open."""
    r = BlockRanges(model, nvtx=True)
    try:
        yield r
    finally:
        r.remove()
