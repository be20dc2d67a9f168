"""Count the kernels one DiT block dispatches in a training step's backward (issue 10, item 2).

Runs on the CPU with the Triton interpreter: a tiny DiT on the chosen backend, forward, then the
backward under a dispatch recorder. Triton launches are counted at the interpreter's launch; aten ops
that launch a kernel on a GPU are counted by name (views, allocations and the interpreter's own copies
of kernel arguments are not). Per block = the count at depth 3 minus the count at depth 2.

  TRITON_INTERPRET=1 python scripts/count_backward_kernels.py [--backend triton] [--out benchmarks/results]
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import argparse
import collections
import datetime
import json
from pathlib import Path

import torch
import triton.runtime.interpreter as interpreter
from torch.utils._python_dispatch import TorchDispatchMode

from dit_fast.atomic import write_text
from dit_fast.bench.env import environment
from dit_fast.models import DiT

# aten ops that move no data on a GPU (views, metadata, allocation)
NOT_KERNELS = {
    "empty", "empty_like", "new_empty", "new_empty_strided", "empty_strided", "view", "_unsafe_view", "t",
    "transpose", "permute", "expand", "detach", "alias", "slice", "select", "unbind", "split",
    "split_with_sizes", "chunk", "reshape", "_reshape_alias", "as_strided", "unsqueeze", "squeeze", "narrow",
    "lift_fresh", "is_same_size",
}


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.aten, self.triton, self.in_launch = collections.Counter(), collections.Counter(), False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NOT_KERNELS and not self.in_launch:
            self.aten[name] += 1
        return func(*args, **(kwargs or {}))


def count(backend: str, depth: int) -> _Counter:
    counter = _Counter()
    real_getitem = interpreter.InterpretedFunction.__getitem__

    def getitem(self, grid):
        launch = real_getitem(self, grid)

        def run(*args, **kwargs):
            counter.triton[self.fn.__name__] += 1
            counter.in_launch = True  # the interpreter copies arguments with aten ops: not kernels
            try:
                return launch(*args, **kwargs)
            finally:
                counter.in_launch = False

        return run

    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, hidden_size=64, depth=depth, num_heads=4, backend=backend)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)  # the published init zeroes adaLN: no gradient would flow
    x, t, y = torch.randn(2, 4, 8, 8), torch.randint(0, 1000, (2,)), torch.randint(0, 1000, (2,))
    loss = model(x, t, y).square().mean()
    interpreter.InterpretedFunction.__getitem__ = getitem
    try:
        with counter:
            loss.backward()
    finally:
        interpreter.InterpretedFunction.__getitem__ = real_getitem
    return counter


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    two, three = count(args.backend, 2), count(args.backend, 3)
    aten = {k: v for k, v in (three.aten - two.aten).items() if v}
    tri = {k: v for k, v in (three.triton - two.triton).items() if v}
    record = {"what": "kernels dispatched per DiT block in a training step's backward (counted, not timed)",
              "backend": args.backend, "aten_per_block": aten, "triton_per_block": tri,
              "total_per_block": sum(aten.values()) + sum(tri.values()), "env": environment(torch.device("cpu"))}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{datetime.date.today().isoformat()}-cpu-backward-kernels-{args.backend}"
    write_text(stem.with_suffix(".json"), json.dumps(record, indent=1) + "\n")
    env = record["env"]
    lines = [f"# Kernels per DiT block, training backward ({args.backend} backend; counted, not timed)", "",
             f"- commit {env['git_commit']}{' (dirty)' if env['git_dirty'] else ''}, {env['date']}",
             f"- torch {env['torch']}, triton {env['triton']}, {env['device_name']} (Triton interpreter)", "",
             "| kind | op | per block |", "|---|---|---|"]
    lines += [f"| aten | {k} | {v} |" for k, v in sorted(aten.items(), key=lambda kv: -kv[1])]
    lines += [f"| triton | {k} | {v} |" for k, v in sorted(tri.items(), key=lambda kv: -kv[1])]
    lines += [f"| **total** | | **{record['total_per_block']}** |", ""]
    write_text(stem.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
