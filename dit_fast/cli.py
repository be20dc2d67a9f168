"""`dit-fast` / `python -m dit_fast`: bench (parity + throughput), parity, kernels, profile, info.

Defaults follow the device: on a GPU DiT-XL/2 at 256px, bf16 autocast, real batch sizes; on the
CPU DiT-S/2 at 256px, float32, batch 2 and a few iterations (a couple of minutes on 2 cores).
Results go to --out as <date>-<device>[-what].{json,md,png}.
"""
from __future__ import annotations

import argparse
import gzip
import os
import re
import shutil
import sys

from .atomic import atomic_write
from .cli_args import converted

DEFAULT_OUT = os.path.join("benchmarks", "results")
# Per-GPU batches as people train: the official recipe runs 32 images per GPU (global 256 on 8 GPUs),
# LightningDiT 32-128; a B=256 training step of DiT-XL/2 fits in 80 GB for neither model.
GPU_BATCH = {"fwd": [256], "cfg": [256], "train": [32, 64]}
CPU_BATCH = [2]


def _csv(values) -> list[str]:
    out = []
    for v in values or []:
        out += v if isinstance(v, list) else [s.strip() for s in v.split(",") if s.strip()]
    return out


# -- argument types: a bad value is a usage error (exit 2) naming the flag, what was expected and what came

def _int_at_least(low: int):
    def parse(text: str) -> int:
        value = converted(text, int, f"an integer >= {low}")
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def _positive_float(text: str) -> float:
    value = converted(text, float, "a positive number")
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
    """A published name of the family: DiT-*, SiT-* or LightningDiT-*."""
    from .bench.flops import model_names

    names = model_names()
    if text not in names:
        raise argparse.ArgumentTypeError(f"expected a DiT, SiT or LightningDiT config name (one of "
                                         f"{', '.join(names)}), got {text!r}")
    return text


def _dit_model_name(text: str) -> str:
    """A DiT config name (the roofline models DiT's block only)."""
    from .reference import CONFIGS

    if text not in CONFIGS:
        raise argparse.ArgumentTypeError(f"expected a DiT config name (one of {', '.join(CONFIGS)}), got {text!r}")
    return text


def _lightning_options(text: str) -> tuple[str, ...]:
    from .bench.flops import parse_lightning_options

    try:
        return parse_lightning_options(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_lightning_options.__name__ = "LightningDiT options"


POSITIVE = _int_at_least(1)


def _positive_list(text: str) -> list[int]:
    """A comma list of integers >= 1 (e.g. --batch 32,64)."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected one or more integers >= 1 (comma list), got {text!r}")
    return list(dict.fromkeys(POSITIVE(item) for item in items))


_positive_list.__name__ = "batch list"


def _names(text: str) -> list[str]:
    """A comma list of names (contenders: checked against the run's own list once it is known, in Run)."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected one or more names (comma list), got {text!r}")
    return items


_names.__name__ = "name list"
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
                   help="published config name: DiT-*, SiT-* or LightningDiT-* (default: DiT-XL/2 on a GPU, "
                        "DiT-S/2 on the CPU)")
    g.add_argument("--lightning-options", type=_lightning_options, default=None,
                   help="LightningDiT's switches that are on, comma list of qknorm, swiglu, rope, rmsnorm, wo_shift "
                        "('recipe' = swiglu,rope,rmsnorm, the XL/1 recipe and the default; 'none' = all off)")
    g.add_argument("--image-size", type=int, default=256, choices=(256, 512), help="image side in pixels (latent = /8)")
    g.add_argument("--depth", type=POSITIVE, default=None, help="override the number of blocks (quick runs)")
    g.add_argument("--input-size", type=POSITIVE, default=None, help="override the latent side directly (quick runs)")
    g.add_argument("--batch", type=_positive_list, default=None,
                   help="images per step, or a comma list of sizes (default per mode and device: on a GPU fwd/cfg "
                        "256, train 32,64)")
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
    g.add_argument("--compile", action="store_true",
                   help="also time torch.compile(reference) (LightningDiT: also reference+compile-blocks, each "
                        "block, embedder and the final layer compiled, as its authors run it)")
    g.add_argument("--compile-fast", action="store_true", help="also time torch.compile(dit_fast)")
    g.add_argument("--contender", type=_names, action="append", default=None,
                   help="throughput: time only these contenders (comma list, e.g. reference,reference+compile,"
                        "dit_fast[auto]; default all of the run)")
    g.add_argument("--max-batch", action="store_true",
                   help="throughput, train on CUDA: also find and time each eager contender's largest batch "
                        "that fits (out-of-memory caught per try)")
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
                   help="ops to time (default: the model's; LightningDiT's adaLN modes as e.g. "
                        "adaln_modulate:rms-noshift)")
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

    add_roofline(sub, POSITIVE, _positive_float, _dit_model_name)
    return p


