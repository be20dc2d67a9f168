"""The environment record stored with every result, and the device's measured ceilings.

No hostname or user name is recorded: results files are committed.
"""
from __future__ import annotations

import datetime
import importlib
import os
import platform
import re
import subprocess

import torch

from .timing import time_fn

_REPO_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state(repo_dir: str = _REPO_DIR) -> tuple[str, bool | None]:
    """(commit, dirty) of the checkout the package runs from; ("unknown", None) outside a git repo.

    DIT_FAST_GIT_COMMIT names the commit where the tree was copied without its .git (a device machine).
    """
    if os.environ.get("DIT_FAST_GIT_COMMIT"):
        return os.environ["DIT_FAST_GIT_COMMIT"], None
    def git(*args):
        return subprocess.run(
            ["git", "-C", repo_dir, *args], capture_output=True, text=True, timeout=20, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
    except Exception:
        return "unknown", None
    try:
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except Exception:
        dirty = None
    return commit, dirty


def device_slug(device: torch.device) -> str:
    """Short file-name form of the device: 'h100-80gb-hbm3', 'cpu'."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cuda"


def environment(device: torch.device) -> dict:
    commit, dirty = git_state()
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "flash_attn": _version("flash_attn"),
        "dit_fast": _version("dit_fast"),
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=props.name,
            sm_count=props.multi_processor_count,
            compute_capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
        )
    else:
        env.update(device_name=_cpu_name(), sm_count=None, compute_capability=None)
    try:
        from ..backends import probe

        env["ext_built"] = probe("ext", device.type)[0]
    except Exception:
        env["ext_built"] = False
    return env


def _copy_gb_per_s(nbytes: int, device) -> float:
    src = torch.randn(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    t_copy = time_fn(lambda: dst.copy_(src), device, warmup=3, iters=20)["median_ms"]
    return 2 * nbytes / (t_copy * 1e-3) / 1e9  # bytes read + bytes written


def measure_ceilings(device: torch.device, copy_mib: int = 1024, gemm_n: int = 8192) -> dict:
    """Device-to-device copy bandwidth (bytes read + written / time) and bf16 GEMM rate, measured now.

    Sizes shrink on the CPU, where these are only indicative.
    """
    if device.type != "cuda":
        copy_mib, gemm_n = min(copy_mib, 64), min(gemm_n, 1024)
    dtype = torch.bfloat16
    copy_gbs = _copy_gb_per_s(copy_mib * 2**20, device)
    a = torch.randn(gemm_n, gemm_n, device=device, dtype=dtype)
    b = torch.randn(gemm_n, gemm_n, device=device, dtype=dtype)
    t_gemm = time_fn(lambda: a @ b, device, warmup=3, iters=20)["median_ms"]
    gemm_tflops = 2 * gemm_n**3 / (t_gemm * 1e-3) / 1e12
    return {
        "copy_bytes": 2 * copy_mib * 2**20,
        "copy_gb_per_s": round(copy_gbs, 1),
        "gemm_n": gemm_n,
        "gemm_dtype": "bf16",
        "gemm_tflops": round(gemm_tflops, 2),
    }
