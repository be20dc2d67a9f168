"""Whether a submodule is exactly the stock one, so that a fused kernel may stand in for it.

The rule (README, "Drop-in"): a fused kernel replaces a module's call only while that module is
exactly what the published model builds: the exact class (a subclass, a wrapper or another module
is not), its stock settings, no forward patched on the instance, no hooks, and no torch.func
transform tracing the call. Anything else runs the published call ``module(x)`` for that part only.

These checks run on every forward, once per submodule: type identity, a dict lookup and a few
attribute reads, no tensor work (``dit-fast overhead`` measures the host cost per block).
"""
from __future__ import annotations

import torch.nn as nn
from torch.nn.modules import module as _module

from .ops.adaln_projections import functorch_transforms_active

__all__ = [
    "has_hooks",
    "plain",
    "stock_linear",
    "stock_identity",
    "inactive_dropout",
    "stock_layer_norm",
    "stock_tanh_gelu",
    "stock_silu",
    "stock_adaln",
    "stock_patch_proj",
    "transforms_active",
]

transforms_active = functorch_transforms_active

# torch keeps the global module hooks in module-level dicts that it mutates in place.
_GLOBAL_HOOKS = (
    _module._global_forward_hooks,
    _module._global_forward_pre_hooks,
    _module._global_backward_hooks,
    getattr(_module, "_global_backward_pre_hooks", {}),
)


def has_hooks(*modules: nn.Module) -> bool:
    """True when any forward/backward hook (module-level or global) could see or change these calls."""
    if any(_GLOBAL_HOOKS):
        return True
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks for m in modules
    )


def plain(m: nn.Module, cls: type) -> bool:
    """m is an instance of exactly cls, with the class's own forward and no hooks."""
    return type(m) is cls and "forward" not in m.__dict__ and not has_hooks(m)


def stock_linear(m: nn.Module, with_bias: bool = True) -> bool:
    return plain(m, nn.Linear) and (m.bias is not None or not with_bias)


def stock_identity(m: nn.Module) -> bool:
    return plain(m, nn.Identity)


def inactive_dropout(m: nn.Module) -> bool:
    """A stock Dropout that does nothing now (p = 0, or eval mode)."""
    return plain(m, nn.Dropout) and (m.p == 0 or not m.training)


def stock_layer_norm(m: nn.Module, dim: int) -> bool:
    """A LayerNorm without affine over the last dim (any eps: the fused ops take it)."""
    return plain(m, nn.LayerNorm) and m.weight is None and m.bias is None and tuple(m.normalized_shape) == (dim,)


def stock_tanh_gelu(m: nn.Module) -> bool:
    return plain(m, nn.GELU) and m.approximate == "tanh"


def stock_silu(m: nn.Module) -> bool:
    # An in-place SiLU would overwrite c for every later consumer in the published model: not stock.
    return plain(m, nn.SiLU) and not m.inplace


def stock_adaln(seq: nn.Module) -> bool:
    """adaLN_modulation = Sequential(SiLU(), Linear(D, k*D, bias=True)), every part stock: its Linear
    may then read the SiLU(c) the model computes once for all blocks."""
    return plain(seq, nn.Sequential) and len(seq) == 2 and stock_silu(seq[0]) and stock_linear(seq[1])


def stock_patch_proj(m: nn.Module, patch_size: int) -> bool:
    """The patch embedding's Conv2d as published: kernel = stride = patch, no padding, dilation or groups."""
    p = (patch_size, patch_size)
    return (
        plain(m, nn.Conv2d) and m.bias is not None and tuple(m.kernel_size) == p and tuple(m.stride) == p
        and tuple(m.padding) == (0, 0) and tuple(m.dilation) == (1, 1) and m.groups == 1
        and m.padding_mode == "zeros"
    )
