"""The fast DiT: same constructor, state_dict keys and forward semantics as dit_fast.reference.DiT.

What differs is how a forward runs (docs/DESIGN.md section 2):
  - SiLU(c) is computed once and shared by every adaLN projection;
  - the patch embedding is one GEMM on patches with bias and pos_embed fused (dit_fast.ops.patch_embed);
  - each block carries the modulated activations h of the next sub-layer: gated residual + next
    LayerNorm + modulate is one op (dit_fast.ops.gated_residual_adaln);
  - the MLP's fc1 and GELU are one op; the QKV output feeds attention without permute copies;
  - the final adaLN, linear and unpatchify are one op (dit_fast.ops.final_layer).
Each op runs on the backend the model was built with (see dit_fast.backends).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import ops, reference
from .attention import attention, attention_qkv
from .backends import check_backend_name, fuses_bias, resolve
from .lightning_modules import SwiGLUFFN, swiglu_hidden_size
from .reference import (
    PatchEmbed,
    attention_published,
    build_dit,
    check_lightning_config,
    config_table,
    forward_with_cfg,
    initialize_dit_weights,
    lightning_family_options,
    lightning_forward_with_cfg,
    mlp_published,
    modulate_published,
    published_output,
    split_modulations,
)
from .stock import (
    has_hooks,
    inactive_dropout,
    plain,
    stock_adaln,
    stock_identity,
    stock_layer_norm,
    stock_linear,
    stock_patch_proj,
    stock_rms_norm,
    stock_rope,
    stock_tanh_gelu,
    transforms_active,
)

__all__ = ["DiT", "DiT_models", "SiT", "SiT_models", "LightningDiT", "LightningDiT_models", "from_reference"]


# -- helpers ---------------------------------------------------------------------------------

def _h_dtype(x: torch.Tensor):
    # Under autocast the next GEMM would cast h anyway: writing it in the autocast dtype saves that pass.
    # Autocast leaves float64 alone (a float64 model runs in float64 under it), so float64 h stays.
    if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(x.device.type)
    return None


def _version(t: torch.Tensor):
    # Inference tensors keep no version counter: None means "cannot tell whether it changed".
    return None if t.is_inference() else t._version


class _Carry:
    """What the model hands a block besides (x, c) on the fast path, and what the block hands back.

    In: h = modulate(norm1(x)) already computed from ``src`` (by the previous block's fused
    residual + norm), this block's modulation vectors, and the next consumer's (shift, scale) or
    None. Out: the block's output tensor and h_next = modulate(norm(out)) under the next (shift,
    scale). The block returns only its output tensor, as the published block does, so hooks see and
    may replace exactly what they see on the published model; a replaced or modified tensor is
    detected (identity, and the version counter where hooks are registered) and h is then computed
    from the tensor actually passed on.
    """

    __slots__ = ("c", "h", "src", "src_version", "mods", "next_mod", "out", "out_version", "h_next")

    def __init__(self, c, h, src, mods, next_mod, check_version: bool):
        self.c, self.h, self.src, self.mods, self.next_mod = c, h, src, mods, next_mod
        self.src_version = _version(src) if check_version and h is not None else None
        self.out = self.h_next = self.out_version = None

    def h_for(self, x: torch.Tensor, hooked: bool):
        """The carried h if it was computed from this very x (unchanged), else None."""
        if self.h is None or x is not self.src:
            return None
        if hooked and (torch.compiler.is_compiling() or self.src_version is None or _version(x) != self.src_version):
            return None  # a pre-hook may have changed x in place
        return self.h

    def set_output(self, out: torch.Tensor, h_next, hooked: bool):
        self.out, self.h_next = out, h_next
        if hooked and not torch.compiler.is_compiling():
            self.out_version = _version(out)

    def h_next_for(self, out: torch.Tensor, hooked: bool):
        """h_next if `out` is what the block returned, unchanged by a forward hook."""
        if self.h_next is None or out is not self.out:
            return None
        if hooked and (torch.compiler.is_compiling() or self.out_version is None or _version(out) != self.out_version):
            return None
        return self.h_next


# -- modules -----------------------------------------------------------------------------------


class Attention(reference.Attention):
    """timm's Attention as the published DiT builds it (same submodules and ``fused_attn`` switch), or with
    LightningDiT's options (dit_fast.reference.Attention builds the tree).

    While every part but qkv and proj is stock (Identity or stock q/k norms, Identity norm, inactive
    Dropouts, ``fused_attn`` on, the stock rotary embedding), attention runs on the model's kernels over the
    packed QKV output (the QK-norm + RoPE op first where q/k norms or RoPE are used); otherwise the published
    calls (dit_fast.reference.attention_published), so each replaced part is honored.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm=None, scale_norm_slot: bool = True):
        super().__init__(dim, num_heads, qk_norm=qk_norm, scale_norm_slot=scale_norm_slot)
        self.backend = "auto"
        self.ops_backend = "auto"

    def forward(self, h: torch.Tensor, rope=None) -> torch.Tensor:
        args = self.kernel_args(rope)
        if args is None:
            return attention_published(self, h, rope)
        return self.proj(self.attend(h, args))

    def kernel_args(self, rope=None) -> dict | None:
        """None unless the attention kernels may stand in for everything between qkv and proj; else {} (q and
        k go to attention as they are) or the QK-norm + RoPE op's arguments."""
        norm = self._modules.get("norm")
        if not (self.fused_attn and (norm is None or stock_identity(norm)) and inactive_dropout(self.attn_drop)
                and inactive_dropout(self.proj_drop)):
            return None
        q_norm, k_norm = self.q_norm, self.k_norm
        if stock_identity(q_norm) and stock_identity(k_norm):
            if rope is None:
                return {}
            args = {}
        else:
            args = qk_norm_args(q_norm, k_norm, self.head_dim)
            if args is None:
                return None
        if rope is not None:
            if not stock_rope(rope) or transforms_active():
                return None
            args.update(cos=rope.freqs_cos, sin=rope.freqs_sin)
        return args

    def attend(self, h: torch.Tensor, args: dict) -> torch.Tensor:
        """softmax attention of qkv(h) (q/k normed and rotated by the op with `args`, from kernel_args()),
        before the output projection."""
        qkv = self.qkv(h)
        if not args:
            return attention(qkv, self.num_heads, self.backend)
        q, k, v = ops.qk_norm_rope(qkv, self.num_heads, backend=self.ops_backend, **args)
        return attention_qkv(q, k, v, self.backend)


