"""Multi-head self-attention on a packed QKV projection, over several kernel backends.

The QKV GEMM's output [B, L, 3*D] is viewed as [B, L, 3, H, Dh] and handed to the kernel without
permute copies: FlashAttention takes that layout directly (q/k/v are strided views with a
contiguous last dim); SDPA gets [B, H, L, Dh] views of it, which its fused kernels accept
because they only need the last dim contiguous.

Backends: "flash_attn_3" (FlashAttention 3, `flash_attn_interface`, Hopper), "flash_attn_4"
(FlashAttention 4, `flash_attn.cute`, Hopper/Blackwell), "flash_attn" (FlashAttention 2),
"sdpa" (torch.nn.functional.scaled_dot_product_attention: cuDNN/flash/efficient/math picked by
PyTorch), "math" (plain eager, the reference). "auto" takes the first of AUTO_ORDER that is
installed and can run the device, dtype and head dim (ATTENTION_CAPABILITIES in dit_fast/backends.py,
the capability table); sdpa always can.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from .backends import ATTENTION_CAPABILITIES
from .ops import differentiable_backward as DB
from .ops.adaln_projections import functorch_transforms_active

AUTO_ORDER = ("flash_attn_3", "flash_attn_4", "flash_attn", "sdpa")
ATTN_BACKENDS = ("auto", "flash_attn_3", "flash_attn_4", "flash_attn", "sdpa", "math")
FLASH_BACKENDS = ("flash_attn_3", "flash_attn_4", "flash_attn")

# backend -> (module to import, pip hint)
_FLASH_MODULES = {
    "flash_attn": ("flash_attn", "pip install flash-attn"),
    "flash_attn_3": ("flash_attn_interface", "build flash-attention/hopper (FlashAttention 3)"),
    "flash_attn_4": ("flash_attn.cute", "pip install flash-attn-4 (FlashAttention 4, CuTe DSL)"),
}
_DTYPES = {str(d): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}

_module_cache: dict[str, tuple[object | None, str]] = {}
_resolved: dict[tuple, str] = {}


def clear_cache() -> None:
    """Forget probed modules and resolved choices (tests that fake installed packages use this)."""
    _module_cache.clear()
    _resolved.clear()


def _flash_module(backend: str):
    """(module or None, why not) for a FlashAttention backend; imported once."""
    if backend not in _module_cache:
        name, hint = _FLASH_MODULES[backend]
        entry = "flash_attn_qkvpacked_func" if backend == "flash_attn" else "flash_attn_func"
        try:
            module = importlib.import_module(name)
        except Exception as e:  # a broken optional install must not break the package
            _module_cache[backend] = (None, f"{name} is not importable ({type(e).__name__}: {e}); {hint}")
        else:
            if hasattr(module, entry):
                _module_cache[backend] = (module, "")
            else:
                _module_cache[backend] = (None, f"{name} has no {entry}; {hint}")
    return _module_cache[backend]


def _device_capability(device: str) -> tuple[int, int] | None:
    """CUDA compute capability of `device` ("cuda", "cuda:1", ...); None for other devices."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    return torch.cuda.get_device_capability(dev)


def _cannot_run(backend: str, device: str, dtype: torch.dtype, head_dim: int, for_auto: bool) -> str:
    """Why `backend` can't run this case ("" if it can), from its row of ATTENTION_CAPABILITIES
    (dit_fast/backends.py). for_auto adds the cautious rules of "auto"."""
    cap = ATTENTION_CAPABILITIES[backend]
    if cap.dtypes is None and not dtype.is_floating_point:
        return f"needs a floating-point dtype, got {dtype}"
    if backend in FLASH_BACKENDS:
        module, why = _flash_module(backend)
        if module is None:
            return why
    cc = _device_capability(device)  # None: not a CUDA device
    device_type = "cuda" if cc is not None else torch.device(device).type
    if cap.device_types is not None and device_type not in cap.device_types:
        return f"needs a {'/'.join(t.upper() for t in cap.device_types)} device, got {device_type}"
    if cap.dtypes is not None and dtype not in cap.dtypes:
        return f"needs float16/bfloat16 inputs, got {dtype} (use torch.autocast)"
    if cap.max_head_dim is not None and head_dim > cap.max_head_dim:
        return f"supports head_dim <= {cap.max_head_dim}, got {head_dim}"
    if cc is not None and cap.min_capability is not None and cc < cap.min_capability:
        want = ".".join(map(str, cap.min_capability))
        return f"needs compute capability >= {want}, got {cc[0]}.{cc[1]}"
    if cc is not None and cap.cuda_majors is not None and cc[0] not in cap.cuda_majors:
        arch = f" ({cap.cuda_arch})" if cap.cuda_arch else ""
        majors = "/".join(f"{m}.x" for m in cap.cuda_majors)
        return f"runs on compute capability {majors}{arch} only, got {cc[0]}.{cc[1]}"
    if head_dim % cap.head_dim_multiple:
        return f"needs head_dim a multiple of {cap.head_dim_multiple}, got {head_dim}"
    if for_auto and head_dim % cap.auto_head_dim_multiple:
        return f"pads head_dim {head_dim} to a multiple of {cap.auto_head_dim_multiple} (a copy per call)"
    if for_auto and cap.auto_head_dims is not None and head_dim not in cap.auto_head_dims:
        return f"documents head_dim {cap.auto_head_dims} only, got {head_dim} (name it to try)"
    return ""


