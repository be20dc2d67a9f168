#!/usr/bin/env python
"""Compile every Triton kernel with two Triton versions and keep the worse of the two (issue 20 item 4).

The GPU machine runs another Triton (3.6 with torch 2.11) than this one (3.9), and register counts differ
between them (the fused adaLN forward: 128 registers with 3.6, 96 with 3.9). Tile and warp settings must hold
for both, so this runs scripts/check_triton_compile.py once with this interpreter's triton and once with the
triton of a second venv (--triton-venv), merges the two per (kernel, target, variant), and judges the WORSE of
the two against REG_LIMITS below: registers per thread that both versions must stay within (each limit keeps
the occupancy the launchers size their grids for), plus no spill on a hot path and shared memory within the
target's limit (check_triton_compile's own rules, which each run applies).

Writes <out>.json (both versions' resources, versions, git commit) and <out>.md (the table). Not run in CI (two
full compiles: ~10 minutes on 2 cores); run it after a kernel or tile change and commit the results:

  python -m venv /tmp/triton36 && /tmp/triton36/bin/pip install triton==3.6.0
  .venv/bin/python scripts/compare_triton_versions.py --triton-venv /tmp/triton36 \
      --out benchmarks/results/YYYY-MM-DD-triton-compile-versions [--quick] [--modules adaln,...]
Exit status: 0 both within every limit, 1 a limit exceeded (or a compile failed) in either, 2 setup error.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "scripts" / "check_triton_compile.py"

# Registers per thread each kernel must stay within on BOTH Triton versions (the worse of the two is judged).
# 64K registers per SM: at 4 warps (128 threads) 128 registers keep 4 CTAs per SM, 168 keep 3, 255 is the
# hardware maximum per thread (more spills). The adaLN kernels size their backward chunking from the registers
# of the compiled kernel, so a version that needs more only costs occupancy there; these limits make such a
# change visible instead of silent.
REG_LIMITS = {
    "_adaln_fwd_kernel": 128,  # 4 CTAs of 4 warps per SM at D = 1152 (3.6 reaches 128 with a fused bias)
    "_adaln_bwd_kernel": 232,  # one 8-warp CTA per SM at worst; 3.6 needs ~220 in the fused backward
    "_gelu_tanh_bwd_kernel": 128,  # 4 CTAs of 4 warps per SM (both versions take ~100)
    "_gelu_tanh_fwd_kernel": 128,
    "_final_layer_fwd_kernel": 168,
    "_final_layer_bwd_kernel": 168,  # 3 CTAs of 4 warps per SM
}
DEFAULT_REG_LIMIT = 255  # no spill: the hardware maximum


def run_check(python_args: list, json_path: Path, passthrough: list) -> int:
    cmd = [sys.executable, str(CHECK), "--json", str(json_path), *python_args, *passthrough]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode


def key_of(v: dict) -> tuple:
    return v["kernel"], v["arch"], v["variant"]


def merge(a: dict, b: dict) -> list:
    """One row per (kernel, arch, variant) seen by either run, both versions' resources and the worse."""
    va, vb = {key_of(v): v for v in a["variants"]}, {key_of(v): v for v in b["variants"]}
    rows = []
    for key in sorted(set(va) | set(vb)):
        x, y = va.get(key), vb.get(key)
        got = [v for v in (x, y) if v is not None]
        regs = max((v["regs"] or 0) for v in got)
        limit = REG_LIMITS.get(key[0], DEFAULT_REG_LIMIT)
        verdicts = [v["verdict"] for v in got]
        over = regs > limit
        rows.append({
            "kernel": key[0], "arch": key[1], "variant": key[2],
            "scenarios": (x or y)["scenarios"][:3],
            a["triton"]: None if x is None else {k: x[k] for k in ("regs", "stack_bytes", "shared_bytes", "verdict")},
            b["triton"]: None if y is None else {k: y[k] for k in ("regs", "stack_bytes", "shared_bytes", "verdict")},
            "worse_regs": regs, "reg_limit": limit,
            "worse_stack_bytes": max(v["stack_bytes"] for v in got),
            "worse_shared_bytes": max(v["shared_bytes"] for v in got),
            "verdict": "FAIL" if over or "FAIL" in verdicts else ("note" if "note" in verdicts else "ok"),
            "why": ("regs over limit; " if over else "") + ", ".join(
                f"{v['verdict']} in one version" for v in got if v["verdict"] != "ok"),
        })
    return rows


