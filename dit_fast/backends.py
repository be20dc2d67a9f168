"""Which kernel family runs each fused op: availability probes, the "auto" table and fallbacks.

Backends: "triton" (kernels/, CUDA tensors; CPU tensors only under TRITON_INTERPRET=1), "ext"
(the C++/CUDA extension dit_fast._C: CUDA kernels for CUDA tensors, CPU kernels for CPU
tensors), "torch" (plain PyTorch, always available). A backend that cannot run an op falls back
to the next candidate and says why, once per (backend, op, device type).
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "ext", "torch")
OPS = (
    "adaln_modulate",
    "gated_residual",
    "gated_residual_adaln",
    "patch_embed",
    "final_layer",
    "linear_gelu_tanh",
)
ENV_VAR = "DIT_FAST_BACKEND"

# "auto" on CUDA: per op and compute capability, the family that committed benchmark results
# (benchmarks/results/) show to be faster. Ops or GPUs not listed use AUTO_CUDA_DEFAULT.
AUTO_CUDA_TABLE: dict[tuple[int, int], dict[str, str]] = {}
AUTO_CUDA_DEFAULT = ("triton", "ext", "torch")
# On the CPU the Triton interpreter is a correctness tool, never a fast path.
AUTO_CPU = ("ext", "torch")

_MODULES = {
    "triton": "dit_fast.ops.triton_backend",
    "ext": "dit_fast.ops.ext_backend",
    "torch": "dit_fast.ops.torch_backend",
}


class BackendFallbackWarning(UserWarning):
    """A requested kernel backend could not run an op; another one runs it instead."""


_warned: set[tuple] = set()
_resolved: dict[tuple[str, str, str], str] = {}
_probe_cache: dict[tuple[str, str], tuple[bool, str]] = {}


def warn_once(key, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, BackendFallbackWarning, stacklevel=3)


def check_backend_name(backend: str, argname: str = "backend") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{argname} must be one of {BACKENDS}, got {backend!r}")
    return backend


def probe(backend: str, device_type: str) -> tuple[bool, str]:
    """(usable, reason) for a kernel family on a device type ("cuda" or "cpu")."""
    key = (backend, device_type)
    if key not in _probe_cache:
        _probe_cache[key] = _probe(backend, device_type)
    return _probe_cache[key]


def _probe(backend: str, device_type: str) -> tuple[bool, str]:
    if backend == "torch":
        return True, "plain PyTorch"
    try:
        module = module_for(backend)
    except Exception as e:  # an import error of an optional dependency must not break the package
        return False, f"importing {_MODULES[backend]} failed: {type(e).__name__}: {e}"
    return module.available(device_type)


_modules: dict[str, object] = {}


def module_for(backend: str):
    # Cached in a dict: torch.compile traces a dict lookup, not importlib.import_module.
    module = _modules.get(backend)
    if module is None:
        module = _modules[backend] = importlib.import_module(_MODULES[backend])
    return module


def implements(backend: str, op: str) -> bool:
    return backend == "torch" or hasattr(module_for(backend), op)


def _candidates(backend: str, op: str, device_type: str) -> tuple[str, ...]:
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
        check_backend_name(backend, ENV_VAR)
    if backend != "auto":
        return (backend, "torch") if backend != "torch" else ("torch",)
    if device_type == "cuda":
        cap = torch.cuda.get_device_capability()
        first = AUTO_CUDA_TABLE.get(cap, {}).get(op)
        return ((first,) if first else ()) + AUTO_CUDA_DEFAULT
    return AUTO_CPU


def resolve(backend: str, op: str, device_type: str) -> str:
    """The backend that runs `op` for tensors on `device_type` when `backend` is asked for."""
    key = (backend, op, device_type)
    name = _resolved.get(key)
    if name is None:
        name = _resolve(backend, op, device_type)
        module_for(name)  # import now: inside a torch.compile trace module_for may only read its cache
        _resolved[key] = name
    return name


# torch.compile treats the answer as a constant (no graph break, no guard on the caches). This is what
# torch.compiler.assume_constant_result does; setting the mark directly keeps `import torch._dynamo`
# (seconds, and it imports triton) out of `import dit_fast`.
resolve._dynamo_marked_constant = True


def _resolve(backend: str, op: str, device_type: str) -> str:
    explicit = backend != "auto"
    reasons = []
    for cand in _candidates(backend, op, device_type):
        ok, why = probe(cand, device_type)
        if ok and not implements(cand, op):
            ok, why = False, f"it has no {op} kernel yet"
        if ok:
            if reasons and (explicit or os.environ.get(ENV_VAR)):
                warn_once(
                    (backend, op, device_type),
                    f"dit_fast: backend {backend!r} cannot run {op} on {device_type} "
                    f"({'; '.join(reasons)}); using {cand!r}",
                )
            return cand
        reasons.append(f"{cand}: {why}")
    raise AssertionError("the torch backend is always available")  # pragma: no cover


def report(device_type: str) -> dict[str, dict[str, str]]:
    """For `python -m dit_fast.info`: per op, what "auto" picks and why each family is or isn't usable."""
    out = {}
    for op in OPS:
        row = {"auto": _resolve("auto", op, device_type)}
        for b in ("triton", "ext", "torch"):
            ok, why = probe(b, device_type)
            if ok and not implements(b, op):
                ok, why = False, f"no {op} kernel"
            row[b] = "yes" if ok else f"no ({why})"
        out[op] = row
    return out
