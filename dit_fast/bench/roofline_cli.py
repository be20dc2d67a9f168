"""`dit-fast roofline`: the predicted per-op budget of dit_fast/bench/roofline.py, printed and optionally saved.

    dit-fast roofline --model DiT-XL/2 --batch 256 --device h100 [--image-size 256] [--mode forward|train]
    dit-fast roofline --measure --out DIR       # on a GPU: ceilings measured now (dit_fast.bench.env)
Files (with --out): <date>-<device>-predicted-roofline.{json,md}.
"""
from __future__ import annotations

import argparse
import sys

from .roofline import DEVICE_SPECS, MODES, PRECISIONS


def add_parser(sub, positive, positive_float, model_name) -> None:
    r = sub.add_parser("roofline",
                       help="predicted per-op bytes, FLOPs and times from a device's ceilings (no GPU needed)")
    r.add_argument("--model", type=model_name, default="DiT-XL/2", help="DiT config name")
    r.add_argument("--batch", type=positive, default=256, help="images per step")
    r.add_argument("--image-size", type=int, choices=(256, 512), default=256)
    r.add_argument("--device", choices=tuple(DEVICE_SPECS), default="h100",
                   help="spec ceilings of this GPU (with --measure: only names the file when the GPU is not known)")
    r.add_argument("--mode", choices=MODES + ("both",), default="both", help="forward, train or both")
    r.add_argument("--precision", choices=PRECISIONS, default="autocast",
                   help="autocast: fp32 weights and residual stream, bf16 GEMMs (the benchmarked policy); "
                        "bf16: all bf16")
    r.add_argument("--eager-attention", choices=("math", "sdpa"), default="sdpa",
                   help="attention of the eager reference: sdpa (the reference as built, as the official DiT "
                        "runs with a current timm) or math (reference-math: explicit softmax(q k^T) v)")
    r.add_argument("--copy-gbps", type=positive_float, default=None,
                   help="override the copy bandwidth (GB/s, read+write)")
    r.add_argument("--gemm-tflops", type=positive_float, default=None, help="override the bf16 GEMM rate (TFLOP/s)")
    r.add_argument("--measure", action="store_true", help="measure the ceilings on this machine's GPU now")
    r.add_argument("--out", default=None, help="also write JSON + Markdown here")


def run(args, parser: argparse.ArgumentParser, writable_out) -> int:
    import torch

    from . import report
    from .env import device_slug, environment, measure_ceilings
    from .flops import shape_for
    from .roofline import markdown_section, predict

    spec = DEVICE_SPECS[args.device]
    out = writable_out(args.out) if args.out else None  # checked before anything is computed or measured
    if args.measure:
        if not torch.cuda.is_available():
            parser.error("argument --measure: expected a CUDA GPU to measure the ceilings on, found none")
        dev = torch.device("cuda")
        measured = measure_ceilings(dev)
        copy, gemm = measured["copy_gb_per_s"], measured["gemm_tflops"]
        source = f"measured now on {torch.cuda.get_device_name(dev)}"
        slug = device_slug(dev)
        env = environment(dev)
    else:
        copy, gemm = spec["copy_gb_per_s"], spec["gemm_tflops"]
        source = (f"{spec['name']}: achievable copy {copy} GB/s of {spec['hbm_gb_per_s']} GB/s HBM, achievable bf16 "
                  f"dense GEMM {gemm} of {spec['bf16_dense_peak_tflops']} TFLOP/s peak")
        slug = args.device
        env = environment(torch.device("cpu"))
        env.update(device_name=f"{spec['name']} (predicted, not measured)", device_type="predicted")
        measured = None
    if args.copy_gbps or args.gemm_tflops:
        copy, gemm = args.copy_gbps or copy, args.gemm_tflops or gemm
        source += f"; overridden: copy {copy} GB/s, GEMM {gemm} TFLOP/s"
    shape = shape_for(args.model, args.image_size)
    modes = list(MODES) if args.mode == "both" else [args.mode]
    rows, summary = [], []
    for mode in modes:
        r, s = predict(shape, args.batch, mode, copy, gemm, args.precision, args.eager_attention)
        rows += r
        summary += s
    env["device_slug"] = f"{slug}-predicted"
    record = {
        "kind": "roofline",
        "status": "complete",
        "predicted": True,
        "env": env,
        "ceilings": {"copy_gb_per_s": copy, "gemm_tflops": gemm, "gemm_n": None, "source": source,
                     "measured": measured},
        "config": {"model": args.model, "image_size": args.image_size, **shape.as_dict(), "batch": args.batch,
                   "precision": args.precision, "eager_attention": args.eager_attention, "modes": ",".join(modes)},
        "roofline": rows,
        "roofline_summary": summary,
        "notes": [
            "PREDICTED from ceilings, not measured: see dit_fast/bench/roofline.py for the byte model of each op "
            "and plan, and what is not modelled (launch gaps, wave quantization, GEMM shape efficiency).",
            "MFU = the paper's FLOPs of the step (x3 for training) / predicted time / the GEMM rate used.",
        ],
    }
    print("\n".join(markdown_section(record)))
    if out:
        for path in report.write_all(out, record, "roofline", png=False).values():
            print(f"wrote {path}", file=sys.stderr)
    return 0