def qk_norm_args(q_norm: nn.Module, k_norm: nn.Module, head_dim: int):
    """The QK-norm + RoPE op's norm arguments for a stock pair of q/k norms (LightningDiT's RMSNorm, or an
    affine LayerNorm of the same eps), else None."""
    if stock_rms_norm(q_norm, head_dim) and stock_rms_norm(k_norm, head_dim) and q_norm.eps == k_norm.eps:
        return dict(q_gain=q_norm.weight, k_gain=k_norm.weight, eps=q_norm.eps, norm="rms")
    if (plain(q_norm, nn.LayerNorm) and plain(k_norm, nn.LayerNorm) and q_norm.eps == k_norm.eps
            and tuple(q_norm.normalized_shape) == tuple(k_norm.normalized_shape) == (head_dim,)
            and q_norm.weight is not None and k_norm.weight is not None
            and (q_norm.bias is None) == (k_norm.bias is None)):
        return dict(q_gain=q_norm.weight, k_gain=k_norm.weight, q_bias=q_norm.bias, k_bias=k_norm.bias,
                    eps=q_norm.eps, norm="layer")
    return None


class Mlp(reference.Mlp):
    """timm's Mlp as the published DiT builds it (fc1, tanh GELU, drop1, norm, fc2, drop2).

    fc1 + GELU run as one op while both are stock; drop1/norm/drop2 other than stock and inactive
    run the published calls (dit_fast.reference.mlp_published).
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__(dim, hidden)
        self.backend = "auto"

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.stock_around_fc2():
            return mlp_published(self, h)
        return self.fc2(self.hidden(h))

    def stock_around_fc2(self) -> bool:
        """drop1, norm and drop2 are stock and do nothing: fc2(hidden(h)) is the published result."""
        return inactive_dropout(self.drop1) and stock_identity(self.norm) and inactive_dropout(self.drop2)

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        """act(fc1(h)): one fused op while fc1 and act are stock, else the published calls."""
        if stock_linear(self.fc1) and stock_tanh_gelu(self.act) and not transforms_active():
            return ops.linear_gelu_tanh(h, self.fc1.weight, self.fc1.bias, backend=self.backend)
        return self.act(self.fc1(h))


def _swiglu_hidden(mlp: SwiGLUFFN, h: torch.Tensor, backend: str) -> torch.Tensor:
    """silu(x1) * x2 of w12(h): the fused SwiGLU op on the packed projection while w12 is a stock Linear."""
    w12 = mlp.w12
    if stock_linear(w12, with_bias=False) and not transforms_active():
        return ops.swiglu(F.linear(h, w12.weight), bias=w12.bias, backend=backend)
    x1, x2 = w12(h).chunk(2, dim=-1)
    return F.silu(x1) * x2


def _mlp_for_residual(mlp: nn.Module, h: torch.Tensor, fuse_bias: bool, backend: str):
    """(y, bias) for the gated residual that consumes mlp(h): see _project_for_residual."""
    if plain(mlp, Mlp) and mlp.stock_around_fc2():
        return _project_for_residual(mlp, mlp.hidden, mlp.fc2, h, fuse_bias)
    if plain(mlp, SwiGLUFFN):
        return _project_for_residual(mlp, lambda t: _swiglu_hidden(mlp, t, backend), mlp.w3, h, fuse_bias)
    return mlp(h), None


def _project_for_residual(module: nn.Module, hidden, linear: nn.Module, h: torch.Tensor, fuse_bias: bool):
    """(y, bias) for the gated residual that consumes module(h) = linear(hidden(h)), the module stock around
    its output projection: with fuse_bias and a stock Linear, the projection runs without its bias, which
    the gated op adds and whose gradient its backward sums in the pass it makes anyway. A replaced or hooked
    projection is called as a module (bias None)."""
    if fuse_bias and stock_linear(linear):
        return F.linear(hidden(h), linear.weight), linear.bias
    return linear(hidden(h)), None


class DiTBlock(reference.DiTBlock):
    """The published block: ``block(x, c) -> x`` with c = t_emb + y_emb (SiLU inside adaLN_modulation);
    LightningDiT's options (RMSNorm, SwiGLU, QK-norm, scale-only adaLN; ``block(x, c, feat_rope)``) configure
    the same block (dit_fast.reference.DiTBlock has the published calls).

    The model calls a stock block as ``block(x, c, [feat_rope,] carry=...)`` (always through the module, so
    hooks, wrappers and FSDP see every call): then the block uses the modulations the model computed for all
    blocks at once and the h = modulate(norm1(x)) carried from the previous block, and leaves in the carry
    the next consumer's h, computed in the same pass as its last gated residual (see _Carry). Any other
    block (a subclass, a user module, a patched forward) is called as published.
    """

    attention_cls, mlp_cls = Attention, Mlp

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, **options):
        super().__init__(hidden_size, num_heads, mlp_ratio, **options)
        self.backend = "auto"

    def forward(self, x: torch.Tensor, c: torch.Tensor, feat_rope=None, *, carry: _Carry | None = None):
        h_dtype = _h_dtype(x)
        dim = x.shape[-1]
        if carry is None or c is not carry.c:
            if carry is not None:
                carry.set_output(None, None, False)
            carry = None
            mods = split_modulations(self.adaLN_modulation(c), self.wo_shift)
            h, next_mod = None, None
        else:
            mods, next_mod = carry.mods, carry.next_mod
            h = carry.h_for(x, has_hooks(self)) if norm_kwargs(self.norm1, dim) is not None else None
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        if h is None:
            h = _norm_modulate(self.norm1, x, shift_msa, scale_msa, h_dtype, self.backend)
        fuse_bias = self._fuses_bias(x)
        attn = self.attn
        attn_args = attn.kernel_args(feat_rope) if plain(attn, Attention) else None
        if attn_args is not None:
            a, a_bias = _project_for_residual(attn, lambda t: attn.attend(t, attn_args), attn.proj, h, fuse_bias)
        else:
            a, a_bias = (attn(h) if feat_rope is None else attn(h, rope=feat_rope)), None
        norm2 = norm_kwargs(self.norm2, dim)
        if norm2 is not None and not transforms_active():
            x, h = ops.gated_residual_adaln(x, a, gate_msa, shift_mlp, scale_mlp, h_dtype=h_dtype, bias=a_bias,
                                            backend=self.backend, **norm2)
        else:
            x = _gated_residual(x, a, gate_msa, a_bias, self.backend)
            h = _norm_modulate(self.norm2, x, shift_mlp, scale_mlp, h_dtype, self.backend)
        m, m_bias = _mlp_for_residual(self.mlp, h, fuse_bias, self.backend)
        if next_mod is None or transforms_active():
            return _gated_residual(x, m, gate_mlp, m_bias, self.backend)
        shift, scale, kwargs = next_mod
        x, h_next = ops.gated_residual_adaln(x, m, gate_mlp, shift, scale, h_dtype=h_dtype, bias=m_bias,
                                             backend=self.backend, **kwargs)
        carry.set_output(x, h_next, has_hooks(self))
        return x

    def _fuses_bias(self, x: torch.Tensor) -> bool:
        """Whether the gated ops' backend here adds attn.proj's and the MLP's output biases in its kernels."""
        if transforms_active():
            return False
        op, dev = "gated_residual_adaln", x.device.type
        return fuses_bias(resolve(self.backend, op, dev, x.dtype == torch.float64, x.shape[-1]), op, dev)


