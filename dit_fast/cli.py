"""`dit-fast` / `python -m dit_fast`: bench (parity + throughput), parity, kernels, profile, info.

Defaults follow the device: on a GPU DiT-XL/2 at 256px, bf16 autocast, real batch sizes; on the
CPU DiT-S/2 at 256px, float32, batch 2 and a few iterations (a couple of minutes on 2 cores).
Results go to --out as <date>-<device>[-what].{json,md,png}.
"""
from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys

DEFAULT_OUT = os.path.join("benchmarks", "results")
GPU_BATCH = {"fwd": 256, "cfg": 256, "train": 64}
CPU_BATCH = 2


def _csv(values) -> list[str]:
    out = []
    for v in values or []:
        out += [s.strip() for s in v.split(",") if s.strip()]
    return out


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("model and run")
    g.add_argument("--model", default=None, help="DiT config name (default: DiT-XL/2 on a GPU, DiT-S/2 on the CPU)")
    g.add_argument("--image-size", type=int, default=256, choices=(256, 512), help="image side in pixels (latent = /8)")
    g.add_argument("--depth", type=int, default=None, help="override the number of blocks (quick runs)")
    g.add_argument("--input-size", type=int, default=None, help="override the latent side directly (quick runs)")
    g.add_argument("--batch", type=int, default=None, help="images per step (default per mode and device)")
    g.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 via autocast, weights fp32 (default: bf16 on a GPU, fp32 on the CPU); "
                   "kernels takes a comma list")
    g.add_argument("--mode", action="append", default=None, help="fwd | cfg | train, repeatable or comma list (default all)")
    g.add_argument("--backend", action="append", default=None,
                   help="dit_fast kernel families to compare: triton, ext, torch, auto (repeatable/comma; default every one that runs)")
    g.add_argument("--attn", default="auto", help="attention backend of dit_fast (see dit_fast.attention)")
    g.add_argument("--compile", action="store_true", help="also time torch.compile(reference)")
    g.add_argument("--compile-fast", action="store_true", help="also time torch.compile(dit_fast)")
    g.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    g.add_argument("--iters", type=int, default=None, help="timed steps (median reported)")
    g.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    g.add_argument("--out", default=None, help=f"results directory (default {DEFAULT_OUT}/ if it exists, else ./out)")
    g.add_argument("--no-ceilings", action="store_true", help="skip measuring copy bandwidth and GEMM rate")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--no-png", action="store_true", help="skip the PNG charts")

    p = argparse.ArgumentParser(prog="dit-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", parents=[common], help="parity report + model throughput table")
    b.add_argument("--no-parity", action="store_true", help="throughput only")
    b.add_argument("--parity-batch", type=int, default=2)
    b.add_argument("--parity-dtypes", default="fp32,bf16", help="comma list of dtypes to check")
    sub.add_parser("throughput", parents=[common], help="model throughput table only")
    pa = sub.add_parser("parity", parents=[common], help="numerical parity of dit_fast against the reference")
    pa.add_argument("--parity-dtypes", default="fp32,bf16", help="comma list of dtypes to check")
    k = sub.add_parser("kernels", parents=[common], help="per-op microbenchmarks")
    k.add_argument("--op", action="append", default=None, help="ops to time (default all)")
    k.add_argument("--no-backward", action="store_true", help="forward only")
    pr = sub.add_parser("profile", parents=[common], help="torch.profiler kernel tables and Chrome traces")
    pr.add_argument("--target", default="block,model", help="block, model or both (comma list)")
    pr.add_argument("--nvtx", action="store_true", help="also emit NVTX ranges (for nsys)")
    pr.add_argument("--no-trace", action="store_true", help="do not export Chrome traces")
    sub.add_parser("info", help="versions, device, extension, backend choices")
    rp = sub.add_parser("report", help="re-render Markdown/PNG from result JSON files, or merge several into one")
    rp.add_argument("json", nargs="+", help="result JSON files (of bench, throughput, parity, kernels, profile)")
    rp.add_argument("--merge", default=None, metavar="OUT_DIR",
                    help="merge the files' sections into one <date>-<device>.{json,md,png} under OUT_DIR")
    rp.add_argument("--no-png", action="store_true")
    return p