def check_backend_name(backend: str) -> str:
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTN_BACKENDS}, got {backend!r}")
    return backend


def resolve(backend: str, device: str, dtype: str, head_dim: int) -> str:
    """The backend that runs attention for qkv on `device` of `dtype` (its str) when `backend` is asked for.

    Cached, and a constant to torch.compile (no graph break). An explicitly named backend that cannot
    run raises with the reason and the backends that would.
    """
    key = (backend, device, dtype, head_dim)
    name = _resolved.get(key)
    if name is None:
        name = _resolve(backend, device, _DTYPES.get(dtype, dtype), head_dim)
        _resolved[key] = name
    return name


# A constant to torch.compile (no graph break, no guards on the caches): what
# torch.compiler.assume_constant_result sets, without importing torch._dynamo at `import dit_fast`.
resolve._dynamo_marked_constant = True


def _resolve(backend: str, device: str, dtype: torch.dtype, head_dim: int) -> str:
    check_backend_name(backend)
    if backend == "auto":
        for cand in AUTO_ORDER:
            if not _cannot_run(cand, device, dtype, head_dim, for_auto=True):
                return cand
        raise AssertionError("sdpa runs every floating-point case")  # pragma: no cover
    why = _cannot_run(backend, device, dtype, head_dim, for_auto=False)
    if why:
        usable = [b for b in ATTN_BACKENDS[1:] if not _cannot_run(b, device, dtype, head_dim, for_auto=False)]
        raise RuntimeError(
            f"attention backend {backend!r} cannot run on {device} with {dtype}, head_dim {head_dim}: {why}. "
            f"Usable here: {', '.join(usable)} (or 'auto')."
        )
    return backend


def attention_report(device_type: str, dtype: torch.dtype, head_dim: int) -> dict[str, str]:
    """For `python -m dit_fast.info`: per backend "used" (what "auto" picks), "available" or "skipped: <why>"."""
    device = "cuda" if device_type == "cuda" else device_type
    chosen = _resolve("auto", device, dtype, head_dim)
    out = {}
    for b in ATTN_BACKENDS[1:]:
        if b == chosen:
            out[b] = "used"
        else:
            why = _cannot_run(b, device, dtype, head_dim, for_auto=True)
            out[b] = f"skipped: {why}" if why else "available"
    return out


# -- kernels: each takes qkv5 = [B, L, 3, H, Dh] (a view of the QKV GEMM output) -> [B, L, H, Dh] or [B, H, L, Dh]


def _first(result):
    # FlashAttention 4 (and FlashAttention 3 betas) return (out, lse).
    return result[0] if isinstance(result, (tuple, list)) else result


def _run_flash_attn(qkv5):
    return _first(_flash_module("flash_attn")[0].flash_attn_qkvpacked_func(qkv5))


def _run_flash_attn_3(qkv5):
    module = _flash_module("flash_attn_3")[0]
    if hasattr(module, "flash_attn_qkvpacked_func"):
        return _first(module.flash_attn_qkvpacked_func(qkv5))
    return _first(module.flash_attn_func(*unbind_packed(qkv5)))


def _run_flash_attn_4(qkv5):
    return _first(_flash_module("flash_attn_4")[0].flash_attn_func(*unbind_packed(qkv5)))