def norm_kwargs(norm: nn.Module, dim: int) -> dict | None:
    """The fused adaLN ops' norm arguments for a stock norm (LayerNorm without affine: eps only, the call
    every backend takes; LightningDiT's RMSNorm: its gain too), else None (the published call runs)."""
    if stock_layer_norm(norm, dim):
        return {"eps": norm.eps}
    if stock_rms_norm(norm, dim):
        return {"eps": norm.eps, "norm": "rms", "weight": norm.weight}
    return None


def _gated_residual(x, y, gate, bias, backend):
    if transforms_active():  # the published expression: torch.func transforms have its rules
        return x + gate.unsqueeze(1) * y
    return ops.gated_residual(x, y, gate, bias=bias, backend=backend)


def _norm_modulate(norm: nn.Module, x, shift, scale, h_dtype, backend):
    """modulate(norm(x), shift, scale): one fused op while norm is stock (dit_fast.stock), else the published
    calls (so a replaced norm, or its hooks, is honored). shift None: LightningDiT's scale-only adaLN."""
    kwargs = norm_kwargs(norm, x.shape[-1])
    if kwargs is None or transforms_active():
        h = modulate_published(norm(x), shift, scale)
        return h if h_dtype is None else h.to(h_dtype)
    return ops.adaln_modulate(x, shift, scale, h_dtype=h_dtype, backend=backend, **kwargs)


