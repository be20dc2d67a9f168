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

from .atomic import atomic_write

DEFAULT_OUT = os.path.join("benchmarks", "results")
GPU_BATCH = {"fwd": 256, "cfg": 256, "train": 64}
CPU_BATCH = 2


def _csv(values) -> list[str]:
    out = []
    for v in values or []:
        out += v if isinstance(v, list) else [s.strip() for s in v.split(",") if s.strip()]
    return out


# -- argument types: a bad value is a usage error (exit 2) naming the flag, what was expected and what came

def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _one_of(choices, what: str):
    """A comma list whose items must each be in `choices` (checked when parsed)."""

    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected {what} (one or more of {', '.join(choices)}), got {text!r}")
        for item in items:
            if item not in choices:
                raise argparse.ArgumentTypeError(f"expected {what} (one of {', '.join(choices)}), got {item!r}")
        return items

    parse.__name__ = what
    return parse


def _choice(choices, what: str):
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"expected {what} (one of {', '.join(choices)}), got {text!r}")
        return text

    parse.__name__ = what
    return parse


def _model_name(text: str) -> str:
    from .reference import CONFIGS

    if text not in CONFIGS:
        raise argparse.ArgumentTypeError(f"expected a DiT config name (one of {', '.join(CONFIGS)}), got {text!r}")
    return text


