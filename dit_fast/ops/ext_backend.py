"""The "ext" backend: the C++/CUDA kernels of dit_fast._C (csrc/) as torch ops with autograd.

The extension registers torch.ops.dit_fast_ext.* (schemas, CPU kernels, CUDA kernels when built
with CUDA). This module adds what torch.compile and autograd need on top: fake kernels and
register_autograd on the forward ops. Importing it never fails: without a usable extension,
`available()` says why and the dispatcher falls back.
"""
from __future__ import annotations

import importlib
import importlib.util
import re

import torch

from . import torch_backend

_REBUILD = "rebuild with pip install --no-build-isolation -e ."


def _built_for_torch_version() -> str:
    """The torch version compiled into the extension file, read without loading it."""
    try:
        spec = importlib.util.find_spec("dit_fast._C")
        if spec is None or not spec.origin:
            return "unknown"
        with open(spec.origin, "rb") as f:
            m = re.search(rb"dit_fast_torch_version=([0-9.]+);", f.read())
        return m.group(1).decode() if m else "unknown"
    except (OSError, ImportError):
        return "unknown"


def _load(import_module=importlib.import_module):
    """(module, None) or (None, why it cannot be used)."""
    installed = torch.__version__.split("+")[0]
    try:
        _C = import_module("dit_fast._C")
    except ModuleNotFoundError:
        return None, f"dit_fast._C is not built (DIT_FAST_SKIP_EXT=1 or a failed build); {_REBUILD}"
    except ImportError as e:
        if "undefined symbol" in str(e):
            return None, (
                f"dit_fast._C was built for torch {_built_for_torch_version()} but torch {torch.__version__} "
                f"is installed; {_REBUILD} ({e})"
            )
        return None, f"importing dit_fast._C failed: {e}"
    built = getattr(_C, "torch_version", "unknown")
    if built != installed:
        return None, f"dit_fast._C was built for torch {built} but torch {torch.__version__} is installed; {_REBUILD}"
    return _C, None


_C, _LOAD_ERROR = _load()


def available(device_type: str) -> tuple[bool, str]:
    """(usable, reason) for tensors on `device_type`."""
    if _C is None:
        return False, _LOAD_ERROR
    if device_type == "cpu":
        return True, "C++ CPU kernels (dit_fast._C)"
    if device_type == "cuda":
        if not _C.with_cuda:
            return False, (
                "dit_fast._C was built without CUDA (CPU-only torch or no nvcc at build time); "
                f"on a CUDA machine, {_REBUILD}"
            )
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        return True, "CUDA kernels (dit_fast._C)"
    return False, f"dit_fast._C has no kernels for {device_type} tensors"


# ----------------------------------------------------------------------------------------------
# Fake kernels: output metadata of each op, as the C++ code allocates them (contiguous; math
# and the mean/rstd/dmod dtypes in float64 if any input is float64, else float32)
# ----------------------------------------------------------------------------------------------