class Run:
    """Resolved settings shared by the subcommands."""

    def __init__(self, args):
        import torch

        from .bench.contenders import parse_dtype
        from .bench.flops import shape_for

        self.args = args
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        gpu = self.device.type == "cuda"
        self.model_name = args.model or ("DiT-XL/2" if gpu else "DiT-S/2")
        shape = shape_for(self.model_name, args.image_size, args.depth)
        if args.input_size:
            from dataclasses import replace

            shape = replace(shape, input_size=args.input_size)
        self.shape = shape
        self.dtypes = [parse_dtype(d) for d in (_csv([args.dtype] if args.dtype else []) or ["bf16" if gpu else "fp32"])]
        if len(self.dtypes) > 1 and args.command != "kernels":
            raise SystemExit(f"--dtype takes one dtype for {args.command} (a comma list only for kernels), got {args.dtype!r}")
        self.dtype = self.dtypes[0]
        self.modes = _csv(args.mode) or ["fwd", "cfg", "train"]
        for m in self.modes:
            if m not in ("fwd", "cfg", "train"):
                raise SystemExit(f"--mode must be fwd, cfg or train, got {m!r}")
        self.backends = _csv(args.backend) or None
        self.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
        self.iters = args.iters if args.iters is not None else (20 if gpu else 3)
        if args.batch:
            self.batch = {m: args.batch for m in self.modes}
        else:
            self.batch = {m: (GPU_BATCH[m] if gpu else CPU_BATCH) for m in self.modes}
        out = args.out or (DEFAULT_OUT if os.path.isdir(DEFAULT_OUT) else "out")
        os.makedirs(out, exist_ok=True)
        self.out = out
        self.progress = not args.no_progress and sys.stderr.isatty()
        self._env = None
        self._ceilings = None

    @property
    def env(self) -> dict:
        if self._env is None:
            from .bench.env import device_slug, environment

            self._env = environment(self.device) | {"device_slug": device_slug(self.device)}
        return self._env

    @property
    def ceilings(self) -> dict | None:
        if self._ceilings is None and not self.args.no_ceilings:
            from .bench.env import measure_ceilings

            print("measuring copy bandwidth and bf16 GEMM rate ...", file=sys.stderr)
            self._ceilings = measure_ceilings(self.device)
        return self._ceilings

    def record(self, kind: str, ceilings: bool = True) -> dict:
        from .bench.flops import forward_flops_per_image, forward_macs_per_image

        macs = forward_macs_per_image(self.shape)
        return {
            "kind": kind,
            "env": self.env,
            "ceilings": self.ceilings if ceilings else None,
            "config": {
                "model": self.model_name,
                "image_size": self.args.image_size,
                **self.shape.as_dict(),
                "dtype": ",".join(str(d).replace("torch.", "") for d in self.dtypes),
                "precision_policy": "fp32 weights, torch.autocast(dtype) in every mode and contender" if any(str(d) != "torch.float32" for d in self.dtypes) else "fp32",
                "attn": self.args.attn,
                "warmup": self.warmup,
                "iters": self.iters,
                "device": str(self.device),
            },
            "flops": {
                "forward_gmacs_per_image": sum(macs.values()) / 1e9,
                "forward_gflops_per_image": forward_flops_per_image(self.shape) / 1e9,
                "macs_breakdown": macs,
            },
            "notes": [],
        }

    def write(self, record: dict, what: str) -> dict:
        from .bench import report

        if self.args.no_png:
            base = report.stem(self.out, record["env"], what)
            paths = {"json": report.write_json(base + ".json", record), "md": report.write_markdown(base + ".md", record)}
        else:
            paths = report.write_all(self.out, record, what)
        for kind, path in paths.items():
            print(f"wrote {path}", file=sys.stderr)
        return paths

    def checkpoint(self, record: dict, what: str):
        """Rewrite the JSON after every measurement, so a run killed by a timeout keeps what it measured."""
        from .bench import report

        path = report.stem(self.out, record["env"], what) + ".json"
        return lambda _row: report.write_json(path, record)