POSITIVE = _int_at_least(1)
NON_NEGATIVE = _int_at_least(0)
DTYPE_NAMES = ("fp32", "bf16", "fp16", "float32", "bfloat16", "float16")
MODES = ("fwd", "cfg", "train", "sample")
DEFAULT_MODES = ("fwd", "cfg", "train")  # "sample" (250-step CFG sampling latency) only when asked for
KERNEL_BACKENDS = ("triton", "ext", "torch", "auto")
PROFILE_TARGETS = ("block", "model")
DEVICES = ("cuda", "cpu")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("model and run")
    g.add_argument("--model", type=_model_name, default=None,
                   help="DiT config name (default: DiT-XL/2 on a GPU, DiT-S/2 on the CPU)")
    g.add_argument("--image-size", type=int, default=256, choices=(256, 512), help="image side in pixels (latent = /8)")
    g.add_argument("--depth", type=POSITIVE, default=None, help="override the number of blocks (quick runs)")
    g.add_argument("--input-size", type=POSITIVE, default=None, help="override the latent side directly (quick runs)")
    g.add_argument("--batch", type=POSITIVE, default=None, help="images per step (default per mode and device)")
    g.add_argument("--dtype", type=_one_of(DTYPE_NAMES, "a dtype"), default=None,
                   help="fp32 | bf16 | fp16 via autocast, weights fp32 (default: bf16 on a GPU, fp32 on the CPU); "
                        "kernels takes a comma list")
    g.add_argument("--mode", type=_one_of(MODES, "a mode"), action="append", default=None,
                   help="fwd | cfg | train | sample, repeatable or comma list (default fwd,cfg,train)")
    g.add_argument("--sample-steps", type=POSITIVE, default=250, help="sampling steps of --mode sample")
    g.add_argument("--backend", type=_one_of(KERNEL_BACKENDS, "a kernel backend"), action="append", default=None,
                   help="dit_fast kernel families to compare: triton, ext, torch, auto "
                        "(repeatable/comma; default every one that runs)")
    g.add_argument("--attn", type=_choice(_attn_backends(), "an attention backend"), default="auto",
                   help="attention backend of dit_fast (see dit_fast.attention)")
    g.add_argument("--compile", action="store_true", help="also time torch.compile(reference)")
    g.add_argument("--compile-fast", action="store_true", help="also time torch.compile(dit_fast)")
    g.add_argument("--warmup", type=NON_NEGATIVE, default=None, help="untimed steps first")
    g.add_argument("--iters", type=POSITIVE, default=None,
                   help="throughput: rounds (one timed step per contender per round, median reported); "
                        "kernels: calls per CPU sample")
    g.add_argument("--device", choices=DEVICES, default=None, help="cuda | cpu (default: cuda when available)")
    g.add_argument("--out", default=None, help=f"results directory (default {DEFAULT_OUT}/ if it exists, else ./out)")
    g.add_argument("--no-ceilings", action="store_true", help="skip measuring copy bandwidth and GEMM rate")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--no-png", action="store_true", help="skip the PNG charts")

    p = argparse.ArgumentParser(prog="dit-fast", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", parents=[common], help="parity report + model throughput table")
    b.add_argument("--no-parity", action="store_true", help="throughput only")
    b.add_argument("--parity-batch", type=POSITIVE, default=2)
    b.add_argument("--parity-dtypes", type=_one_of(DTYPE_NAMES, "a dtype"), default=["fp32", "bf16"],
                   help="comma list of dtypes to check")
    sub.add_parser("throughput", parents=[common], help="model throughput table only")
    pa = sub.add_parser("parity", parents=[common], help="numerical parity of dit_fast against the reference")
    pa.add_argument("--parity-dtypes", type=_one_of(DTYPE_NAMES, "a dtype"), default=["fp32", "bf16"],
                    help="comma list of dtypes to check")
    k = sub.add_parser("kernels", parents=[common], help="per-op microbenchmarks")
    k.add_argument("--op", type=_one_of(_ops(), "an op"), action="append", default=None,
                   help="ops to time (default all)")
    k.add_argument("--no-backward", action="store_true", help="forward only")
    k.add_argument("--rounds", type=POSITIVE, default=5,
                   help="interleaved rounds per op and pass (median and spread reported)")
    k.add_argument("--overhead", action="store_true",
                   help="add the host-overhead table (microseconds per op call on tiny tensors)")
    o = sub.add_parser("overhead", parents=[common], help="host overhead of every op wrapper, per backend (CPU)")
    o.add_argument("--rounds", type=POSITIVE, default=5, help="interleaved rounds per op")
    pr = sub.add_parser("profile", parents=[common], help="torch.profiler kernel tables and Chrome traces")
    pr.add_argument("--target", type=_one_of(PROFILE_TARGETS, "a profile target"), default=["block", "model"],
                    help="block, model or both (comma list)")
    pr.add_argument("--nvtx", action="store_true", help="also emit NVTX ranges (for nsys)")
    pr.add_argument("--no-trace", action="store_true", help="do not export Chrome traces")
    sub.add_parser("info", help="versions, device, extension, backend choices")
    rp = sub.add_parser("report", help="re-render Markdown/PNG from result JSON files, or merge several into one")
    rp.add_argument("json", nargs="+", help="result JSON files (of bench, throughput, parity, kernels, profile)")
    rp.add_argument("--merge", default=None, metavar="OUT_DIR",
                    help="merge the files' sections into one <date>-<device>.{json,md,png} under OUT_DIR")
    rp.add_argument("--no-png", action="store_true")
    from . import sample_cli

    # not a child of `common`: its --model, --image-size, --out and --device mean the sampling run's
    sample_cli.add_arguments(sub.add_parser("sample", help="class-conditional samples: PNG grid + FID .npz"))
    from .bench.roofline_cli import add_parser as add_roofline

    add_roofline(sub, POSITIVE, _positive_float, _model_name)
    return p


def _attn_backends() -> tuple[str, ...]:
    from .attention import ATTN_BACKENDS

    return ATTN_BACKENDS


def _ops() -> tuple[str, ...]:
    from .backends import OPS

    return OPS


class Run:
    """Resolved settings shared by the subcommands; a bad combination is a usage error (parser.error, exit 2)."""

    def __init__(self, args, parser: argparse.ArgumentParser):
        import torch

        from .bench.contenders import parse_dtype
        from .bench.flops import shape_for

        self.args = args
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            parser.error("argument --device: expected a device that is available here, got 'cuda' (no CUDA device)")
        gpu = self.device.type == "cuda"
        self.model_name = args.model or ("DiT-XL/2" if gpu else "DiT-S/2")
        shape = shape_for(self.model_name, args.image_size, args.depth)
        if args.input_size:
            from dataclasses import replace

            if args.input_size % shape.patch_size:
                parser.error(f"argument --input-size: expected a multiple of {self.model_name}'s patch size "
                             f"{shape.patch_size}, got {args.input_size}")
            shape = replace(shape, input_size=args.input_size)
        self.shape = shape
        self.dtypes = [parse_dtype(d) for d in (_csv(args.dtype) or ["bf16" if gpu else "fp32"])]
        if len(self.dtypes) > 1 and args.command != "kernels":
            parser.error(f"argument --dtype: expected one dtype for {args.command} (a comma list only for kernels), "
                         f"got {','.join(args.dtype)!r}")
        self.dtype = self.dtypes[0]
        self.modes = list(dict.fromkeys(_csv(args.mode))) or list(DEFAULT_MODES)
        self.backends = list(dict.fromkeys(_csv(args.backend))) or None
        self.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
        self.iters = args.iters if args.iters is not None else (20 if gpu else 3)
        if args.batch:
            self.batch = {m: args.batch for m in self.modes if m != "sample"}
        else:
            self.batch = {m: (GPU_BATCH[m] if gpu else CPU_BATCH) for m in self.modes if m != "sample"}
        self.out = _writable_out_dir(args.out or (DEFAULT_OUT if os.path.isdir(DEFAULT_OUT) else "out"), parser)
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
                "precision_policy": ("fp32 weights, torch.autocast(dtype) in every mode and contender"
                                     if any(str(d) != "torch.float32" for d in self.dtypes) else "fp32"),
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
        """The complete result under its final name; then the partial checkpoint of this run goes."""
        from .bench import report

        record["status"] = "complete"
        paths = report.write_all(self.out, record, what, png=not self.args.no_png)
        report.remove_partial(self.out, record["env"], what)
        for path in paths.values():
            print(f"wrote {path}", file=sys.stderr)
        return paths

    def write_partial(self, record: dict, what: str, why: str) -> dict:
        """What was measured (JSON + Markdown marked incomplete) under the -partial name: an earlier
        complete result of the same name stays as it is."""
        from .bench import report

        record["status"] = f"incomplete: {why}"
        record.setdefault("notes", []).append(f"INCOMPLETE ({why}): only what was measured before the run stopped.")
        paths = report.write_all(self.out, record, what, png=False, partial=True)
        for path in paths.values():
            print(f"wrote {path}", file=sys.stderr)
        return paths

    def checkpoint(self, record: dict, what: str):
        """Rewrite <name>-partial.json after every measurement, so a run killed by a timeout keeps what it
        measured, without ever replacing the complete result of an earlier run."""
        from .bench import report

        path = report.stem(self.out, record["env"], what) + report.PARTIAL + ".json"

        def save(_=None):
            record["status"] = "partial"
            report.write_json(path, record)

        return save


def _writable_out_dir(out: str, parser: argparse.ArgumentParser) -> str:
    """--out exists (created if needed) and takes files: checked before anything is measured."""
    import tempfile

    try:
        os.makedirs(out, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".dit-fast-write-test.", dir=out)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        parser.error(f"argument --out: expected a directory that can be created and written, got {out!r} "
                     f"({e.strerror or type(e).__name__})")
    return out


def _print_table(record: dict, key: str, cols) -> None:
    from .bench.report import KERNEL_NOISE, THROUGHPUT_NOISE, md_table, noise_lines, with_noise

    flags = {"throughput": THROUGHPUT_NOISE, "kernels": KERNEL_NOISE}.get(key)
    rows = [with_noise(r, flags) for r in record.get(key) or []] if flags else record.get(key)
    if rows:
        print(md_table(rows, cols))
        if flags:
            print("\n".join(noise_lines(rows)))


def cmd_parity(run: Run, record: dict, dtypes: list[str], batch: int = 2) -> bool:
    from .bench.contenders import parse_dtype
    from .bench.parity import all_pass, run_parity
    from .bench.report import PARITY_COLS

    print(f"parity: {run.model_name} input {run.shape.input_size} depth {run.shape.depth} on {run.device} ...",
          file=sys.stderr)
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

    def on_update(rows):
        record["throughput"] = rows
        save()

    run_throughput(
        run.shape, device=run.device, dtype=run.dtype, batch=run.batch, modes=[m for m in run.modes if m != "sample"],
        backends=run.backends,
        compile_ref=run.args.compile, compile_fast=run.args.compile_fast, attn=run.args.attn,
        warmup=run.warmup, iters=run.iters, gemm_tflops=ceil["gemm_tflops"] if ceil else None,
        on_update=on_update, progress=run.progress,
    )
    record["notes"].append(NOISE_NOTE)
    if run.device.type == "cpu":
        record["notes"].append("CPU run: wall clock (perf_counter), median of the timed steps; "
                               "MFU is against a small CPU GEMM and only indicative.")
    _print_table(record, "throughput", THROUGHPUT_COLS)


def cmd_sampling(run: Run, record: dict, what: str) -> None:
    from .bench.report import SAMPLING_COLS
    from .bench.sampling import run_sampling_bench

    record["sampling"] = []
    save = run.checkpoint(record, what)

    def on_result(row):
        record["sampling"].append(row)
        save()

    run_sampling_bench(
        run.shape, device=run.device, batches=[run.args.batch] if run.args.batch else None,
        num_steps=run.args.sample_steps, rounds=run.args.iters or 3, compile_ref=run.args.compile,
        backend=(run.backends or ["auto"])[0], on_result=on_result,
    )
    _print_table(record, "sampling", SAMPLING_COLS)


def cmd_kernels(run: Run, record: dict) -> None:
    from .bench.kernels import default_shapes, run_kernels
    from .bench.report import KERNEL_COLS

    ops = _csv(run.args.op) or None
    shapes = default_shapes(run.device.type, run.shape.tokens, run.shape.hidden_size,
                            [run.args.batch] if run.args.batch else None)
    ceil = run.ceilings
    record["kernels"] = []
    save = run.checkpoint(record, "kernels")

    def on_result(row):
        record["kernels"].append(row)
        save()

    run_kernels(device=run.device, dtype=run.dtypes, shapes=shapes, ops=ops, compile_=run.args.compile,
                with_backward=not run.args.no_backward, copy_gb_per_s=ceil["copy_gb_per_s"] if ceil else None,
                rounds=run.args.rounds, cpu_iters=run.iters, progress=run.progress, on_result=on_result)
    record["notes"].append(NOISE_NOTE)
    _print_table(record, "kernels", KERNEL_COLS)


def cmd_overhead(run: Run, record: dict) -> None:
    from .bench.overhead import NOTES, run_overhead
    from .bench.report import OVERHEAD_COLS

    record["overhead"] = []
    save = run.checkpoint(record, run.args.command if run.args.command == "overhead" else "kernels")

    def on_result(row):
        record["overhead"].append(row)
        save()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    run_overhead(rounds=run.args.rounds, on_result=on_result)
    if load is not None:  # a shared machine's load inflates host times: say how busy it was
        record["notes"].append(f"Host overhead: 1-minute load average {load:.2f} on {os.cpu_count()} CPUs "
                               "when it started.")
    record["notes"] += [n for n in NOTES if n not in record["notes"]]
    _print_table(record, "overhead", OVERHEAD_COLS)


def cmd_profile(run: Run, record: dict) -> None:
    import torch

    from .bench.contenders import Contender, build_reference
    from .bench.profile import profile_model
    from .bench.report import PROFILE_KERNEL_COLS, md_table, stem
    from .testing import randomize_weights_

    torch.manual_seed(0)
    reference = randomize_weights_(build_reference(run.shape, run.device))
    contenders = [Contender("reference", "reference")]
    contenders += [Contender(f"dit_fast[{b}]", "dit_fast", backend=b, attn=run.args.attn)
                   for b in (run.backends or ["auto"])]
    targets = list(dict.fromkeys(_csv(run.args.target)))
    modes = [m for m in run.modes if m not in ("cfg", "sample")] or ["fwd"]
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
                                        iters=2 if run.device.type == "cuda" else 1, trace_path=trace,
                                        nvtx=run.args.nvtx)
                except Exception as e:
                    res = {"contender": c.name, "target": target, "mode": mode, "batch": batch, "iters": 0,
                           "kernels": [], "ranges": [], "error": f"{type(e).__name__}: {e}"[:300]}
                if trace and os.path.exists(trace):
                    with open(trace, "rb") as src, atomic_write(trace + ".gz", "wb") as raw, \
                            gzip.GzipFile(fileobj=raw, mode="wb") as dst:
                        shutil.copyfileobj(src, dst)
                    os.remove(trace)
                    res["trace"] = os.path.basename(trace) + ".gz"
                record["profile"].append(res)
                save()
                print(f"\n{c.name} {target} {mode}:" + (f" ERROR {res['error']}" if res.get("error") else ""))
                if res["kernels"]:
                    print(md_table(res["kernels"][:10], PROFILE_KERNEL_COLS))


