"""Which kernel family runs each fused op: the capability table, availability probes, "auto" and fallbacks.

Backends: "triton" (kernels/, CUDA tensors; CPU tensors only under TRITON_INTERPRET=1), "ext"
(the C++/CUDA extension dit_fast._C: CUDA kernels for CUDA tensors, CPU kernels for CPU
tensors), "torch" (plain PyTorch, always available). What each can run (ops, devices, float64, D) is
declared once in CAPABILITIES; whether it is usable on this machine is its module's `available()`.
A backend that cannot run a call falls back to the next candidate and, when it was named, says why
once per case (docs/DESIGN.md section 5).
"""
from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "triton", "ext", "torch")
KERNEL_BACKENDS = ("triton", "ext", "torch")
ENV_VAR = "DIT_FAST_BACKEND"

# The fused ops, listed once: dit_fast.ops exports them, every backend module defines the ones it runs.
ADALN_OPS = ("adaln_modulate", "gated_residual", "gated_residual_adaln")
EMBED_OPS = ("patch_embed", "final_layer", "linear_gelu_tanh")
OPS = ADALN_OPS + EMBED_OPS
# LightningDiT's MLP activation and attention-input ops: dispatched like OPS, listed apart until the model uses them
# (OPS feeds the DiT benchmarks' labels and per-op tables). ALL_OPS: every op with a capability row.
LIGHTNING_OPS = ("swiglu", "qk_norm_rope")
ALL_OPS = OPS + LIGHTNING_OPS


@dataclass(frozen=True)
class Capability:
    """What a kernel family runs: these ops, on tensors of these device types. Every backend takes
    float16, bfloat16 and float32 inputs (mixed freely, except patch_embed: outside autocast its x, weight and
    bias share one dtype, as nn.Conv2d requires, on every backend); `float64` says whether float64 inputs run
    (in float64), `max_d` bounds the feature dim D (x.shape[-1]) where the kernels have a limit.
    `fused_bias`: the gated ops add their optional `bias` (of the GEMM that made y) inside the kernel and
    sum its gradient in their backward pass; without it the backend adds the bias in a separate pass,
    so the model passes the bias to the gated op only where this is True (models.py).
    `norm_modes`: the adaLN-family ops run LightningDiT's modes too: norm="rms", a norm gain (weight), and no
    shift (scale-only adaLN); without it only LayerNorm without affine, with a shift."""

    backend: str
    device_types: tuple[str, ...]
    ops: tuple[str, ...]
    float64: bool
    max_d: int | None = None
    fused_bias: bool = False
    norm_modes: bool = False

    def refuses(self, float64: bool, d: int | None, norm_modes: bool = False) -> str:
        """Why this row cannot run a call ("" if it can)."""
        if norm_modes and not self.norm_modes:
            return "no RMSNorm / norm-gain / scale-only adaLN kernels yet"
        if float64 and not self.float64:
            return "no float64 kernels"
        if self.max_d is not None and d is not None and d > self.max_d:
            return f"its kernels take D <= {self.max_d}, got D={d}"
        return ""


# The capability table: the resolver below, `python -m dit_fast.info` and the tests read it; a new
# backend adds its rows here (docs/DESIGN.md, "Adding a backend"). Whether a family is usable at all on
# this machine (installed, built, a GPU present) is its module's `available(device_type)`.
CAPABILITIES = (
    Capability("triton", ("cuda", "cpu"), ADALN_OPS, float64=True, fused_bias=True, norm_modes=True),
    # float32 accumulation only; final_layer runs every norm mode in its own fused kernels (kernels/final_layer.py)
    Capability("triton", ("cuda", "cpu"), EMBED_OPS, float64=False, norm_modes=True),
    Capability("triton", ("cuda", "cpu"), LIGHTNING_OPS, float64=False),  # float32 math
    Capability("ext", ("cpu",), ADALN_OPS, float64=True, norm_modes=True),
    Capability("ext", ("cuda",), ADALN_OPS, float64=False, max_d=4096, norm_modes=True),  # kMaxD of adaln_cuda.cu
    Capability("torch", ("cuda", "cpu"), ALL_OPS, float64=True, norm_modes=True),
)

@dataclass(frozen=True)
class AttentionCapability:
    """What one attention kernel runs (dit_fast/attention.py reads these rows). None: no limit."""

    device_types: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None  # None: any floating-point dtype
    cuda_majors: tuple[int, ...] | None = None  # compute capability majors it is built for
    cuda_arch: str = ""  # their name, for messages
    min_capability: tuple[int, int] | None = None
    max_head_dim: int | None = None
    head_dim_multiple: int = 1  # required
    auto_head_dim_multiple: int = 1  # "auto" also avoids head dims the kernel pads (a copy per call)
    auto_head_dims: tuple[int, ...] | None = None  # "auto" bets only on these


_HALF = (torch.float16, torch.bfloat16)
ATTENTION_CAPABILITIES = {
    "flash_attn_3": AttentionCapability(("cuda",), _HALF, cuda_majors=(9,), cuda_arch="Hopper", max_head_dim=256,
                                        head_dim_multiple=8),
    "flash_attn_4": AttentionCapability(("cuda",), _HALF, cuda_majors=(9, 10, 11), max_head_dim=256,
                                        head_dim_multiple=8, auto_head_dims=(64, 96, 128)),  # documented dims
    "flash_attn": AttentionCapability(("cuda",), _HALF, min_capability=(8, 0), max_head_dim=256,
                                      auto_head_dim_multiple=8),
    "sdpa": AttentionCapability(),
    "math": AttentionCapability(),
}