def markdown(record: dict) -> str:
    va, vb = record["triton_versions"]
    lines = [
        f"# Triton compile resources: triton {va} vs {vb}",
        "",
        f"Commit {record['git_commit']}{' (dirty)' if record['git_dirty'] else ''}, {record['date']}, "
        f"targets {', '.join(record['targets'])}{', --quick (DiT-XL/2 only)' if record['quick'] else ''}. "
        "Compiled, not run (scripts/compare_triton_versions.py). Registers per thread; stack > 0 means spills. "
        "The worse of the two versions is judged against the register limits both must satisfy:",
        "",
        "| kernel | register limit |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in sorted(REG_LIMITS.items())],
        "",
        f"{record['summary']}",
        "",
        "## Per kernel: the largest registers, stack and shared memory over its variants",
        "",
        f"| kernel | arch | regs {va} | regs {vb} | stack {va} | stack {vb} | shared (B, worse) | limit | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    per = {}
    for r in record["rows"]:
        k = (r["kernel"], r["arch"])
        agg = per.setdefault(k, {"ra": 0, "rb": 0, "sa": 0, "sb": 0, "sh": 0, "limit": r["reg_limit"], "v": "ok"})
        for tag, ver in (("a", va), ("b", vb)):
            if r[ver] is not None:
                agg["r" + tag] = max(agg["r" + tag], r[ver]["regs"] or 0)
                agg["s" + tag] = max(agg["s" + tag], r[ver]["stack_bytes"])
        agg["sh"] = max(agg["sh"], r["worse_shared_bytes"])
        if r["verdict"] == "FAIL" or (r["verdict"] == "note" and agg["v"] == "ok"):
            agg["v"] = r["verdict"]
    for (kernel, arch), a in sorted(per.items()):
        lines.append(f"| {kernel} | {arch} | {a['ra']} | {a['rb']} | {a['sa']} | {a['sb']} | {a['sh']} | "
                     f"{a['limit']} | {a['v']} |")
    lines += ["", "## Variants that differ between the versions or are not ok", "",
              f"| kernel | arch | variant | first scenario | regs {va} | regs {vb} | stack {va} | stack {vb} "
              "| verdict |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        a, b = r[va], r[vb]
        if a and b and a["regs"] == b["regs"] and a["stack_bytes"] == b["stack_bytes"] and r["verdict"] == "ok":
            continue
        cell = lambda v, k: "-" if v is None else v[k]  # noqa: E731
        lines.append(f"| {r['kernel']} | {r['arch']} | {r['variant']} | {r['scenarios'][0]} | {cell(a, 'regs')} | "
                     f"{cell(b, 'regs')} | {cell(a, 'stack_bytes')} | {cell(b, 'stack_bytes')} | "
                     f"{r['verdict']}{' (' + r['why'] + ')' if r['why'] else ''} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--triton-venv", type=Path, default=None, help="venv holding the second triton")
    ap.add_argument("--results", type=Path, nargs=2, default=None, metavar=("HERE_JSON", "THERE_JSON"),
                    help="merge two existing check_triton_compile.py --json files instead of compiling again")
    ap.add_argument("--out", type=Path, required=True, help="output path without suffix (.json and .md written)")
    ap.add_argument("--quick", action="store_true", help="DiT-XL/2 only (passed to check_triton_compile.py)")
    ap.add_argument("--modules", default=None, help="passed to check_triton_compile.py")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    passthrough = ["--jobs", str(args.jobs)] + (["--quick"] if args.quick else []) + (
        ["--modules", args.modules] if args.modules else [])
    if args.results is not None:
        a, b = (json.loads(p.read_text()) for p in args.results)
        rc_here = rc_there = "not run (--results)"
        args.quick = a["quick"] or b["quick"]
    elif args.triton_venv is None:
        ap.error("give --triton-venv (compile with both tritons) or --results (merge two earlier runs)")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            here, there = Path(tmp) / "here.json", Path(tmp) / "there.json"
            rc_here = run_check([], here, passthrough)
            rc_there = run_check(["--triton-venv", str(args.triton_venv)], there, passthrough)
            if not here.exists() or not there.exists():
                print(f"compare_triton_versions: a run wrote no results (exit {rc_here}, {rc_there})",
                      file=sys.stderr)
                return 2
            a, b = json.loads(here.read_text()), json.loads(there.read_text())
    if a["triton"] == b["triton"]:
        print(f"compare_triton_versions: both runs used triton {a['triton']}; is {args.triton_venv} another one?",
              file=sys.stderr)
        return 2
    rows = merge(a, b)
    n_fail = sum(r["verdict"] == "FAIL" for r in rows)
    summary = (f"{len(rows)} variants; {n_fail} over a limit in the worse version; check_triton_compile exit "
               f"{rc_here} (triton {a['triton']}), {rc_there} (triton {b['triton']})")
    record = {
        "what": "compare_triton_versions: compile resources of every Triton kernel with two triton versions",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": a["git_commit"], "git_dirty": a["git_dirty"], "torch": a["torch"],
        "triton_versions": [a["triton"], b["triton"]], "targets": a["targets"], "quick": args.quick,
        "reg_limits": REG_LIMITS, "summary": summary, "rows": rows,
    }
    spec = importlib.util.spec_from_file_location("dit_fast_atomic_cmp", ROOT / "dit_fast" / "atomic.py")
    atomic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(atomic)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(args.out.with_suffix(".json"), json.dumps(record, indent=1) + "\n")
    atomic.write_text(args.out.with_suffix(".md"), markdown(record))
    print(f"{summary}\nwrote {args.out.with_suffix('.json')} and .md")
    return 1 if n_fail or rc_here == 1 or rc_there == 1 else 0


if __name__ == "__main__":
    sys.exit(main())