NOISE_NOTE = ("Timing: contenders interleaved in rounds (round r runs each once, order rotated by r); "
              "times are medians "
              "over the rounds, speedups medians of per-round ratios; spread = (max - min) / median; NOISY marks a "
              "spread over 10%: do not trust a difference smaller than the spread.")
SECTIONS = ("parity", "throughput", "kernels", "overhead", "profile")


def cmd_report(args, parser: argparse.ArgumentParser) -> int:
    """Markdown/PNG from JSON (e.g. after a stage was killed by its timeout: its -partial JSON holds every
    row measured). Every input is read and checked first: a bad one is a usage error naming the file."""
    from .bench import report

    records = []
    for path in args.json:
        try:
            records.append((path, report.read_record(path)))
        except (OSError, ValueError) as e:
            parser.error(f"argument json: {e}")
    if args.merge:
        out = _writable_out_dir(args.merge, parser)
        merged = dict(records[0][1])
        merged["kind"] = "bench"
        merged["notes"] = []
        incomplete = []
        for path, rec in records:
            for key in SECTIONS:
                if rec.get(key):
                    merged[key] = rec[key]
            if rec.get("ceilings") and not merged.get("ceilings"):
                merged["ceilings"] = rec["ceilings"]
            merged["notes"] += [n for n in rec.get("notes", []) if n not in merged["notes"]]
            if rec.get("status", "complete") != "complete":
                incomplete.append(f"{os.path.basename(path)} ({rec['status']})")
        if incomplete:
            merged["status"] = "incomplete"
            merged["notes"].append("INCOMPLETE: merged from runs that did not finish: " + ", ".join(incomplete))
        else:
            merged["status"] = "complete"
        paths = list(report.write_all(out, merged, png=not args.no_png).values())
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