def _attn_backends() -> tuple[str, ...]:
    from .attention import ATTN_BACKENDS

    return ATTN_BACKENDS


def _ops() -> tuple[str, ...]:
    """Every op `kernels --op` takes: the fused ops and LightningDiT's modes of the adaLN ops (e.g.
    adaln_modulate:rms-noshift)."""
    from .backends import ALL_OPS
    from .bench.kernel_variants import NORM_VARIANTS

    return ALL_OPS + tuple(NORM_VARIANTS)


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
        if args.lightning_options is not None and not self.model_name.startswith("LightningDiT-"):
            parser.error(f"argument --lightning-options: expected a LightningDiT --model, got {self.model_name!r}")
        shape = shape_for(self.model_name, args.image_size, args.depth, args.lightning_options)
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
        self.contenders = list(dict.fromkeys(_csv(args.contender))) or None
        self.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
        self.iters = args.iters if args.iters is not None else (20 if gpu else 3)
        if args.batch:
            self.batch = {m: list(args.batch) for m in self.modes if m != "sample"}
        else:
            self.batch = {m: list(GPU_BATCH[m] if gpu else CPU_BATCH) for m in self.modes if m != "sample"}
        self._check_combinations(parser, gpu)
        self.out = _writable_out_dir(args.out or (DEFAULT_OUT if os.path.isdir(DEFAULT_OUT) else "out"), parser)
        self.progress = not args.no_progress and sys.stderr.isatty()
        self._env = None
        self._ceilings = None

    def _check_combinations(self, parser: argparse.ArgumentParser, gpu: bool) -> None:
        """Settings that would make every row fail are refused before anything is measured."""
        args = self.args
        times_models = args.command in ("bench", "throughput")
        odd = [b for b in self.batch.get("cfg", []) if b % 2]
        if times_models and odd:
            parser.error(f"argument --batch: expected an even batch for --mode cfg (forward_with_cfg splits it into "
                         f"a conditional and an unconditional half), got {odd[0]}")
        if self.contenders and times_models:
            from .bench.contenders import contender_list

            try:
                contender_list(self.device.type, self.backends, args.compile, args.compile_fast, args.attn,
                               only=self.contenders, family=self.shape.family)
            except ValueError as e:
                parser.error(f"argument --contender: {e} (--compile adds reference+compile, reference-math+compile "
                             "and, for LightningDiT, reference+compile-blocks)")
        if args.max_batch and not (gpu and "train" in self.modes and times_models):
            parser.error(f"argument --max-batch: expected a CUDA device and --mode train, got device "
                         f"{self.device.type} and modes {','.join(self.modes)}")
        if self.backends and args.command != "overhead":
            self._check_backends_run(parser, timing=args.command != "parity")

    def _check_backends_run(self, parser: argparse.ArgumentParser, timing: bool) -> None:
        """A kernel family asked for by name must run here as itself: no row silently dropped or measured on
        the torch fallback under its name. timing: the Triton interpreter (CPU) does not count as running."""
        from .backends import probe

        for b in self.backends:
            if b in ("torch", "auto"):
                continue
            ok, why = probe(b, self.device.type)
            if ok and timing and b == "triton" and self.device.type == "cpu":
                ok, why = False, "triton on the CPU is the interpreter, a correctness tool, not a speed path"
            if not ok:
                parser.error(f"argument --backend: expected a kernel backend that runs on {self.device.type} here, "
                             f"got {b!r}: {why}")

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
                "objective": ("transport Linear velocity" + (" + cosine loss, logit-normal t"
                                                             if self.shape.family == "LightningDiT" else "")
                              if self.shape.flow else "DDPM noise MSE"),
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

    def write(self, record: dict, what: str, status: str = "complete") -> dict:
        """The finished result under its final name; then the partial checkpoint of this run goes. status:
        "complete", or what went wrong in a run that finished (rows that failed)."""
        from .bench import report

        record["status"] = status
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
    from .bench.report import KERNEL_NOISE, SAMPLING_NOISE, THROUGHPUT_NOISE, md_table, noise_lines, with_noise

    flags = {"throughput": THROUGHPUT_NOISE, "kernels": KERNEL_NOISE, "sampling": SAMPLING_NOISE}.get(key)
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
    record["parity"] = []
    save = run.checkpoint(record, "parity" if run.args.command == "parity" else "")

    def on_row(row):
        record["parity"].append(row)
        save()

    run_parity(
        run.shape, device=run.device, batch=batch, dtypes=tuple(parse_dtype(d) for d in dtypes),
        backends=run.backends, attn=run.args.attn, on_row=on_row,
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
        for row in rows:  # rows of several runs (DiT and LightningDiT stages) merge into one table
            row.setdefault("model", run.model_name)
        record["throughput"] = rows
        save()

    run_throughput(
        run.shape, device=run.device, dtype=run.dtype, batch=run.batch, modes=[m for m in run.modes if m != "sample"],
        backends=run.backends,
        compile_ref=run.args.compile, compile_fast=run.args.compile_fast, attn=run.args.attn,
        warmup=run.warmup, iters=run.iters, gemm_tflops=ceil["gemm_tflops"] if ceil else None,
        on_update=on_update, progress=run.progress, contenders=run.contenders, max_batch=run.args.max_batch,
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
        row.setdefault("model", run.model_name)
        record["sampling"].append(row)
        save()

    run_sampling_bench(
        run.shape, device=run.device, batches=run.args.batch or None,
        num_steps=run.args.sample_steps, rounds=run.args.iters or 3, compile_ref=run.args.compile,
        backend=(run.backends or ["auto"])[0], on_result=on_result,
    )
    _print_table(record, "sampling", SAMPLING_COLS)


def cmd_kernels(run: Run, record: dict) -> None:
    from .bench.kernels import default_ops, default_shapes, run_kernels
    from .bench.report import KERNEL_COLS

    ops = _csv(run.args.op) or default_ops(run.shape)
    shapes = default_shapes(run.device.type, run.shape.tokens, run.shape.hidden_size, run.args.batch or None)
    ceil = run.ceilings
    record["kernels"] = []
    save = run.checkpoint(record, "kernels")

    def on_result(row):
        record["kernels"].append(row)
        save()

    run_kernels(device=run.device, dtype=run.dtypes, shapes=shapes, ops=ops, compile_=run.args.compile,
                with_backward=not run.args.no_backward, copy_gb_per_s=ceil["copy_gb_per_s"] if ceil else None,
                rounds=run.args.rounds, cpu_iters=run.iters, progress=run.progress, on_result=on_result,
                backends=run.backends)
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

    from .bench import stop
    from .bench.contenders import Contender, build_reference, ran_label
    from .bench.profile import profile_model
    from .bench.report import PROFILE_KERNEL_COLS, md_table, stem
    from .testing import randomize_weights_

    torch.manual_seed(0)
    reference = randomize_weights_(build_reference(run.shape, run.device))
    contenders = [Contender("reference", "reference")]
    # named for the kernels that run: an op the asked-for backend cannot run here goes to another one
    contenders += [Contender(ran_label(b, run.device.type, run.shape.hidden_size), "dit_fast", backend=b,
                             attn=run.args.attn) for b in (run.backends or ["auto"])]
    targets = list(dict.fromkeys(_csv(run.args.target)))
    modes = [m for m in run.modes if m not in ("cfg", "sample")] or ["fwd"]
    batch = run.args.batch[0] if run.args.batch else (32 if run.device.type == "cuda" else 2)
    record["profile"] = []
    save = run.checkpoint(record, "profile")
    base = stem(run.out, record["env"], "profile")
    for c in contenders:
        for target in targets:
            for mode in modes:
                tag = re.sub(r"[^A-Za-z0-9+_.]+", "-", c.name).strip("-") + f"-{target}-{mode}"
                trace = None if run.args.no_trace else f"{base}-{tag}.trace.json"
                print(f"profile: {c.name} {target} {mode} ...", file=sys.stderr)
                try:
                    res = profile_model(c, reference, run.shape, device=run.device, dtype=run.dtype, batch=batch,
                                        mode=mode, target=target, warmup=min(run.warmup, 2) or 1,
                                        iters=2 if run.device.type == "cuda" else 1, trace_path=trace,
                                        nvtx=run.args.nvtx)
                except Exception as e:
                    stop.check()
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
SECTIONS = ("parity", "throughput", "sampling", "kernels", "overhead", "profile")


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
        merged = {k: v for k, v in records[0][1].items() if k not in SECTIONS}
        merged["kind"] = "bench"
        merged["notes"] = []
        incomplete = []
        for path, rec in records:
            for key in SECTIONS:  # rows of every file, in the order given (two throughput runs: both)
                if rec.get(key):
                    merged[key] = merged.get(key, []) + rec[key]
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


def error_rows(record: dict) -> list[str]:
    """'<section>: <contender/op>: <error>' for every row of the record that failed."""
    out = []
    for key in ("parity", "throughput", "sampling", "kernels", "overhead", "profile"):
        for row in record.get(key) or []:
            if isinstance(row, dict) and row.get("error"):
                who = row.get("contender") or row.get("backend") or row.get("op") or "?"
                out.append(f"{key}: {who}: {str(row['error'])[:200]}")
    return out


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
    from .bench import stop

    # SIGINT and SIGTERM raise stop.Stopped (a BaseException: no per-row `except Exception` takes it)
    previous = stop.install()
    ok = True
    record = None
    try:
        record = run.record(kind, ceilings=ceilings and args.command != "overhead")
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
    except (stop.Stopped, KeyboardInterrupt) as e:
        stop.handling()  # a second signal from here on is recorded, not raised: the partial result gets written
        signum = e.signum if isinstance(e, stop.Stopped) else stop.SIGNALS[0]
        return _stopped(run, record, what, args.command, stop.received() or signum)
    finally:
        if argv is None and stop.received() is not None:
            # the process's entry point (the dit-fast script, python -m dit_fast) exits right after a stop: a second
            # Ctrl-C during the interpreter's exit must not turn exit code 130 into death by SIGINT
            stop.ignore_until_exit()
        else:
            stop.restore(previous)
    signum = stop.received()
    if signum is not None:  # a stop request that something on the way caught and did not pass on
        return _stopped(run, record, what, args.command, signum)
    failed = error_rows(record)
    if failed:
        record.setdefault("notes", []).append(f"ERRORS: {len(failed)} rows failed (their 'error' column).")
    run.write(record, what, status=f"finished with {len(failed)} failed rows" if failed else "complete")
    if failed:
        print(f"{args.command}: {len(failed)} rows failed:\n  " + "\n  ".join(failed), file=sys.stderr)
    return 0 if ok and not failed else 1


def _stopped(run: Run, record: dict | None, what: str, command: str, signum: int) -> int:
    """What was measured goes to <name>-partial (never the complete name); exit 128 + the signal."""
    from .bench import stop

    why = stop.describe(signum)
    if record is None:
        print(f"\n{command}: {why} before anything was measured", file=sys.stderr)
    else:
        print(f"\n{command}: {why}; writing what was measured", file=sys.stderr)
        run.write_partial(record, what, why)
    return stop.exit_code(signum)


if __name__ == "__main__":
    sys.exit(main())
