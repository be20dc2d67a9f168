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

from .lightning_modules import RMSNorm, VisionRotaryEmbeddingFast
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
    "stock_rms_norm",
    "stock_rope",
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


_FWD, _FWD_PRE, _BWD, _BWD_PRE = _GLOBAL_HOOKS


def has_hooks(*modules: nn.Module) -> bool:
    """True when any forward/backward hook (module-level or global) could see or change these calls."""
    if _FWD or _FWD_PRE or _BWD or _BWD_PRE:
        return True
    for m in modules:
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return True
    return False


def plain(m: nn.Module, cls: type) -> bool:
    """m is an instance of exactly cls, with the class's own forward and no hooks."""
    # Written out (no has_hooks call): it runs for every submodule on every forward.
    return (
        type(m) is cls and "forward" not in m.__dict__
        and not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)
        and not (_FWD or _FWD_PRE or _BWD or _BWD_PRE)
    )


def stock_linear(m: nn.Module, with_bias: bool = True) -> bool:
    return plain(m, nn.Linear) and (not with_bias or m._parameters.get("bias") is not None)


def stock_identity(m: nn.Module) -> bool:
    return plain(m, nn.Identity)


def inactive_dropout(m: nn.Module) -> bool:
    """A stock Dropout that does nothing now (p = 0, or eval mode)."""
    return plain(m, nn.Dropout) and (m.p == 0 or not m.training)


def stock_layer_norm(m: nn.Module, dim: int) -> bool:
    """A LayerNorm without affine over the last dim (any eps: the fused ops take it)."""
    params = m._parameters
    return (plain(m, nn.LayerNorm) and params.get("weight") is None and params.get("bias") is None
            and m.normalized_shape == (dim,))


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


def stock_rms_norm(m: nn.Module, dim: int) -> bool:
    """LightningDiT's RMSNorm (dit_fast.lightning_modules.RMSNorm) over the last dim, with its gain."""
    weight = getattr(m, "weight", None)
    return plain(m, RMSNorm) and weight is not None and tuple(weight.shape) == (dim,)


def stock_rope(m: nn.Module) -> bool:
    """LightningDiT's 2D rotary embedding module (its freqs_cos / freqs_sin buffers are read by the fused op)."""
    return plain(m, VisionRotaryEmbeddingFast)