def _print_table(record: dict, key: str, cols) -> None:
    from .bench.report import md_table

    if record.get(key):
        print(md_table(record[key], cols))


def cmd_parity(run: Run, record: dict, dtypes: list[str], batch: int = 2) -> bool:
    from .bench.contenders import parse_dtype
    from .bench.parity import all_pass, run_parity
    from .bench.report import PARITY_COLS

    print(f"parity: {run.model_name} input {run.shape.input_size} depth {run.shape.depth} on {run.device} ...", file=sys.stderr)
    record["parity"] = run_parity(
        run.shape, device=run.device, batch=batch, dtypes=tuple(parse_dtype(d) for d in dtypes),
        backends=run.backends, attn=run.args.attn,
    )
    _print_table(record, "parity", PARITY_COLS)
    ok = all_pass(record["parity"])
    print(f"parity: {'PASS' if ok else 'FAIL'}")
    return ok


def cmd_throughput(run: Run, record: dict, what: str) -> None:
    from .bench.report import THROUGHPUT_COLS
    from .bench.throughput import run_throughput

    ceil = run.ceilings
    record["throughput"] = []
    save = run.checkpoint(record, what)

    def on_result(row):
        record["throughput"].append(row)
        save(row)

    run_throughput(
        run.shape, device=run.device, dtype=run.dtype, batch=run.batch, modes=run.modes, backends=run.backends,
        compile_ref=run.args.compile, compile_fast=run.args.compile_fast, attn=run.args.attn,
        warmup=run.warmup, iters=run.iters, gemm_tflops=ceil["gemm_tflops"] if ceil else None,
        on_result=on_result, progress=run.progress,
    )
    from .bench.throughput import add_speedups

    add_speedups(record["throughput"])
    if run.device.type == "cpu":
        record["notes"].append("CPU run: wall clock (perf_counter), median of the timed steps; MFU is against a small CPU GEMM and only indicative.")
    _print_table(record, "throughput", THROUGHPUT_COLS)


def cmd_kernels(run: Run, record: dict) -> None:
    from .bench.kernels import default_shapes, run_kernels
    from .bench.report import KERNEL_COLS

    ops = _csv(run.args.op) or None
    shapes = default_shapes(run.device.type, run.shape.tokens, run.shape.hidden_size, [run.args.batch] if run.args.batch else None)
    ceil = run.ceilings
    record["kernels"] = []
    save = run.checkpoint(record, "kernels")

    def on_result(row):
        record["kernels"].append(row)
        save(row)

    run_kernels(device=run.device, dtype=run.dtypes, shapes=shapes, ops=ops, compile_=run.args.compile,
                with_backward=not run.args.no_backward, copy_gb_per_s=ceil["copy_gb_per_s"] if ceil else None,
                cpu_iters=max(run.iters, 1), progress=run.progress, on_result=on_result)
    from .bench.kernels import _add_speedups

    _add_speedups(record["kernels"])
    _print_table(record, "kernels", KERNEL_COLS)