def _ct(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _empty(shape, dtype, like):
    return torch.empty(shape, dtype=dtype, device=like.device)


def _fake_modulate_fwd(x, shift, scale, eps, out_dtype):
    ct = _ct(x, shift, scale)
    B, L, _ = x.shape
    return _empty(x.shape, out_dtype or x.dtype, x), _empty((B, L), ct, x), _empty((B, L), ct, x)


def _fake_modulate_bwd(dh, x, mean, rstd, scale):
    ct = _ct(dh, x, mean, scale)
    B, _, D = x.shape
    return _empty(x.shape, x.dtype, x), _empty((B, D), ct, x), _empty((B, D), ct, x)


def _fake_gated_fwd(x, y, gate):
    return _empty(x.shape, x.dtype, x)


def _fake_gated_bwd(dout, y, gate):
    B, _, D = y.shape
    return _empty(y.shape, y.dtype, y), _empty((B, D), _ct(dout, y, gate), y)


def _fake_fused_fwd(x, y, gate, shift, scale, eps, out_dtype):
    ct = _ct(x, y, gate, shift, scale)
    B, L, _ = x.shape
    return (
        _empty(x.shape, x.dtype, x),
        _empty(x.shape, out_dtype or x.dtype, x),
        _empty((B, L), ct, x),
        _empty((B, L), ct, x),
    )


def _fake_fused_bwd(dh, dx_out, x_out, y, gate, mean, rstd, scale):
    ct = _ct(dh, dx_out, x_out, y, gate, mean, scale)
    B, _, D = x_out.shape
    mod = [_empty((B, D), ct, x_out) for _ in range(3)]
    return (_empty(x_out.shape, x_out.dtype, x_out), _empty(y.shape, y.dtype, y), *mod)


# ----------------------------------------------------------------------------------------------
# Autograd of the forward ops; the backward ops are first-order only
# ----------------------------------------------------------------------------------------------


def _cast(t, dtype):
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _setup_modulate(ctx, inputs, output):
    x, shift, scale, _eps, _out_dtype = inputs
    _h, mean, rstd = output
    ctx.save_for_backward(x, scale, mean, rstd)
    ctx.dtypes = (shift.dtype, scale.dtype)
    ctx.set_materialize_grads(False)


def _backward_modulate(ctx, dh, _dmean, _drstd):
    if dh is None:
        return None, None, None, None, None
    x, scale, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale = torch.ops.dit_fast_ext.adaln_modulate_bwd(dh, x, mean, rstd, scale)
    return dx, _cast(dshift, ctx.dtypes[0]), _cast(dscale, ctx.dtypes[1]), None, None


def _setup_gated(ctx, inputs, output):
    _x, y, gate = inputs
    ctx.save_for_backward(y, gate)
    ctx.set_materialize_grads(False)


def _backward_gated(ctx, dout):
    if dout is None:
        return None, None, None
    y, gate = ctx.saved_tensors
    dy, dgate = torch.ops.dit_fast_ext.gated_residual_bwd(dout, y, gate)
    return dout, dy, _cast(dgate, gate.dtype)


def _setup_fused(ctx, inputs, output):
    _x, y, gate, shift, scale, _eps, _out_dtype = inputs
    x_out, _h, mean, rstd = output
    ctx.save_for_backward(x_out, y, gate, mean, rstd, scale)
    ctx.dtypes = (gate.dtype, shift.dtype, scale.dtype)
    ctx.set_materialize_grads(False)


def _backward_fused(ctx, dx_out, dh, _dmean, _drstd):
    x_out, y, gate, mean, rstd, scale = ctx.saved_tensors
    gate_dt, shift_dt, scale_dt = ctx.dtypes
    if dh is None:
        if dx_out is None:
            return (None,) * 7
        dy, dgate = torch.ops.dit_fast_ext.gated_residual_bwd(dx_out, y, gate)
        return dx_out, dy, _cast(dgate, gate_dt), None, None, None, None
    dx, dy, dgate, dshift, dscale = torch.ops.dit_fast_ext.gated_residual_adaln_bwd(
        dh, dx_out, x_out, y, gate, mean, rstd, scale
    )
    return dx, dy, _cast(dgate, gate_dt), _cast(dshift, shift_dt), _cast(dscale, scale_dt), None, None


def _register():
    lib = "dit_fast_ext::"
    for name, fake in (
        ("adaln_modulate_fwd", _fake_modulate_fwd),
        ("adaln_modulate_bwd", _fake_modulate_bwd),
        ("gated_residual_fwd", _fake_gated_fwd),
        ("gated_residual_bwd", _fake_gated_bwd),
        ("gated_residual_adaln_fwd", _fake_fused_fwd),
        ("gated_residual_adaln_bwd", _fake_fused_bwd),
    ):
        torch.library.register_fake(lib + name, fake)
    torch.library.register_autograd(lib + "adaln_modulate_fwd", _backward_modulate, setup_context=_setup_modulate)
    torch.library.register_autograd(lib + "gated_residual_fwd", _backward_gated, setup_context=_setup_gated)
    torch.library.register_autograd(lib + "gated_residual_adaln_fwd", _backward_fused, setup_context=_setup_fused)


if _C is not None:
    _register()


# ----------------------------------------------------------------------------------------------
# Backend entry points (positional signatures of dit_fast.ops.torch_backend)
# ----------------------------------------------------------------------------------------------


CUDA_MAX_D = 4096  # kMaxD of csrc/adaln_cuda.cu: 8 features x 512 threads per row


def _torch_instead(*tensors) -> bool:
    """Whether CUDA tensors need what the CUDA kernels lack (float64 math, D > CUDA_MAX_D): the torch
    backend runs them instead, with a warning."""
    x = tensors[0]
    if not x.is_cuda:
        return False
    from ..backends import warn_once

    if any(t.dtype == torch.float64 for t in tensors):
        warn_once(("ext", "float64", "cuda"), "dit_fast: the ext CUDA kernels have no float64 path; using 'torch'")
        return True
    if x.shape[-1] > CUDA_MAX_D:
        warn_once(("ext", "max_d", "cuda"),
                  f"dit_fast: the ext CUDA kernels support D <= {CUDA_MAX_D}, got {x.shape[-1]}; using 'torch'")
        return True
    return False


def adaln_modulate(x, shift, scale, eps: float = 1e-6, h_dtype: torch.dtype | None = None):
    """LayerNorm(x) (no affine) * (1 + scale) + shift, fused; h in h_dtype or x.dtype."""
    if _torch_instead(x, shift, scale):
        return torch_backend.adaln_modulate(x, shift, scale, eps, h_dtype)
    return torch.ops.dit_fast_ext.adaln_modulate_fwd(x, shift, scale, float(eps), h_dtype)[0]


def gated_residual(x, y, gate):
    """x + gate * y in x.dtype, fused."""
    if _torch_instead(x, y, gate):
        return torch_backend.gated_residual(x, y, gate)
    return torch.ops.dit_fast_ext.gated_residual_fwd(x, y, gate)


def gated_residual_adaln(x, y, gate, shift, scale, eps: float = 1e-6, h_dtype: torch.dtype | None = None):
    """(x_out, h): x_out = x + gate * y and h = adaln_modulate(x_out, shift, scale), in one pass."""
    if _torch_instead(x, y, gate, shift, scale):
        return torch_backend.gated_residual_adaln(x, y, gate, shift, scale, eps, h_dtype)
    x_out, h, _, _ = torch.ops.dit_fast_ext.gated_residual_adaln_fwd(x, y, gate, shift, scale, float(eps), h_dtype)
    return x_out, h