def math_attention(q, k, v):
    """softmax(q k^T / sqrt(Dh)) v on [B, H, L, Dh], in plain eager ops (the reference)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return scores.softmax(dim=-1) @ v


def packed_grad(dq, dk, dv) -> torch.Tensor | None:
    """The [B, L, 3, H, Dh] tensor whose index-2 slices dq, dk, dv ([B, L, H, Dh]) are, if they are
    exactly that (same storage, same strides, equally spaced); else None.

    PyTorch's memory-efficient SDPA backward allocates its gradients that way when q, k and v are views
    of one packed tensor, as here: handing that tensor back as is makes the QKV gradient free."""
    if dq is None or dk is None or dv is None:
        return None
    if not (dq.dtype == dk.dtype == dv.dtype and dq.device == dk.device == dv.device):
        return None
    if not (dq.shape == dk.shape == dv.shape and dq.stride() == dk.stride() == dv.stride()) or dq.dim() != 4:
        return None
    if dq.untyped_storage().data_ptr() != dk.untyped_storage().data_ptr() or (
        dq.untyped_storage().data_ptr() != dv.untyped_storage().data_ptr()
    ):
        return None
    step = dk.storage_offset() - dq.storage_offset()
    if step <= 0 or dv.storage_offset() - dk.storage_offset() != step:
        return None
    B, L, H, Dh = dq.shape
    sb, sl, sh, sd = dq.stride()
    packed = dq.as_strided((B, L, 3, H, Dh), (sb, sl, step, sh, sd), dq.storage_offset())
    # Accept only a layout with no two elements at one address (e.g. the contiguous [B, L, 3, H, Dh]),
    # so the as_strided view is a real tensor of its own and not an aliasing trick.
    if not _non_overlapping(packed):
        return None
    return packed


def _non_overlapping(t: torch.Tensor) -> bool:
    extent = 1
    for size, stride in sorted(((sz, st) for sz, st in zip(t.shape, t.stride()) if sz > 1), key=lambda p: p[1]):
        if stride < extent:
            return False
        extent = stride * size
    return True


class _UnbindPacked(torch.autograd.Function):
    """qkv5.unbind(2), whose backward returns the kernel's packed gradient without a copy when it is one
    (packed_grad), and stacks dq, dk, dv (one write of the packed layout) otherwise."""

    @staticmethod
    def forward(ctx, qkv5):
        ctx.set_materialize_grads(False)
        return qkv5.unbind(2)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        packed = packed_grad(dq, dk, dv)
        if packed is not None:
            return packed
        ref = next(g for g in (dq, dk, dv) if g is not None)
        return torch.stack([g if g is not None else torch.zeros_like(ref) for g in (dq, dk, dv)], dim=2)


def unbind_packed(qkv5: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v = qkv5.unbind(2) for an attention kernel that returns separate gradients (see _UnbindPacked);
    torch.compile traces the plain unbind (its own passes place the gradient)."""
    if (torch.compiler.is_compiling() or not torch.is_grad_enabled() or not qkv5.requires_grad
            or functorch_transforms_active()):
        return qkv5.unbind(2)
    return _UnbindPacked.apply(qkv5)


class _TwiceDifferentiable(torch.autograd.Function):
    """A fast attention kernel whose backward can be differentiated again.

    SDPA's fused kernels and FlashAttention have first-order backwards only: a gradient penalty
    (autograd.grad(..., create_graph=True), then .backward()) fails in them. The forward runs the kernel
    (`run`) on detached copies of its inputs and keeps that small graph; the backward decides by grad mode,
    which is on exactly under create_graph: off, the kernel's own backward runs on the kept graph (no
    recomputation); on, the gradient is recomputed from the math path (`math`, twice differentiable), as
    differentiable_backward.py does for the fused ops. A second backward of a retained graph recomputes the
    kernel's graph first."""

    @staticmethod
    def forward(ctx, run, math, *inputs):
        ctx.run, ctx.math = run, math
        ctx.save_for_backward(*inputs)
        ctx.kept = _kernel_graph(run, inputs)
        return ctx.kept[1].detach()

    @staticmethod
    def backward(ctx, dout):
        inputs = ctx.saved_tensors
        kept, ctx.kept = ctx.kept, None  # freed now: its saved tensors must not outlive this backward
        if DB.wanted():  # create_graph: a differentiable gradient, from the math path
            return (None, None, *DB._vjp(ctx.math, inputs, (dout,)))
        leaves, out = kept if kept is not None else _kernel_graph(ctx.run, inputs)
        return (None, None, *torch.autograd.grad(out, leaves, dout, allow_unused=True))


def _kernel_graph(run, inputs):
    """(leaves, out): the kernel run under autograd on detached copies of its inputs (a graph of its own)."""
    with torch.enable_grad():
        leaves = tuple(t.detach().requires_grad_() for t in inputs)
        return leaves, run(*leaves)


