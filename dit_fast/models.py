"""The fast DiT: same constructor, state_dict keys and forward semantics as dit_fast.reference.DiT.

What differs is how a forward runs (DESIGN.md section 2):
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

from . import ops
from .attention import attention
from .backends import check_backend_name
from .reference import (
    LabelEmbedder,
    TimestepEmbedder,
    config_table,
    forward_with_cfg,
    initialize_dit_weights,
)

__all__ = ["DiT", "DiT_models", "from_reference"]


class PatchEmbed(nn.Module):
    """Holds the patch projection as the published Conv2d (same state_dict keys); runs it as a GEMM."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.backend = "auto"

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(attention(self.qkv(h), self.num_heads, self.backend))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.backend = "auto"

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(ops.linear_gelu_tanh(h, self.fc1.weight, self.fc1.bias, backend=self.backend))


class DiTBlock(nn.Module):
    """One transformer block, called in one of two ways (always through the module, so hooks,
    wrappers and FSDP see every call):

    carried, the fast path: ``block(x, carried=(h, gate_msa, shift_mlp, scale_mlp, gate_mlp,
    next_shift, next_scale)) -> (x, h_next)``. h = modulate(norm1(x)) was produced by the previous
    op, and h_next is the next consumer's modulate(norm(x)) under (next_shift, next_scale): the norm
    of the next sub-layer rides on this block's last residual. next_shift=None ends the chain
    (h_next is None).

    self-contained: ``block(x, silu_c) -> x`` computes the block's own modulations. The model uses
    it when blocks are sharded (FSDP2 fully_shard per block), since then only a block's own forward
    may touch its weights.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        # SiLU stays in the Sequential so the Linear keeps its published key "adaLN_modulation.1";
        # the model applies SiLU(c) once for all blocks and calls only the Linear.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.backend = "auto"

    def modulation(self, silu_c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.adaLN_modulation[1](silu_c).chunk(6, dim=1)

    def forward(self, x: torch.Tensor, silu_c: torch.Tensor | None = None, *, carried=None, h_dtype=None):
        if carried is None:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(silu_c)
            h = ops.adaln_modulate(x, shift_msa, scale_msa, h_dtype=h_dtype, backend=self.backend)
            return self._run(x, h, gate_msa, shift_mlp, scale_mlp, gate_mlp, None, None, h_dtype)[0]
        return self._run(x, *carried, h_dtype)

    def _run(self, x, h, gate_msa, shift_mlp, scale_mlp, gate_mlp, next_shift, next_scale, h_dtype):
        x, h = ops.gated_residual_adaln(
            x, self.attn(h), gate_msa, shift_mlp, scale_mlp, h_dtype=h_dtype, backend=self.backend
        )
        m = self.mlp(h)
        if next_shift is None:
            return ops.gated_residual(x, m, gate_mlp, backend=self.backend), None
        return ops.gated_residual_adaln(x, m, gate_mlp, next_shift, next_scale, h_dtype=h_dtype, backend=self.backend)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))


class DiT(nn.Module):
    """Drop-in fast DiT.

    Same keyword arguments as the published model, plus:
      backend: "auto" | "triton" | "ext" | "torch" for the fused ops (env DIT_FAST_BACKEND overrides "auto");
      attn_backend: attention kernel ("auto", "sdpa", "math", flash-attn when installed);
      checkpoint_every: recompute every k-th block's activations in backward (0 = off, 1 = all blocks);
      batch_adaln: without autograd, run all adaLN projections as one GEMM on a cached concatenation
        of their weights (costs that copy's memory: a third of the weights; off = one GEMM per block).
    """

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
        batch_adaln: bool = True,
    ):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        if input_size % patch_size:
            raise ValueError(f"input_size ({input_size}) must be a multiple of patch_size ({patch_size})")
        if checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.input_size = input_size
        self.num_classes = num_classes
        self.checkpoint_every = checkpoint_every
        self.batch_adaln = batch_adaln
        self._adaln_cache = None

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.set_backend(backend, attn_backend)
        initialize_dit_weights(self)

    def set_backend(self, backend: str | None = None, attn_backend: str | None = None) -> "DiT":
        """Switch the kernel family of the fused ops and/or the attention kernel (no weights change)."""
        if backend is not None:
            self.backend = check_backend_name(backend)
        if attn_backend is not None:
            self.attn_backend = attn_backend
        for block in self.blocks:
            block.backend = block.mlp.backend = self.backend
            block.attn.backend = self.attn_backend
        return self

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return ops.unpatchify(x, self.patch_size, self.out_channels)

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
        if not isinstance(t, torch.Tensor) or t.shape != (n,):
            raise ValueError(f"t must be a tensor of shape [{n}] (one timestep per image), got {_desc(t)}")
        if not isinstance(y, torch.Tensor) or y.shape != (n,) or y.is_floating_point() or y.dtype == torch.bool:
            raise ValueError(f"y must be an integer tensor of shape [{n}] (one class label per image), got {_desc(y)}")
        n_labels = self.y_embedder.embedding_table.num_embeddings
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

    def _h_dtype(self, x: torch.Tensor):
        # Under autocast the next GEMM would cast h anyway: writing it in the autocast dtype saves that pass.
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return None

    def _checkpointed(self, i: int) -> bool:
        return bool(self.checkpoint_every) and self.training and i % self.checkpoint_every == 0 and torch.is_grad_enabled()

    def _adaln_linears(self) -> list[nn.Linear]:
        return [b.adaLN_modulation[1] for b in self.blocks] + [self.final_layer.adaLN_modulation[1]]

    def _modulations(self, silu_c: torch.Tensor) -> list[torch.Tensor]:
        """Every adaLN projection of the model: [B, 6D] per block, then the final layer's [B, 2D].

        Without autograd they run as one GEMM on a cached concatenation of the weights (rebuilt when a
        weight changes: in-place updates bump the tensors' versions). Under autograd each runs on its own
        weight: concatenating every step would copy a third of the model's weights.
        """
        linears = self._adaln_linears()
        if not self.batch_adaln or torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and any(l.weight.requires_grad or l.bias.requires_grad for l in linears)
        ):
            return [l(silu_c) for l in linears]
        weight, bias = self._batched_adaln_weight(linears, silu_c)
        return list(F.linear(silu_c, weight, bias).split([l.out_features for l in linears], dim=1))

    def _batched_adaln_weight(self, linears, silu_c):
        dtype = torch.get_autocast_dtype(silu_c.device.type) if torch.is_autocast_enabled(silu_c.device.type) else None
        key = (dtype, tuple((t.data_ptr(), t._version) for l in linears for t in (l.weight, l.bias)))
        if self._adaln_cache is None or self._adaln_cache[0] != key:
            weight = torch.cat([l.weight.detach() for l in linears])
            bias = torch.cat([l.bias.detach() for l in linears])
            if dtype is not None:  # store what autocast would cast to, once
                weight, bias = weight.to(dtype), bias.to(dtype)
            self._adaln_cache = (key, weight, bias)
        return self._adaln_cache[1], self._adaln_cache[2]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids=None) -> torch.Tensor:
        self._check_inputs(x, t, y)
        p = self.patch_size
        x = ops.patch_embed(x, self.x_embedder.proj.weight, self.x_embedder.proj.bias, self.pos_embed, p, backend=self.backend)
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)
        silu_c = F.silu(c)
        h_dtype = self._h_dtype(x)

        if _is_sharded(self.blocks[0].adaLN_modulation[1].weight):
            for i, block in enumerate(self.blocks):
                if self._checkpointed(i):
                    x = checkpoint(block, x, silu_c, h_dtype=h_dtype, use_reentrant=False)
                else:
                    x = block(x, silu_c, h_dtype=h_dtype)
            final_shift, final_scale = self.final_layer.adaLN_modulation[1](silu_c).chunk(2, dim=1)
        else:
            *mods, final_mod = self._modulations(silu_c)
            mods = [m.chunk(6, dim=1) for m in mods]
            final_shift, final_scale = final_mod.chunk(2, dim=1)
            h = ops.adaln_modulate(x, mods[0][0], mods[0][1], h_dtype=h_dtype, backend=self.backend)
            for i, block in enumerate(self.blocks):
                nxt = mods[i + 1][:2] if i + 1 < len(self.blocks) else (None, None)
                carried = (h, *mods[i][2:], *nxt)
                if self._checkpointed(i):
                    x, h = checkpoint(block, x, carried=carried, h_dtype=h_dtype, use_reentrant=False)
                else:
                    x, h = block(x, carried=carried, h_dtype=h_dtype)
        fl = self.final_layer.linear
        return ops.final_layer(x, final_shift, final_scale, fl.weight, fl.bias, p, self.out_channels, backend=self.backend)

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_all_channels: bool = False):
        """Classifier-free guidance, as published (see dit_fast.reference.forward_with_cfg)."""
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] % 2:
            raise ValueError(
                f"forward_with_cfg needs an even batch (conditional half, then unconditional half), "
                f"got x of shape {_desc(x)}"
            )
        return forward_with_cfg(self, x, t, y, cfg_scale, guide_all_channels)


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
    return dict(
        input_size=grid * p,
        patch_size=p,
        in_channels=model.x_embedder.proj.in_channels,
        hidden_size=hidden,
        depth=len(model.blocks),
        num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / hidden,
        class_dropout_prob=model.y_embedder.dropout_prob,
        num_classes=model.y_embedder.num_classes,
        learn_sigma=model.out_channels != model.x_embedder.proj.in_channels,
    )


def from_reference(model: nn.Module, share_weights: bool = False, **kwargs) -> DiT:
    """A fast DiT computing the same function as `model` (a dit_fast.reference.DiT or official instance).

    share_weights=False copies the weights; True makes the fast model use the very same Parameter
    objects (training either trains both). Extra kwargs (backend=..., attn_backend=...) go to DiT.
    """
    config = _reference_config(model)
    ref_param = next(model.parameters())
    with torch.device("meta"):
        fast = DiT(**config, **kwargs)
    if share_weights:
        for name, param in model.named_parameters():
            owner, _, leaf = name.rpartition(".")
            setattr(fast.get_submodule(owner) if owner else fast, leaf, param)
    else:
        fast = fast.to_empty(device=ref_param.device).to(ref_param.dtype)
        fast.load_state_dict(model.state_dict(), strict=True)
    fast.train(model.training)
    return fast


DiT_models = config_table(DiT)