class FinalLayer(reference.FinalLayer):
    """The published final layer: ``final_layer(x, c) -> [N, T, p*p*C]`` tokens (unpatchified by the model)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, use_rmsnorm: bool = False):
        super().__init__(hidden_size, patch_size, out_channels, use_rmsnorm)
        self.backend = "auto"

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.tokens(x, shift, scale)

    def tokens(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.linear(_norm_modulate(self.norm_final, x, shift, scale, _h_dtype(x), self.backend))


class DiT(nn.Module):
    """Drop-in fast DiT (and, as the SiT subclass, SiT: the same engine and weights).

    Same keyword arguments as the published model, plus:
      backend: "auto" | "triton" | "ext" | "torch" for the fused ops (env DIT_FAST_BACKEND overrides "auto");
      attn_backend: attention kernel ("auto", "sdpa", "math", flash-attn when installed);
      checkpoint_every: recompute every k-th block's activations in backward (0 = off, 1 = all blocks);
      batch_adaln: store all adaLN projection weights in one tensor (each block's weight a view of it),
        so that without autograd they run as one GEMM. Costs nothing in memory, but the state_dict's
        adaLN tensors then share one storage (safetensors' save_file refuses that; save_checkpoint and
        torch.save handle it). Off by default.
    """

    returns_sigma = True  # forward's output includes the learned-sigma channels (SiT's does not)
    _family_options: dict = {}  # build_modules' block options (LightningDiT sets its own per instance)
    _passes_rope = False  # LightningDiT's blocks are called block(x, c, feat_rope)

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        *,
        backend: str = "auto",
        attn_backend: str = "auto",
        checkpoint_every: int = 0,
        batch_adaln: bool = False,
    ):
        super().__init__()
        if not isinstance(checkpoint_every, int) or checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be an int >= 0, got {checkpoint_every!r}")
        self.checkpoint_every = checkpoint_every
        build_dit(self, DiTBlock, FinalLayer, input_size, patch_size, in_channels, hidden_size, depth, num_heads,
                  mlp_ratio, class_dropout_prob, num_classes, learn_sigma)
        self.set_backend(backend, attn_backend)
        initialize_dit_weights(self)
        self._adaln_fused = None
        self.batch_adaln = batch_adaln
        self.register_load_state_dict_post_hook(_fuse_after_load)

    def set_backend(self, backend: str | None = None, attn_backend: str | None = None) -> DiT:
        """Switch the kernel family of the fused ops and/or the attention kernel (no weights change)."""
        if backend is not None:
            self.backend = check_backend_name(backend)
        if attn_backend is not None:
            self.attn_backend = attn_backend
        for block in self.blocks:
            block.backend = block.mlp.backend = block.attn.ops_backend = self.backend
            block.attn.backend = self.attn_backend
        self.final_layer.backend = self.backend
        return self

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return ops.unpatchify(x, self.patch_size, self.out_channels)

    # -- the batched adaLN projection ----------------------------------------------------------

    @property
    def batch_adaln(self) -> bool:
        return self._batch_adaln

    @batch_adaln.setter
    def batch_adaln(self, on: bool) -> None:
        self._batch_adaln = bool(on)
        if on:
            self.fuse_adaln_weights()
        else:
            self._adaln_fused = None

    def _adaln_linears(self) -> list[nn.Linear] | None:
        """Every adaLN projection's Linear, or None when a block or the final layer has none (replaced)."""
        seqs = [getattr(o, "adaLN_modulation", None) for o in (*self.blocks, self.final_layer)]
        if not all(isinstance(s, nn.Sequential) and len(s) == 2 and isinstance(s[1], nn.Linear) for s in seqs):
            return None
        return [s[1] for s in seqs]

    @torch.no_grad()
    def fuse_adaln_weights(self) -> None:
        """Move every adaLN projection's weight and bias into one tensor each, as views of it.

        Whatever then changes a weight in place (optimizer steps, EMA updates through .data,
        load_state_dict) changes the fused tensor itself, so the batched GEMM can never read stale
        weights. Anything that gives a Parameter new storage (p.data = ..., assign=True loads, sharding,
        functional_call) breaks the view; the per-call check then routes to one GEMM per block.
        """
        linears = self._adaln_linears()
        if linears is None:
            self._adaln_fused = None
            return
        ws = [lin.weight for lin in linears]
        bs = [lin.bias for lin in linears]
        # Parameters created under inference_mode cannot take views of new storage; keep them as they are.
        if any(_is_sharded(p) or p.is_meta or p.is_inference() for p in ws + bs) or len(
            {(p.dtype, p.device) for p in ws + bs}
        ) != 1:
            self._adaln_fused = None
            return
        weight, bias = torch.cat([w.detach() for w in ws]), torch.cat([b.detach() for b in bs])
        rows = 0
        for w, b in zip(ws, bs):
            n = w.shape[0]
            w.data = weight[rows : rows + n]
            b.data = bias[rows : rows + n]
            rows += n
        self._adaln_fused = (weight, bias)

    def _fused_adaln_intact(self) -> bool:
        fused = self._adaln_fused
        if fused is None:
            return False
        weight, bias = fused
        w_base, b_base = weight.data_ptr(), bias.data_ptr()
        w_row, b_elem = weight.stride(0) * weight.element_size(), bias.element_size()
        rows = 0
        linears = self._adaln_linears()
        if linears is None:
            return False
        for lin in linears:
            w, b = lin.weight, lin.bias
            if (
                w.data_ptr() != w_base + rows * w_row
                or b.data_ptr() != b_base + rows * b_elem
                or w.dtype != weight.dtype
                or b.dtype != bias.dtype
                or w.device != weight.device
                or w.stride() != weight.stride()
                or b.stride() != (1,)
            ):
                return False
            rows += w.shape[0]
        return rows == weight.shape[0]

    def __setstate__(self, state):
        # deepcopy (an EMA copy) and unpickling clone each Parameter on its own: fuse the copies again.
        super().__setstate__(state)
        if getattr(self, "_batch_adaln", False):
            self.fuse_adaln_weights()

    def _apply(self, fn, recurse=True):
        # .to() / .half() / .cuda() give parameters new storage: fuse again on the new one.
        super()._apply(fn, recurse)
        if getattr(self, "_batch_adaln", False):
            self.fuse_adaln_weights()
        return self

    # -- forward -------------------------------------------------------------------------------

    def _check_inputs(self, x, t, y) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"x must be a floating-point tensor [N, C, H, W], got {got}")
        s = self.input_size
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2:] != (s, s):
            raise ValueError(
                f"x must have shape [N, {self.in_channels}, {s}, {s}] (in_channels={self.in_channels}, "
                f"input_size={s}), got {list(x.shape)}"
            )
        n = x.shape[0]
        if not isinstance(t, torch.Tensor) or t.shape not in ((n,), (1,)):
            raise ValueError(
                f"t must be a tensor of shape [{n}] (one timestep per image) or [1] (one for all), got {_desc(t)}"
            )
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"t must hold integer or real timesteps, got dtype {t.dtype}")
        if not isinstance(y, torch.Tensor) or y.shape != (n,) or y.is_floating_point() or y.dtype == torch.bool:
            raise ValueError(f"y must be an integer tensor of shape [{n}] (one class label per image), got {_desc(y)}")
        table = getattr(self.y_embedder, "embedding_table", None)
        n_labels = getattr(table, "num_embeddings", None)
        if n_labels is None or transforms_active():
            # A replaced label embedder checks its own labels; a torch.func transform (vmap over
            # per-sample gradients) allows no data-dependent check.
            return
        if not torch.compiler.is_compiling() and y.device.type == "cpu":
            if n and (int(y.min()) < 0 or int(y.max()) >= n_labels):
                raise ValueError(
                    f"y must hold class labels in [0, {self.num_classes - 1}]"
                    + (f" or {self.num_classes} (the null class)" if n_labels > self.num_classes else "")
                    + f", got values in [{int(y.min())}, {int(y.max())}]"
                )
        else:
            # No host synchronization on the GPU: the check runs on the device, in order with the work.
            torch._assert_async(((y >= 0) & (y < n_labels)).all(), "y holds a class label out of range")

    def _checkpointed(self, i: int) -> bool:
        return (bool(self.checkpoint_every) and self.training and i % self.checkpoint_every == 0
                and torch.is_grad_enabled())

    def _modulations(self, c: torch.Tensor, silu_c: torch.Tensor, owners: list) -> list:
        """The adaLN modulations of every engine-owned consumer, chunked: 6 x [B, D] per block, 2 for the
        final layer; None where the owner is None (a part the model calls as published).

        With a gradient wanted: one GEMM forward and one backward for all of them
        (ops.adaln_projections). Without: one GEMM over the fused weights when they are intact, else
        one per layer (no weight concatenation at inference, where a GEMM at small batch is a read of
        its weight). A projection that is not stock (dit_fast.stock.stock_adaln: a replaced or hooked
        SiLU or Linear, a patched forward) runs the published call adaLN_modulation(c).
        """
        active = [o for o in owners if o is not None]
        chunks = [(4 if o.wo_shift else 6) if isinstance(o, DiTBlock) else 2 for o in active]
        stock = [stock_adaln(o.adaLN_modulation) for o in active]
        if all(stock) and not transforms_active():
            linears = [o.adaLN_modulation[1] for o in active]
            whole = len(active) == len(owners)
            fused_ok = (whole and self._adaln_fused is not None and not torch.compiler.is_compiling()
                        and self._fused_adaln_intact())
            wants_grad = torch.is_grad_enabled() and (
                silu_c.requires_grad or any(lin.weight.requires_grad or lin.bias.requires_grad for lin in linears)
            )
            if wants_grad and _projections_batchable(silu_c, linears):
                mods = iter(_with_shifts(m) for m in ops.adaln_projections(
                    silu_c, [lin.weight for lin in linears], [lin.bias for lin in linears], chunks,
                    fused=self._adaln_fused if fused_ok else None,
                ))
                return [next(mods) if o is not None else None for o in owners]
            if not wants_grad and fused_ok:
                weight, bias = self._adaln_fused
                flat = F.linear(silu_c, weight, bias).split([lin.out_features for lin in linears], 1)
                return [_with_shifts(m.chunk(k, dim=1)) for m, k in zip(flat, chunks)]
        projected = iter(
            _with_shifts((o.adaLN_modulation[1](silu_c) if st else o.adaLN_modulation(c)).chunk(k, dim=1))
            for o, st, k in zip(active, stock, chunks)
        )
        return [next(projected) if o is not None else None for o in owners]

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """x_embedder(x) + pos_embed: one fused op while the patch embedding is stock, else as published."""
        xe = self.x_embedder
        if (type(xe) is PatchEmbed and "forward" not in xe.__dict__ and not has_hooks(xe)
                and stock_patch_proj(xe.proj, self.patch_size) and stock_identity(xe.norm)
                and not transforms_active()):
            proj = xe.proj
            return ops.patch_embed(x, proj.weight, proj.bias, self.pos_embed, self.patch_size, backend=self.backend)
        return xe(x) + self.pos_embed

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids=None) -> torch.Tensor:
        self._check_inputs(x, t, y)
        return published_output(self, self._forward(x, t, y, force_drop_ids))

    def _forward(self, x, t, y, force_drop_ids):
        x = self._embed(x)
        # The published call takes two arguments: a replaced label embedder need not accept a third.
        y_emb = (self.y_embedder(y, self.training) if force_drop_ids is None
                 else self.y_embedder(y, self.training, force_drop_ids))
        c = self.t_embedder(t) + y_emb  # a t of shape [1] broadcasts
        blocks, fl = list(self.blocks), self.final_layer
        # Engine blocks take the carry (hooks on them are honored through it, see _Carry); any other
        # block, or one whose forward was patched on the instance, is called as published.
        engine = [type(b) is DiTBlock and "forward" not in b.__dict__ for b in blocks]
        fl_engine = type(fl) is FinalLayer and "forward" not in fl.__dict__ and not has_hooks(fl)

        if blocks and engine[0] and _is_sharded(blocks[0].adaLN_modulation[1].weight):
            # FSDP2 (fully_shard per block): a block's weights exist only inside its own forward.
            for i, block in enumerate(blocks):
                x = self._call_block(i, block, x, c)
            return self.unpatchify(fl(x, c))

        silu_c = F.silu(c)
        owners = [b if e else None for b, e in zip(blocks, engine)] + [fl if fl_engine else None]
        mods = self._modulations(c, silu_c, owners)
        dim = x.shape[-1]
        h = None
        for i, block in enumerate(blocks):
            if not engine[i]:
                x, h = self._call_block(i, block, x, c), None
                continue
            # The last block ends with a plain gated residual: ops.final_layer reads x once for norm,
            # modulate, linear and unpatchify.
            nxt = blocks[i + 1] if i + 1 < len(blocks) else None
            next_norm = norm_kwargs(nxt.norm1, dim) if nxt is not None and engine[i + 1] else None
            next_mod = None if next_norm is None else (*mods[i + 1][:2], next_norm)
            hooked = has_hooks(block)
            carry = _Carry(c, h, x, mods[i], next_mod, hooked)
            out = self._call_block(i, block, x, c, carry)
            h = carry.h_next_for(out, hooked)
            x = out
        if not fl_engine:
            return self.unpatchify(fl(x, c))
        shift, scale = mods[-1]
        final_norm = norm_kwargs(fl.norm_final, dim)
        if final_norm is not None and stock_linear(fl.linear) and not transforms_active():
            kwargs = {"eps": final_norm["eps"]}
            if "weight" in final_norm:
                kwargs.update(norm=final_norm["norm"], norm_weight=final_norm["weight"])
            return ops.final_layer(x, shift, scale, fl.linear.weight, fl.linear.bias, self.patch_size,
                                   self.out_channels, backend=self.backend, **kwargs)
        return self.unpatchify(fl.tokens(x, shift, scale))

    def _call_block(self, i, block, x, c, carry=None):
        """block(x, c) as published (LightningDiT: block(x, c, feat_rope)), with the carry for engine blocks."""
        args = (x, c, self.feat_rope) if self._passes_rope else (x, c)
        if carry is not None:
            if args[-1] is None:  # an engine block takes feat_rope=None by default
                args = args[:2]
            kwargs = {"carry": carry}
        else:
            kwargs = {}
        if self._checkpointed(i):
            return checkpoint(block, *args, use_reentrant=False, **kwargs)
        return block(*args, **kwargs)

    def initialize_weights(self) -> None:
        """The paper's init, as the published model's method (adaLN and the final layer zeroed)."""
        initialize_dit_weights(self)

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_all_channels: bool = False):
        """Classifier-free guidance, as published (see dit_fast.reference.forward_with_cfg)."""
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] % 2:
            raise ValueError(
                f"forward_with_cfg needs an even batch (conditional half, then unconditional half), "
                f"got x of shape {_desc(x)}"
            )
        return forward_with_cfg(self, x, t, y, cfg_scale, guide_all_channels)


