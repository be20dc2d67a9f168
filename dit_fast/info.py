"""`python -m dit_fast.info` / `dit-fast info`: versions, device, extension, and which kernels run where."""
from __future__ import annotations

import importlib
import os
import sys

import torch


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed (no __version__)")
    except Exception as e:
        return f"not available ({type(e).__name__})"


def _attention_lines(device_type: str, dtype: torch.dtype, head_dim: int) -> list[str]:
    from . import attention

    report = getattr(attention, "attention_report", None)
    if report is None:
        return ["  attention (auto): sdpa (torch.nn.functional.scaled_dot_product_attention; 'math' on request)"]
    try:
        rows = report(device_type, dtype, head_dim)
    except Exception as e:
        return [f"  attention report failed: {type(e).__name__}: {e}"]
    return [f"  {name:<14} {why}" for name, why in rows.items()]


def _fc1_gemm() -> str:
    """Which GEMM runs fc1 on the Triton backend (dit_fast/ops/triton_embed.py), as the environment asks."""
    try:
        from .ops.triton_embed import fc1_gemm_choice
    except Exception as e:  # triton missing or broken: the Triton backend does not run at all
        return f"n/a (the Triton backend does not import: {type(e).__name__})"
    try:
        choice = fc1_gemm_choice()
    except ValueError as e:
        return f"invalid: {e}"
    if choice == "triton":
        return "triton (one GEMM with the bias + GELU epilogue; opt-in)"
    return "cublas (default: cuBLAS GEMM, then bias + GELU in one Triton pass; DIT_FAST_FC1_GEMM=triton opts in)"


def _gelu_epilogue_verdicts() -> dict:
    """{dtype: [taken, why]} of fc1's cuBLASLt GELU epilogue on cuda:0 (dit_fast/ops/gelu_epilogue.py)."""
    import warnings

    from .ops import gelu_epilogue

    out = {}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # printed below, as a line of the report
            try:
                ok, why = gelu_epilogue.verdict(torch.device("cuda", 0), dtype)
            except Exception as e:  # noqa: BLE001 - a report line, never a crash
                ok, why = False, f"check failed: {type(e).__name__}: {e}"
        if not gelu_epilogue.enabled():
            ok, why = False, "off (DIT_FAST_GELU_EPILOGUE=0); " + why
        out[str(dtype).replace("torch.", "")] = [ok, why]
    return out


def _backend_env() -> str | None:
    from .backends import ENV_VAR

    return os.environ.get(ENV_VAR) or None


def _backend_env_error() -> str:
    """"" when DIT_FAST_BACKEND is unset or names a backend, else the error a forward would raise."""
    from .backends import ENV_VAR, check_backend_name

    value = os.environ.get(ENV_VAR, "")
    if not value:
        return ""
    try:
        check_backend_name(value, ENV_VAR)
    except ValueError as e:
        return f"{e} (unset it or pick one)"
    return ""


def collect() -> dict:
    """Everything info prints, as a dict (also stored in benchmark results)."""
    from .backends import CAPABILITIES, probe, report

    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "triton": _version("triton"),
        "flash_attn": _version("flash_attn"),
        "dit_fast": _version("dit_fast"),
        "cuda_available": torch.cuda.is_available(),
        "backend_env": _backend_env(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "sm_count": p.multi_processor_count,
                       "compute_capability": f"{p.major}.{p.minor}",
                       "memory_gib": round(p.total_memory / 2**30, 1)}
    ext_cpu = probe("ext", "cpu")
    info["ext"] = {"cpu": list(ext_cpu)}
    if torch.cuda.is_available():
        info["ext"]["cuda"] = list(probe("ext", "cuda"))
        info["gelu_epilogue"] = _gelu_epilogue_verdicts()
    info["fc1_gemm"] = _fc1_gemm()
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    info["ops"] = {d: report(d) for d in device_types}
    info["capabilities"] = [
        {"backend": c.backend, "device_types": list(c.device_types), "ops": list(c.ops), "float64": c.float64,
         "max_d": c.max_d, "fused_bias": c.fused_bias}
        for c in CAPABILITIES
    ]
    return info


def main(argv=None) -> int:
    import argparse

    from .backends import KERNEL_BACKENDS

    parser = argparse.ArgumentParser(prog="dit-fast info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the record as JSON")
    parser.add_argument("--head-dim", type=int, default=72, help="attention head dim to report for (DiT-XL: 72)")
    args = parser.parse_args(argv)
    env_error = _backend_env_error()
    if env_error:  # every forward would refuse it: say so instead of reporting a setup that cannot run
        print(f"dit-fast info: {env_error}", file=sys.stderr)
        return 2
    info = collect()
    if args.json:
        import json

        print(json.dumps(info, indent=1))
        return 0
    print(f"dit_fast {info['dit_fast']}  python {info['python']}")
    print(f"torch {info['torch']}  CUDA runtime {info['cuda_runtime']}  triton {info['triton']}  "
          f"flash-attn {info['flash_attn']}")
    if "gpu" in info:
        g = info["gpu"]
        print(f"GPU: {g['name']}, {g['sm_count']} SMs, compute capability {g['compute_capability']}, "
              f"{g['memory_gib']} GiB")
    else:
        print("GPU: none (torch.cuda.is_available() is False)")
    ok, why = info["ext"]["cpu"]
    print(f"dit_fast._C (CPU kernels): {'built' if ok else 'not usable'} - {why}")
    if "cuda" in info["ext"]:
        ok, why = info["ext"]["cuda"]
        print(f"dit_fast._C (CUDA kernels): {'built' if ok else 'not usable'} - {why}")
    for dtype, (ok, why) in info.get("gelu_epilogue", {}).items():
        print(f"fc1 GELU in cuBLASLt's epilogue (inference, {dtype}): {'taken' if ok else 'not used'} - {why}")
    print(f"fc1 GEMM on the Triton backend (DIT_FAST_FC1_GEMM): {info['fc1_gemm']}")
    if info["backend_env"]:
        print(f"DIT_FAST_BACKEND={info['backend_env']}: backend 'auto' runs this family (where it can)")
    print("\nCapability table (dit_fast/backends.py; every backend takes float16/bfloat16/float32):")
    for c in info["capabilities"]:
        limits = ("float64" if c["float64"] else "no float64") + (f", D <= {c['max_d']}" if c["max_d"] else "")
        limits += ", fused bias" if c["fused_bias"] else ""
        print(f"  {c['backend']:<7} {'/'.join(c['device_types']):<9} {limits:<22} {', '.join(c['ops'])}")
    for device_type, ops in info["ops"].items():
        print(f"\nOps on {device_type} (backend 'auto' picks the first usable family in its order):")
        for op, row in ops.items():
            print(f"  {op:<22} -> {row['auto']}")
            for b in KERNEL_BACKENDS:
                if b != row["auto"]:
                    print(f"      {b:<7} {row[b]}")
        dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
        print(f"Attention on {device_type} ({str(dtype).replace('torch.', '')}, head_dim {args.head_dim}):")
        for line in _attention_lines(device_type, dtype, args.head_dim):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
