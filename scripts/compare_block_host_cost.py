"""Host cost per DiT block of the model's forward, for two checkouts of dit_fast, alternated in rounds.

    python scripts/compare_block_host_cost.py OLD_TREE NEW_TREE --out benchmarks/results/NAME

What it decides: whether a change to the model's Python path (the stock-module checks, the carry) costs host
time per block. Each round runs one child process per tree (the tree first on sys.path): a tiny DiT (D=8, 2
heads, 4 tokens, batch 1) on the torch backend (plain PyTorch: the figure is the Python path plus tiny CPU
ops) or the triton backend with its launches stubbed (the Python path around them), at depth 2 and 10;
cost per block = (best-of-5 mean at depth 10 - at depth 2) / 8, process CPU time
(less sensitive to other load than wall time). Rounds alternate the trees; the median and spread per tree
are written with the commits, versions and machine (JSON + Markdown, atomically).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

CHILD = r"""
import contextlib, json, os, sys, time
sys.path.insert(0, sys.argv[1])
backend = sys.argv[2]
import torch
torch.set_num_threads(1)
import dit_fast
assert dit_fast.__file__.startswith(sys.argv[1]), dit_fast.__file__
from dit_fast.models import DiT
stub = contextlib.nullcontext
if backend == "triton":  # launches stubbed (the interpreter's cost is not the GPU's): the Python path only
    from dit_fast.bench.overhead import stubbed_triton_launches as stub
x, t, y = torch.randn(1, 4, 4, 4), torch.tensor([10.0]), torch.tensor([1])
res = {}
for grad in (False, True):
    per = {}
    for depth in (2, 10):
        torch.manual_seed(0)
        m = DiT(input_size=4, patch_size=2, hidden_size=8, depth=depth, num_heads=2, num_classes=10, backend=backend)
        m.train(grad).requires_grad_(grad)
        with torch.set_grad_enabled(grad), stub():
            for _ in range(20):
                m(x, t, y)
            best = float("inf")
            for _ in range(5):
                t0 = time.process_time()
                for _ in range(100):
                    m(x, t, y)
                best = min(best, (time.process_time() - t0) / 100)
        per[depth] = best
    res["grad" if grad else "no_grad"] = (per[10] - per[2]) / 8 * 1e6
print(json.dumps(res))
"""


def _commit(tree: str) -> str:
    out = subprocess.run(["git", "-C", tree, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain"], capture_output=True, text=True).stdout
    return out.stdout.strip() + ("-dirty" if dirty.strip() else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--backend", default="torch", choices=("torch", "triton"),
                   help="torch: plain PyTorch ops; triton: Triton launches stubbed (TRITON_INTERPRET=1 on the CPU)")
    p.add_argument("--out", required=True, help="path without suffix: writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from dit_fast.atomic import write_text

    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    samples = {"old": [], "new": []}
    for _ in range(args.rounds):
        for name in ("old", "new"):
            tree = os.path.abspath(getattr(args, name))
            proc = subprocess.run([sys.executable, "-c", CHILD, tree, args.backend], capture_output=True, text=True,
                                  env=env, check=True)
            samples[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    import torch

    rows = []
    for mode in ("no_grad", "grad"):
        row = {"mode": mode}
        for name in ("old", "new"):
            values = [s[mode] for s in samples[name]]
            row[f"{name}_us_per_block"] = statistics.median(values)
            row[f"{name}_min"], row[f"{name}_max"] = min(values), max(values)
        rows.append(row)
    result = {
        "what": f"host cost per DiT block of the forward, {args.backend} backend"
                + (" (launches stubbed)" if args.backend == "triton" else "")
                + ", process CPU time (scripts/compare_block_host_cost.py)",
        "old": {"tree": args.old, "commit": _commit(args.old)},
        "new": {"tree": args.new, "commit": _commit(args.new)},
        "rounds": args.rounds, "rows": rows, "samples": samples,
        "env": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
                "cpu_count": os.cpu_count(), "platform": platform.platform()},
    }
    write_text(args.out + ".json", json.dumps(result, indent=1) + "\n")
    lines = [f"# Host cost per DiT block: {result['old']['commit']} vs {result['new']['commit']}", "",
             f"{result['what']}; {args.rounds} alternating rounds, median [min, max] in microseconds per block.", "",
             "| mode | old | new |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['old_us_per_block']:.1f} [{r['old_min']:.1f}, {r['old_max']:.1f}] | "
                     f"{r['new_us_per_block']:.1f} [{r['new_min']:.1f}, {r['new_max']:.1f}] |")
    lines += ["", f"python {result['env']['python']}, torch {result['env']['torch']}, {result['env']['platform']}"]
    write_text(args.out + ".md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