def _fuse_after_load(model: DiT, _incompatible) -> None:
    # load_state_dict(assign=True) replaces Parameters: fuse again so the batched GEMM stays usable.
    if model.batch_adaln and not model._fused_adaln_intact():
        model.fuse_adaln_weights()


def _projections_batchable(silu_c: torch.Tensor, linears: list[nn.Linear]) -> bool:
    """Whether ops.adaln_projections can stand in for these Linears: plain ones, with biases, on silu_c's
    device, and (outside autocast) of silu_c's dtype; anything else runs per layer, as published."""
    dev = silu_c.device
    for lin in linears:
        if type(lin) is not nn.Linear or lin.bias is None:
            return False
        for p in (lin.weight, lin.bias):
            if p.device != dev or _is_sharded(p):
                return False
            if p.dtype != silu_c.dtype and not torch.is_autocast_enabled(dev.type):
                return False
            if p.dtype == torch.float64 and torch.is_autocast_enabled(dev.type):
                return False  # autocast leaves float64 alone; one GEMM in its dtype would not
    return True


def _is_sharded(param: torch.Tensor) -> bool:
    """True for a DTensor parameter (FSDP2 keeps unused blocks' weights sharded as DTensors)."""
    return _DTensor is not None and isinstance(param, _DTensor)


