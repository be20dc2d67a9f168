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

from . import adaln_saved as S
from . import differentiable_backward as DB
from .dtypes import compute_dtype

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
# Fake kernels: output metadata of each op, as the C++ code allocates them (contiguous; math and the
# mean/rstd/dmod dtypes in the compute dtype, dtypes.py). Outputs go on the one device all tensor
# arguments share (a meta call gives meta outputs); mixed devices are refused, as the kernels refuse them.
# ----------------------------------------------------------------------------------------------


def _device(op: str, **tensors) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise ValueError(f"dit_fast_ext::{op}: all tensors must be on one device, got {where}")
    return next(iter(devices.values()))


def _empty(shape, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)


def _fake_modulate_fwd(x, shift, scale, eps, h_dtype, rms=False, weight=None):
    dev = _device("adaln_modulate_fwd", x=x, shift=shift, scale=scale, weight=weight)
    ct = compute_dtype(x, shift, scale, weight)
    B, L, _ = x.shape
    return _empty(x.shape, h_dtype or x.dtype, dev), _empty((B, L), ct, dev), _empty((B, L), ct, dev)


def _fake_dweight(weight, x, ct, dev):
    return _empty((0,), x.dtype, dev) if weight is None else _empty(weight.shape, ct, dev)


def _fake_modulate_bwd(dh, x, mean, rstd, scale, rms=False, weight=None):
    dev = _device("adaln_modulate_bwd", dh=dh, x=x, mean=mean, rstd=rstd, scale=scale, weight=weight)
    ct = compute_dtype(dh, x, mean, scale, weight)
    B, _, D = x.shape
    return (_empty(x.shape, x.dtype, dev), _empty((B, D), ct, dev), _empty((B, D), ct, dev),
            _fake_dweight(weight, x, ct, dev))


def _fake_dbias(bias, y, dev):
    return _empty((0,), y.dtype, dev) if bias is None else _empty(bias.shape, bias.dtype, dev)


def _fake_gated_fwd(x, y, gate, bias):
    return _empty(x.shape, x.dtype, _device("gated_residual_fwd", x=x, y=y, gate=gate, bias=bias))


def _fake_gated_bwd(dout, y, gate, bias):
    dev = _device("gated_residual_bwd", dout=dout, y=y, gate=gate, bias=bias)
    B, _, D = y.shape
    return (_empty(y.shape, y.dtype, dev), _empty((B, D), compute_dtype(dout, y, gate, bias), dev),
            _fake_dbias(bias, y, dev))


def _fake_fused_fwd(x, y, gate, bias, shift, scale, eps, h_dtype, rms=False, weight=None):
    dev = _device("gated_residual_adaln_fwd", x=x, y=y, gate=gate, bias=bias, shift=shift, scale=scale, weight=weight)
    ct = compute_dtype(x, y, gate, bias, shift, scale, weight)
    B, L, _ = x.shape
    return (
        _empty(x.shape, x.dtype, dev),
        _empty(x.shape, h_dtype or x.dtype, dev),
        _empty((B, L), ct, dev),
        _empty((B, L), ct, dev),
    )


def _fake_fused_bwd(dh, dx_out, x_out, y, gate, bias, mean, rstd, scale, rms=False, weight=None):
    dev = _device(
        "gated_residual_adaln_bwd", dh=dh, dx_out=dx_out, x_out=x_out, y=y, gate=gate, bias=bias, mean=mean,
        rstd=rstd, scale=scale, weight=weight,
    )
    ct = compute_dtype(dh, dx_out, x_out, y, gate, bias, mean, scale, weight)
    B, _, D = x_out.shape
    dgate, dshift, dscale = (_empty((B, D), ct, dev) for _ in range(3))
    return (_empty(x_out.shape, x_out.dtype, dev), _empty(y.shape, y.dtype, dev), dgate, _fake_dbias(bias, y, dev),
            dshift, dscale, _fake_dweight(weight, x_out, ct, dev))


# ----------------------------------------------------------------------------------------------
# Autograd of the forward ops. The C++ backward ops are first-order only; a backward run with
# create_graph=True takes the differentiable formulas of differentiable_backward.py instead.
# ----------------------------------------------------------------------------------------------


def _cast(t, dtype):
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _unmaterialized(setup):
    """The shared setup (adaln_saved.py), then set_materialize_grads(False): the backwards take None for an
    output without a gradient and skip its work."""

    def setup_context(ctx, inputs, output):
        setup(ctx, inputs, output)
        ctx.set_materialize_grads(False)

    return setup_context


def _norm_grads(ctx, dshift, dscale, dweight, scale, weight):
    """The kernels' norm gradients (compute dtype; dshift computed even without a shift) in the inputs' dtypes."""
    return (None if ctx.shift_dtype is None else _cast(dshift, ctx.shift_dtype), _cast(dscale, scale.dtype),
            None if weight is None else _cast(dweight, weight.dtype))