class _Terminated(Exception):
    """SIGTERM (a `timeout` ending the stage): handled like Ctrl-C, so what was measured is written."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import main as info_main

        return info_main([])
    if args.command == "report":
        return cmd_report(args, parser)
    if args.command == "sample":
        from . import sample_cli

        return sample_cli.run(args)
    if args.command == "roofline":
        from .bench.roofline_cli import run as roofline_run

        return roofline_run(args, parser, lambda out: _writable_out_dir(out, parser))
    run = Run(args, parser)
    jobs = {
        "bench": ("bench", "", True),
        "throughput": ("throughput", "throughput", True),
        "parity": ("parity", "parity", False),
        "kernels": ("kernels", "kernels", True),
        "overhead": ("overhead", "overhead", False),
        "profile": ("profile", "profile", False),
    }
    kind, what, ceilings = jobs[args.command]
    record = run.record(kind, ceilings=ceilings and args.command != "overhead")
    import signal

    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    ok = True
    try:
        if args.command in ("bench", "parity") and not getattr(args, "no_parity", False):
            batch = args.parity_batch if args.command == "bench" else 2
            ok = cmd_parity(run, record, _csv(args.parity_dtypes), batch=batch)
        if args.command in ("bench", "throughput"):
            if [m for m in run.modes if m != "sample"]:
                cmd_throughput(run, record, what)
            if "sample" in run.modes:
                cmd_sampling(run, record, what)
        elif args.command == "kernels":
            cmd_kernels(run, record)
            if args.overhead:
                cmd_overhead(run, record)
        elif args.command == "overhead":
            cmd_overhead(run, record)
        elif args.command == "profile":
            cmd_profile(run, record)
    except (KeyboardInterrupt, _Terminated) as e:
        why = "interrupted (Ctrl-C)" if isinstance(e, KeyboardInterrupt) else "terminated (SIGTERM)"
        print(f"\n{args.command}: {why}; writing what was measured", file=sys.stderr)
        run.write_partial(record, what, why)
        return 130 if isinstance(e, KeyboardInterrupt) else 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    run.write(record, what)
    return 0 if ok else 1


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