try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch < 2.5 layout, or a build without torch.distributed
    try:
        from torch.distributed._tensor import DTensor as _DTensor
    except ImportError:
        _DTensor = None


def _desc(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"shape {list(v.shape)} dtype {v.dtype}"
    return type(v).__name__


def _reference_config(model: nn.Module) -> dict:
    """Constructor kwargs of a reference-style (or official) DiT instance, read off its modules."""
    hidden = model.pos_embed.shape[-1]
    p = model.x_embedder.proj.kernel_size[0]
    grid = int(round(model.pos_embed.shape[1] ** 0.5))
    block = model.blocks[0]
    swiglu = hasattr(block.mlp, "w12")
    config = dict(
        input_size=grid * p,
        patch_size=p,
        in_channels=model.x_embedder.proj.in_channels,
        hidden_size=hidden,
        depth=len(model.blocks),
        num_heads=block.attn.num_heads,
        mlp_ratio=_swiglu_ratio(block.mlp.w3.in_features, hidden) if swiglu else block.mlp.fc1.out_features / hidden,
        class_dropout_prob=model.y_embedder.dropout_prob,
        num_classes=model.y_embedder.num_classes,
        learn_sigma=model.out_channels != model.x_embedder.proj.in_channels,
    )
    if _is_lightning(model):
        config.update(
            use_qknorm=not isinstance(block.attn.q_norm, nn.Identity), use_swiglu=swiglu,
            use_rope=model.feat_rope is not None, use_rmsnorm=type(block.norm1).__name__ == "RMSNorm",
            wo_shift=block.adaLN_modulation[-1].out_features == 4 * hidden,
            use_checkpoint=bool(getattr(model, "use_checkpoint", False)),
        )
    return config


def _is_lightning(model: nn.Module) -> bool:
    return hasattr(model, "feat_rope") or type(model).__name__ == "LightningDiT"


def _swiglu_ratio(hidden_features: int, hidden: int) -> float:
    """An mlp_ratio whose SwiGLU width (int(2/3 * int(hidden * ratio))) is hidden_features."""
    for ratio in (4.0, round(1.5 * hidden_features / hidden, 6), (1.5 * hidden_features + 1) / hidden):
        if swiglu_hidden_size(hidden, ratio) == hidden_features:
            return ratio
    raise ValueError(f"no mlp_ratio gives a SwiGLU width of {hidden_features} at hidden_size {hidden}")


def from_reference(model: nn.Module, share_weights: bool = False, cls: type | None = None, **kwargs) -> DiT:
    """A fast DiT computing the same function as `model` (a dit_fast.reference.DiT or official instance; a
    SiT or LightningDiT, ours or the official one, gives a fast SiT or LightningDiT).

    share_weights=False copies the weights; True makes the fast model use the very same Parameter
    objects (training either trains both). cls picks the fast class (default: SiT for a SiT, else DiT).
    Extra kwargs (backend=..., attn_backend=...) go to its constructor.
    """
    config = _reference_config(model)
    ref_param = next(model.parameters())
    if cls is None:
        sit = not getattr(model, "returns_sigma", True) or type(model).__name__ == "SiT"
        cls = LightningDiT if _is_lightning(model) else SiT if sit else DiT
    with torch.device("meta"):
        fast = cls(**config, **kwargs)
    if share_weights:
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            owner, _, leaf = name.rpartition(".")
            setattr(fast.get_submodule(owner) if owner else fast, leaf, tensor)
    else:
        fast = fast.to_empty(device=ref_param.device).to(ref_param.dtype)
        fast.load_state_dict(model.state_dict(), strict=True)
    fast.train(model.training)
    return fast


def _with_shifts(chunks: tuple) -> tuple:
    """A block's 6 modulations (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) from its adaLN
    chunks; LightningDiT's scale-only 4 (scale_msa, gate_msa, scale_mlp, gate_mlp) get None shifts. The final
    layer's 2 pass through."""
    if len(chunks) != 4:
        return chunks
    scale_msa, gate_msa, scale_mlp, gate_mlp = chunks
    return None, scale_msa, gate_msa, None, scale_mlp, gate_mlp


class LightningDiT(DiT):
    """Drop-in fast LightningDiT (dit_fast.reference.LightningDiT has the published calls): the published
    constructor (in_channels 32, learn_sigma False; use_qknorm, use_swiglu, use_rope, use_rmsnorm, wo_shift,
    use_checkpoint), state_dict keys (feat_rope's buffers included), forward(x, t, y) and
    forward_with_cfg(x, t, y, cfg_scale, cfg_interval, cfg_interval_start), on the DiT engine: RMSNorm +
    adaLN, SwiGLU and QK-norm + 2D RoPE run as fused ops while their modules are stock."""

    returns_sigma = False
    _passes_rope = True

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 32, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = False, use_qknorm: bool = False,
                 use_swiglu: bool = False, use_rope: bool = False, use_rmsnorm: bool = False, wo_shift: bool = False,
                 use_checkpoint: bool = False, *, backend: str = "auto", attn_backend: str = "auto",
                 checkpoint_every: int | None = None, batch_adaln: bool = False):
        check_lightning_config(hidden_size, num_heads, use_rope)
        self.__dict__["_family_options"] = lightning_family_options(use_qknorm, use_swiglu, use_rope, use_rmsnorm,
                                                                    wo_shift)
        if checkpoint_every is None:  # the published use_checkpoint: every block
            checkpoint_every = 1 if use_checkpoint else 0
        super().__init__(input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio,
                         class_dropout_prob, num_classes, learn_sigma, backend=backend, attn_backend=attn_backend,
                         checkpoint_every=checkpoint_every, batch_adaln=batch_adaln)
        self.use_rope, self.use_rmsnorm, self.use_checkpoint = use_rope, use_rmsnorm, use_checkpoint
        self.depth, self.hidden_size = depth, hidden_size

    def forward(self, x: torch.Tensor, t: torch.Tensor = None, y: torch.Tensor = None, force_drop_ids=None):
        return super().forward(x, t, y, force_drop_ids)

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_interval=None, cfg_interval_start=None):
        """LightningDiT's guidance (dit_fast.reference.lightning_forward_with_cfg): with cfg_interval True, no
        guidance while t[0] < cfg_interval_start."""
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] % 2:
            raise ValueError(
                f"forward_with_cfg needs an even batch (conditional half, then unconditional half), "
                f"got x of shape {_desc(x)}"
            )
        return lightning_forward_with_cfg(self, x, t, y, cfg_scale, cfg_interval, cfg_interval_start)


class SiT(DiT):
    """Drop-in fast SiT: DiT's engine, constructor and state_dict keys; continuous t in [0, 1]; with
    learn_sigma the output is cut to in_channels, as published (dit_fast.reference.SiT)."""

    returns_sigma = False


DiT_models = config_table(DiT)
SiT_models = config_table(SiT, "SiT")
LightningDiT_models = config_table(LightningDiT, "LightningDiT")