def _saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks pack what autograd saves (activation checkpointing, CPU offload)."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except (AttributeError, TypeError, RuntimeError):  # a torch without this query: assume none
        return False


def _twice_differentiable(name: str, *inputs) -> bool:
    """Whether a call of kernel `name` takes _TwiceDifferentiable: a fused kernel under autograd, eager.
    Compiled graphs are differentiated once (AOTAutograd), and functorch transforms differentiate the kernel
    call itself: both take it plain. So do calls under saved-tensor hooks: activation checkpointing would drop
    the kept graph's tensors and recompute the whole block a second time to get them back (a gradient penalty
    through a checkpointed block needs attn_backend="math")."""
    return (name != "math" and torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
            and not torch.compiler.is_compiling() and not functorch_transforms_active()
            and not _saved_tensor_hooks_active())


def attention(qkv: torch.Tensor, num_heads: int, backend: str = "auto") -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v per head: qkv [B, L, 3*D] (q | k | v, heads inside) -> [B, L, D].

    Twice differentiable on every backend: under create_graph the backward of a fused kernel is recomputed
    from the math path (_TwiceDifferentiable), so gradient penalties work with the default "auto"."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 3:
        raise ValueError(f"qkv must be a tensor [B, L, 3*D], got {getattr(qkv, 'shape', type(qkv).__name__)}")
    B, L, D3 = qkv.shape
    if D3 % (3 * num_heads):
        raise ValueError(f"qkv's last dim ({D3}) must be 3 * num_heads ({num_heads}) * head_dim")
    D = D3 // 3
    head_dim = D // num_heads
    name = resolve(backend, str(qkv.device), str(qkv.dtype), head_dim)
    if _twice_differentiable(name, qkv):
        return _TwiceDifferentiable.apply(lambda t: _run_kernel(t, num_heads, name),
                                          lambda t: _run_kernel(t, num_heads, "math"), qkv)
    return _run_kernel(qkv, num_heads, name)


def attention_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v for separate q, k, v [B, H, L, Dh] (last dim contiguous: e.g. the
    output of dit_fast.ops.qk_norm_rope) -> [B, L, H * Dh]. Same backends and guarantees as attention()."""
    for name_, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name_} must be a tensor [B, H, L, Dh], got {getattr(t, 'shape', type(t).__name__)}")
    if not q.shape == k.shape == v.shape:
        raise ValueError(f"q, k, v must have one shape [B, H, L, Dh], got {list(q.shape)}, {list(k.shape)}, "
                         f"{list(v.shape)}")
    name = resolve(backend, str(q.device), str(q.dtype), q.shape[-1])
    if _twice_differentiable(name, q, k, v):
        return _TwiceDifferentiable.apply(lambda *t: _run_qkv(*t, name), lambda *t: _run_qkv(*t, "math"), q, k, v)
    return _run_qkv(q, k, v, name)


def _run_qkv(q, k, v, name: str) -> torch.Tensor:
    """The attention kernel `name` (a resolved backend) on q, k, v [B, H, L, Dh] -> [B, L, H * Dh]."""
    B, H, L, Dh = q.shape
    if name in FLASH_BACKENDS:  # FlashAttention takes [B, L, H, Dh]: the transposes are views
        out = _first(_flash_module(name)[0].flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v))))
        return out.reshape(B, L, H * Dh)
    out = math_attention(q, k, v) if name == "math" else F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(B, L, H * Dh)


def _run_kernel(qkv: torch.Tensor, num_heads: int, name: str) -> torch.Tensor:
    """The attention kernel `name` (a resolved backend) on qkv [B, L, 3*D] -> [B, L, D]."""
    B, L, D3 = qkv.shape
    D = D3 // 3
    head_dim = D // num_heads
    qkv5 = qkv.reshape(B, L, 3, num_heads, head_dim)  # a view for any qkv with a contiguous last dim
    if name == "flash_attn":
        out = _run_flash_attn(qkv5)
    elif name == "flash_attn_3":
        out = _run_flash_attn_3(qkv5)
    elif name == "flash_attn_4":
        out = _run_flash_attn_4(qkv5)
    else:
        # Unbound along the packed dim, then transposed: [B, H, L, Dh] views of qkv for the kernel. The
        # backward wants dq, dk, dv as one [B, L, 3, H, Dh] tensor, qkv's own layout (see unbind_packed).
        q, k, v = (t.transpose(1, 2) for t in unbind_packed(qkv5))
        out = math_attention(q, k, v) if name == "math" else F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2)
    return out.reshape(B, L, D)