# "auto" on CUDA: per op and compute capability, the family that committed benchmark results
# (benchmarks/results/) show to be faster. Ops or GPUs not listed use AUTO_CUDA_DEFAULT.
AUTO_CUDA_TABLE: dict[tuple[int, int], dict[str, str]] = {}
AUTO_CUDA_DEFAULT = ("triton", "ext", "torch")
# On the CPU the Triton interpreter is a correctness tool, never a fast path.
AUTO_CPU = ("ext", "torch")


def capability(backend: str, op: str, device_type: str) -> Capability | None:
    """The table row saying that `backend` runs `op` on `device_type`, or None."""
    if backend == "torch":
        return CAPABILITIES[-1]  # plain PyTorch runs every op on every device
    for row in CAPABILITIES:
        if row.backend == backend and op in row.ops and device_type in row.device_types:
            return row
    return None


_MODULES = {
    "triton": "dit_fast.ops.triton_backend",
    "ext": "dit_fast.ops.ext_backend",
    "torch": "dit_fast.ops.torch_backend",
}


class BackendFallbackWarning(UserWarning):
    """A requested kernel backend could not run an op; another one runs it instead."""


_warned: set[tuple] = set()
_resolved: dict[tuple, str] = {}
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


def implements(backend: str, op: str, device_type: str | None = None) -> bool:
    """Whether the capability table lists `op` for `backend` (on `device_type`, or on any device)."""
    types = (device_type,) if device_type else ("cuda", "cpu")
    return any(capability(backend, op, t) is not None for t in types)


def _candidates(backend: str, op: str, device_type: str, env: str) -> tuple[str, ...]:
    if backend == "auto":
        backend = env or "auto"
        check_backend_name(backend, ENV_VAR)
    if backend != "auto":
        return (backend, "torch") if backend != "torch" else ("torch",)
    if device_type == "cuda":
        cap = torch.cuda.get_device_capability()
        first = AUTO_CUDA_TABLE.get(cap, {}).get(op)
        return ((first,) if first else ()) + AUTO_CUDA_DEFAULT
    return AUTO_CPU


def resolve(backend: str, op: str, device_type: str, float64: bool = False, d: int | None = None,
            norm_modes: bool = False) -> str:
    """The backend that runs `op` for tensors on `device_type` when `backend` is asked for; `float64`:
    some input is float64; `d`: the feature dim D, for backends whose kernels bound it; `norm_modes`: an
    adaLN-family call with norm="rms", a norm gain or no shift (Capability.norm_modes).

    Cached per call signature and per value of DIT_FAST_BACKEND, so changing the variable takes effect
    at the next eager call. A torch.compile'd function keeps the backends it was traced with (its graph
    holds the chosen ops); changing the variable does not recompile it.
    """
    env = os.environ.get(ENV_VAR, "")
    key = (backend, op, device_type, float64, d, env, norm_modes)
    name = _resolved.get(key)
    if name is None:
        name = _resolve(backend, op, device_type, float64, d, env, norm_modes)
        module_for(name)  # import now: inside a torch.compile trace module_for may only read its cache
        _resolved[key] = name
    return name


# torch.compile treats the answer as a constant (no graph break, no guard on the caches). This is what
# torch.compiler.assume_constant_result does; setting the mark directly keeps `import torch._dynamo`
# (seconds, and it imports triton) out of `import dit_fast`.
resolve._dynamo_marked_constant = True


def fuses_bias(name: str, op: str, device_type: str) -> bool:
    """Whether backend `name` (a resolved one) adds a gated op's bias inside its kernel (Capability.fused_bias)."""
    row = capability(name, op, device_type)
    return bool(row is not None and row.fused_bias)


def why_not(backend: str, op: str, device_type: str, float64: bool = False, d: int | None = None,
            norm_modes: bool = False) -> str:
    """Why `backend` cannot run this call ("" if it can): the machine (probe), then the table."""
    ok, why = probe(backend, device_type)
    if not ok:
        return why
    row = capability(backend, op, device_type)
    if row is None:
        return f"it has no {op} kernel for {device_type} tensors"
    return row.refuses(float64, d, norm_modes)


def _resolve(backend: str, op: str, device_type: str, float64: bool, d: int | None, env: str,
             norm_modes: bool = False) -> str:
    explicit = backend != "auto"
    reasons = []
    for cand in _candidates(backend, op, device_type, env):
        why = why_not(cand, op, device_type, float64, d, norm_modes)
        if not why:
            if reasons and (explicit or env):
                warn_once(
                    (backend, op, device_type, float64, d, env, norm_modes),
                    f"dit_fast: backend {backend if explicit else env!r} cannot run {op} on {device_type}"
                    f"{' (float64)' if float64 else ''} ({'; '.join(reasons)}); using {cand!r}",
                )
            return cand
        reasons.append(f"{cand}: {why}")
    raise AssertionError("the torch backend runs everything")  # pragma: no cover


def report(device_type: str) -> dict[str, dict[str, str]]:
    """For `python -m dit_fast.info`: per op, what "auto" picks (float16/bfloat16/float32 inputs) and, for
    each family, "yes" with the table's limits or "no (why)"."""
    out = {}
    for op in ALL_OPS:
        row = {"auto": _resolve("auto", op, device_type, False, None, "")}
        for b in KERNEL_BACKENDS:
            why = why_not(b, op, device_type)
            cap = capability(b, op, device_type)
            if why:
                row[b] = f"no ({why})"
            else:
                limits = ["float64" if cap.float64 else "no float64"]
                if cap.max_d is not None:
                    limits.append(f"D <= {cap.max_d}")
                row[b] = f"yes ({', '.join(limits)})"
        out[op] = row
    return out