def cmd_profile(run: Run, record: dict) -> None:
    import torch

    from .bench.contenders import Contender, build_reference
    from .bench.profile import profile_model
    from .bench.report import PROFILE_KERNEL_COLS, md_table, stem
    from .testing import randomize_weights_

    torch.manual_seed(0)
    reference = randomize_weights_(build_reference(run.shape, run.device))
    contenders = [Contender("reference", "reference")]
    contenders += [Contender(f"dit_fast[{b}]", "dit_fast", backend=b, attn=run.args.attn) for b in (run.backends or ["auto"])]
    targets = _csv([run.args.target])
    modes = [m for m in run.modes if m != "cfg"] or ["fwd"]
    batch = run.args.batch or (32 if run.device.type == "cuda" else 2)
    record["profile"] = []
    save = run.checkpoint(record, "profile")
    base = stem(run.out, record["env"], "profile")
    for c in contenders:
        for target in targets:
            for mode in modes:
                tag = f"{c.name.replace('[', '-').replace(']', '')}-{target}-{mode}"
                trace = None if run.args.no_trace else f"{base}-{tag}.trace.json"
                print(f"profile: {c.name} {target} {mode} ...", file=sys.stderr)
                try:
                    res = profile_model(c, reference, run.shape, device=run.device, dtype=run.dtype, batch=batch,
                                        mode=mode, target=target, warmup=min(run.warmup, 2) or 1,
                                        iters=2 if run.device.type == "cuda" else 1, trace_path=trace, nvtx=run.args.nvtx)
                except Exception as e:
                    res = {"contender": c.name, "target": target, "mode": mode, "batch": batch, "iters": 0,
                           "kernels": [], "ranges": [], "error": f"{type(e).__name__}: {e}"[:300]}
                if trace and os.path.exists(trace):
                    with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    os.remove(trace)
                    res["trace"] = os.path.basename(trace) + ".gz"
                record["profile"].append(res)
                save(res)
                print(f"\n{c.name} {target} {mode}:" + (f" ERROR {res['error']}" if res.get("error") else ""))
                if res["kernels"]:
                    print(md_table(res["kernels"][:10], PROFILE_KERNEL_COLS))


SECTIONS = ("parity", "throughput", "kernels", "profile")


def cmd_report(args) -> int:
    """Markdown/PNG from JSON (e.g. after a stage was killed by its timeout: its JSON holds every row measured)."""
    import json

    from .bench import report

    records = []
    for path in args.json:
        try:
            with open(path) as f:
                records.append((path, json.load(f)))
        except (OSError, ValueError) as e:
            print(f"report: skipping {path}: {e}", file=sys.stderr)
    if not records:
        print("report: no readable result files", file=sys.stderr)
        return 1
    from .bench.kernels import _add_speedups
    from .bench.throughput import add_speedups

    for _, rec in records:  # a run killed mid-way saved rows without the cross-row figures
        add_speedups(rec.get("throughput") or [])
        _add_speedups(rec.get("kernels") or [])
    if args.merge:
        merged = dict(records[0][1])
        merged["kind"] = "bench"
        merged["notes"] = []
        for path, rec in records:
            for key in SECTIONS:
                if rec.get(key):
                    merged[key] = rec[key]
            if rec.get("ceilings") and not merged.get("ceilings"):
                merged["ceilings"] = rec["ceilings"]
            merged["notes"] += [n for n in rec.get("notes", []) if n not in merged["notes"]]
        base = report.stem(args.merge, merged["env"])
        paths = [report.write_json(base + ".json", merged), report.write_markdown(base + ".md", merged)]
        if not args.no_png:
            paths.append(report.write_charts(base + ".png", merged))
    else:
        paths = []
        for path, rec in records:
            base = path[:-5] if path.endswith(".json") else path
            paths.append(report.write_markdown(base + ".md", rec))
            if not args.no_png:
                paths.append(report.write_charts(base + ".png", rec))
    for p in paths:
        if p:
            print(f"wrote {p}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "info":
        from .info import main as info_main

        return info_main([])
    if args.command == "report":
        return cmd_report(args)
    run = Run(args)
    ok = True
    if args.command in ("bench", "throughput"):
        what = "" if args.command == "bench" else "throughput"
        record = run.record(args.command)
        if args.command == "bench" and not args.no_parity:
            ok = cmd_parity(run, record, _csv([args.parity_dtypes]), batch=args.parity_batch)
        cmd_throughput(run, record, what)
        run.write(record, what)
    elif args.command == "parity":
        record = run.record("parity", ceilings=False)
        ok = cmd_parity(run, record, _csv([args.parity_dtypes]))
        run.write(record, "parity")
    elif args.command == "kernels":
        record = run.record("kernels")
        cmd_kernels(run, record)
        run.write(record, "kernels")
    elif args.command == "profile":
        record = run.record("profile", ceilings=False)
        cmd_profile(run, record)
        run.write(record, "profile")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