def _backward_modulate(ctx, dh, _dmean, _drstd):
    if dh is None:
        return (None,) * 7
    x, mean, rstd, scale, weight = ctx.saved_tensors
    if DB.wanted():
        dx, dshift, dscale, dweight = DB.adaln_modulate(x, ctx.shift_dtype, scale, ctx.eps, ctx.h_dtype, dh, ctx.norm,
                                                        weight)
        return dx, dshift, dscale, None, None, None, dweight
    dx, dshift, dscale, dweight = torch.ops.dit_fast_ext.adaln_modulate_bwd(dh, x, mean, rstd, scale, ctx.rms, weight)
    dshift, dscale, dweight = _norm_grads(ctx, dshift, dscale, dweight, scale, weight)
    return dx, dshift, dscale, None, None, None, dweight


def _backward_gated(ctx, dout):
    if dout is None:
        return None, None, None, None
    y, gate, bias = ctx.saved_tensors
    if DB.wanted():
        return DB.gated_residual(ctx.x_dtype, y, gate, bias, dout)
    dy, dgate, dbias = torch.ops.dit_fast_ext.gated_residual_bwd(dout, y, gate, bias)
    return dout, dy, _cast(dgate, gate.dtype), dbias if bias is not None else None


def _backward_fused(ctx, dx_out, dh, _dmean, _drstd):
    x_out, y, gate, bias, mean, rstd, scale, weight = ctx.saved_tensors
    if dh is None and dx_out is None:
        return (None,) * 10
    if DB.wanted():
        dx, dy, dgate, dbias, dshift, dscale, dweight = DB.gated_residual_adaln(
            x_out, y, gate, bias, ctx.shift_dtype, scale, ctx.eps, ctx.h_dtype, dx_out, dh, ctx.norm, weight)
        return dx, dy, dgate, dbias, dshift, dscale, None, None, None, dweight
    if dh is None:
        dy, dgate, dbias = torch.ops.dit_fast_ext.gated_residual_bwd(dx_out, y, gate, bias)
        return (dx_out, dy, _cast(dgate, gate.dtype), dbias if bias is not None else None) + (None,) * 6
    dx, dy, dgate, dbias, dshift, dscale, dweight = torch.ops.dit_fast_ext.gated_residual_adaln_bwd(
        dh, dx_out, x_out, y, gate, bias, mean, rstd, scale, ctx.rms, weight
    )
    dshift, dscale, dweight = _norm_grads(ctx, dshift, dscale, dweight, scale, weight)
    return (dx, dy, _cast(dgate, gate.dtype), dbias if bias is not None else None, dshift, dscale, None, None, None,
            dweight)


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
    for name, backward, setup in (
        ("adaln_modulate_fwd", _backward_modulate, S.setup_adaln_modulate),
        ("gated_residual_fwd", _backward_gated, S.setup_gated_residual),
        ("gated_residual_adaln_fwd", _backward_fused, S.setup_gated_residual_adaln),
    ):
        torch.library.register_autograd(lib + name, backward, setup_context=_unmaterialized(setup))


if _C is not None:
    _register()


# ----------------------------------------------------------------------------------------------
# Backend entry points (positional signatures of dit_fast.ops.torch_backend). What they accept (float64
# on the CPU only, D <= 4096 on CUDA; the norm modes on both) is declared in the capability table of
# dit_fast/backends.py.
# ----------------------------------------------------------------------------------------------


def adaln_modulate(x, shift, scale, eps: float = 1e-6, h_dtype: torch.dtype | None = None, norm: str = "layer",
                   weight=None):
    """norm(x) * weight * (1 + scale) + shift, fused (norm "layer" or "rms"; weight, shift optional); h in h_dtype
    or x.dtype."""
    return torch.ops.dit_fast_ext.adaln_modulate_fwd(x, shift, scale, float(eps), h_dtype, norm == "rms", weight)[0]


def gated_residual(x, y, gate, bias=None):
    """x + gate * (y + bias) in x.dtype, fused (the bias is added before the kernel: csrc/adaln_ops.h)."""
    return torch.ops.dit_fast_ext.gated_residual_fwd(x, y, gate, bias)


def gated_residual_adaln(x, y, gate, shift, scale, eps: float = 1e-6, h_dtype: torch.dtype | None = None,
                         bias=None, norm: str = "layer", weight=None):
    """(x_out, h): x_out = x + gate * (y + bias) and h = adaln_modulate(x_out, shift, scale, norm=norm,
    weight=weight), in one pass."""
    x_out, h, _, _ = torch.ops.dit_fast_ext.gated_residual_adaln_fwd(x, y, gate, bias, shift, scale, float(eps),
                                                                     h_dtype, norm == "rms", weight)
    return x_out, h
