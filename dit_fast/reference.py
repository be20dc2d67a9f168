"""The DiT of Peebles & Xie ("Scalable Diffusion Models with Transformers"), in plain PyTorch.

This is the yardstick every fast path is measured against: module names, parameter shapes, the
weight init and the forward semantics follow the published model, so official checkpoints load
into it with ``strict=True``. It favours clarity over speed on purpose.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .configs import CONFIGS, LIGHTNING_CONFIGS
from .lightning_modules import RMSNorm, SwiGLUFFN, VisionRotaryEmbeddingFast, swiglu_hidden_size

__all__ = [
    "DiT",
    "DiT_models",
    "SiT",
    "SiT_models",
    "LightningDiT",
    "LightningDiT_models",
    "CONFIGS",
    "get_2d_sincos_pos_embed",
    "timestep_embedding",
    "modulate",
    "forward_with_cfg",
]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: [cos(t*f), sin(t*f)], f = max_period^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2D sin-cos table [grid_size**2, dim] in float64.

    Token k sits at row k // grid_size, column k % grid_size; the first half of the channels
    encodes the column, the second half the row (the published layout, which checkpoints rely on).
    """
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1)


class PatchEmbed(nn.Module):
    """Image to patch tokens; the attributes of timm's PatchEmbed, which the published model uses."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = True
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)
        self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    timestep_embedding = staticmethod(timestep_embedding)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size)
        # The published model feeds float32 here, which breaks a float64 or bf16 model; cast to the
        # weights' dtype (a no-op for float32 weights, and autocast casts anyway).
        dtype = next((p.dtype for p in self.mlp.parameters() if p.is_floating_point()), t_freq.dtype)
        return self.mlp(t_freq.to(dtype))


class LabelEmbedder(nn.Module):
    """Class labels to vectors; in training a label becomes the null class with probability dropout_prob."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, self.num_classes, labels)

    def forward(self, labels, train: bool, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """timm's Attention as the published DiT builds it (qkv_bias=True, timm >= 1.0): the same submodules
    (q_norm, k_norm, attn_drop, norm, proj_drop; Identity and inactive Dropout by default) and the same
    switch, ``fused_attn``: True (timm's default) runs F.scaled_dot_product_attention, False the explicit
    softmax, whose probabilities pass through attn_drop (so a hook there sees the attention maps).

    LightningDiT's variant (``scale_norm_slot=False``): no ``norm`` submodule, q_norm/k_norm from
    ``qk_norm`` (a factory of a head_dim norm, e.g. RMSNorm), and the rotary embedding passed to forward."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 qk_norm=None, scale_norm_slot: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = True
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = qk_norm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = qk_norm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        if scale_norm_slot:
            self.norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        return attention_published(self, x, rope)


def attention_published(attn: nn.Module, x: torch.Tensor, rope=None) -> torch.Tensor:
    """The published attention's calls, in order, on any module with timm Attention's attributes (LightningDiT's:
    the rotary embedding module applied to q and k after their norms; no ``norm`` submodule)."""
    B, L, _ = x.shape
    q, k, v = attn.qkv(x).reshape(B, L, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        q, k = rope(q), rope(k)
    if attn.fused_attn:
        p = attn.attn_drop.p if attn.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
    else:
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        out = attn.attn_drop(scores.softmax(dim=-1)) @ v
    out = out.transpose(1, 2).reshape(B, L, attn.num_heads * attn.head_dim)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    return attn.proj_drop(attn.proj(out))


class Mlp(nn.Module):
    """timm's Mlp as the published DiT builds it (tanh GELU, drop=0): fc1, act, drop1, norm, fc2, drop2."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mlp_published(self, x)


def mlp_published(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The published MLP's calls, in order, on any module with timm Mlp's attributes."""
    return mlp.drop2(mlp.fc2(mlp.norm(mlp.drop1(mlp.act(mlp.fc1(x))))))


def modulate_published(x: torch.Tensor, shift, scale: torch.Tensor) -> torch.Tensor:
    """modulate with LightningDiT's scale-only case (shift None)."""
    if shift is None:
        return x * (1 + scale.unsqueeze(1))
    return modulate(x, shift, scale)


class DiTBlock(nn.Module):
    """The published block. DiT/SiT: ``block(x, c)``; LightningDiT's options (RMSNorm, SwiGLU, QK-norm, a
    scale-only adaLN with 4 chunks) and its ``block(x, c, feat_rope)`` are the same block configured.
    The fast engine's block builds the same tree from its own Attention and Mlp (attention_cls, mlp_cls)."""

    attention_cls: type = None  # Attention (set below, once the class exists)
    mlp_cls: type = None  # Mlp

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, *, use_qknorm: bool = False,
                 use_swiglu: bool = False, use_rmsnorm: bool = False, wo_shift: bool = False,
                 layout: str = "dit"):
        super().__init__()
        # The published module order: DiT's norm1, attn, norm2; LightningDiT's norm1, norm2, attn (no attn.norm).
        self.norm1 = block_norm(hidden_size, use_rmsnorm)
        if layout == "lightning":
            self.norm2 = block_norm(hidden_size, use_rmsnorm)
        qk_norm = (RMSNorm if use_rmsnorm else nn.LayerNorm) if use_qknorm else None
        self.attn = self.attention_cls(hidden_size, num_heads, qk_norm=qk_norm, scale_norm_slot=layout == "dit")
        if layout == "dit":
            self.norm2 = block_norm(hidden_size, use_rmsnorm)
        if use_swiglu:
            self.mlp = SwiGLUFFN(hidden_size, swiglu_hidden_size(hidden_size, mlp_ratio))
        else:
            self.mlp = self.mlp_cls(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (4 if wo_shift else 6) * hidden_size))
        self.wo_shift = wo_shift

    def forward(self, x: torch.Tensor, c: torch.Tensor, feat_rope=None) -> torch.Tensor:
        mods = split_modulations(self.adaLN_modulation(c), self.wo_shift)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate_published(self.norm1(x), shift_msa, scale_msa),
                                                  **({} if feat_rope is None else {"rope": feat_rope}))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate_published(self.norm2(x), shift_mlp, scale_mlp))
        return x


DiTBlock.attention_cls, DiTBlock.mlp_cls = Attention, Mlp


def split_modulations(mods: torch.Tensor, wo_shift: bool) -> tuple:
    """(shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) from a block's adaLN output: 6 chunks,
    or with wo_shift LightningDiT's 4 (scale_msa, gate_msa, scale_mlp, gate_mlp), the shifts None."""
    if not wo_shift:
        return mods.chunk(6, dim=1)
    scale_msa, gate_msa, scale_mlp, gate_mlp = mods.chunk(4, dim=1)
    return None, scale_msa, gate_msa, None, scale_mlp, gate_mlp


def block_norm(hidden_size: int, use_rmsnorm: bool) -> nn.Module:
    return RMSNorm(hidden_size) if use_rmsnorm else nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, use_rmsnorm: bool = False):
        super().__init__()
        self.norm_final = block_norm(hidden_size, use_rmsnorm)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion transformer with adaLN-Zero conditioning, exactly as published."""

    returns_sigma = True  # forward's output includes the learned-sigma channels (SiT's does not)
    _family_options: dict = {}  # build_modules' options (LightningDiT sets its own per instance)

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True):
        super().__init__()
        build_dit(self, DiTBlock, FinalLayer, input_size, patch_size, in_channels, hidden_size, depth, num_heads,
                  mlp_ratio, class_dropout_prob, num_classes, learn_sigma)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        initialize_dit_weights(self)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, T, p*p*C] -> [N, C, H, W]."""
        c, p = self.out_channels, self.x_embedder.patch_size[0]
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)
        return published_output(self, self.unpatchify(x))

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_all_channels: bool = False):
        return forward_with_cfg(self, x, t, y, cfg_scale, guide_all_channels)


def build_dit(model, block_cls, final_cls, input_size, patch_size, in_channels, hidden_size, depth, num_heads,
              mlp_ratio, class_dropout_prob, num_classes, learn_sigma) -> None:
    """Check the published constructor's arguments, set the published attributes and build the modules (with
    the model's family options): the body both engines' DiT constructors share."""
    check_config(
        input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
        depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
        num_classes=num_classes,
    )
    model.learn_sigma = learn_sigma
    model.in_channels = in_channels
    model.out_channels = in_channels * 2 if learn_sigma else in_channels
    model.patch_size = patch_size
    model.num_heads = num_heads
    model.input_size = input_size
    model.num_classes = num_classes
    build_modules(model, block_cls, final_cls, input_size, patch_size, in_channels, hidden_size, depth, num_heads,
                  mlp_ratio, class_dropout_prob, num_classes, **model._family_options)


def build_modules(model, block_cls, final_cls, input_size, patch_size, in_channels, hidden_size, depth, num_heads,
                  mlp_ratio, class_dropout_prob, num_classes, use_rope=False, block_options=None,
                  use_rmsnorm=False) -> None:
    """The published modules, in the published order (x_embedder, t_embedder, y_embedder, pos_embed, LightningDiT's
    feat_rope, blocks, final_layer), shared by every family and by the reference and the fast engine."""
    model.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
    model.t_embedder = TimestepEmbedder(hidden_size)
    model.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
    # Fixed, but a Parameter so that it is saved in (and loaded from) checkpoints like the original.
    model.pos_embed = nn.Parameter(torch.zeros(1, model.x_embedder.num_patches, hidden_size), requires_grad=False)
    if block_options is not None:  # LightningDiT: feat_rope is a module, or the attribute None
        grid = input_size // patch_size
        model.feat_rope = VisionRotaryEmbeddingFast(hidden_size // num_heads // 2, grid) if use_rope else None
    options = block_options or {}
    model.blocks = nn.ModuleList([block_cls(hidden_size, num_heads, mlp_ratio, **options) for _ in range(depth)])
    model.final_layer = final_cls(hidden_size, patch_size, model.out_channels, use_rmsnorm=use_rmsnorm)


def lightning_family_options(use_qknorm, use_swiglu, use_rope, use_rmsnorm, wo_shift) -> dict:
    """build_modules' options for a LightningDiT (both engines' LightningDiT constructors)."""
    block = dict(use_qknorm=use_qknorm, use_swiglu=use_swiglu, use_rmsnorm=use_rmsnorm, wo_shift=wo_shift,
                 layout="lightning")
    return dict(use_rope=use_rope, use_rmsnorm=use_rmsnorm, block_options=block)


class LightningDiT(DiT):
    """LightningDiT (Yao et al.; hustvl/LightningDiT): DiT's engine with RMSNorm, SwiGLU, 2D RoPE, QK-norm and a
    scale-only adaLN as options; the published constructor (learn_sigma False and in_channels 32 by default),
    state_dict keys (feat_rope's buffers included), forward and forward_with_cfg (with the CFG interval)."""

    returns_sigma = False

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 32, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = False, use_qknorm: bool = False,
                 use_swiglu: bool = False, use_rope: bool = False, use_rmsnorm: bool = False, wo_shift: bool = False,
                 use_checkpoint: bool = False):
        check_lightning_config(hidden_size, num_heads, use_rope)
        self.__dict__["_family_options"] = lightning_family_options(use_qknorm, use_swiglu, use_rope, use_rmsnorm,
                                                                    wo_shift)
        super().__init__(input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio,
                         class_dropout_prob, num_classes, learn_sigma)
        self.use_rope, self.use_rmsnorm, self.use_checkpoint = use_rope, use_rmsnorm, use_checkpoint
        self.depth, self.hidden_size = depth, hidden_size

    def forward(self, x: torch.Tensor, t: torch.Tensor = None, y: torch.Tensor = None) -> torch.Tensor:
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            if self.use_checkpoint:
                x = checkpoint(block, x, c, self.feat_rope, use_reentrant=True)
            else:
                x = block(x, c, self.feat_rope)
        x = self.final_layer(x, c)
        return published_output(self, self.unpatchify(x))

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_interval=None, cfg_interval_start=None):
        return lightning_forward_with_cfg(self, x, t, y, cfg_scale, cfg_interval, cfg_interval_start)


def check_lightning_config(hidden_size: int, num_heads: int, use_rope: bool) -> None:
    head_dim = hidden_size // num_heads
    if use_rope and head_dim % 4:
        raise ValueError(f"use_rope needs head_dim = hidden_size / num_heads divisible by 4 (2D rotary pairs per "
                         f"axis), got {head_dim}")


def lightning_forward_with_cfg(model, x, t, y, cfg_scale, cfg_interval=None, cfg_interval_start=None):
    """LightningDiT's guidance: DiT's on the first 3 channels; with cfg_interval True, no guidance while
    t[0] < cfg_interval_start (the whole batch shares one t, as its sampler calls it)."""
    half = x[: len(x) // 2]
    out = model.forward(torch.cat([half, half], dim=0), t, y)
    eps, rest = out[:, :3], out[:, 3:]
    cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
    guided = uncond + cfg_scale * (cond - uncond)
    if cfg_interval is True and t[0] < cfg_interval_start:
        guided = cond
    return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)


class SiT(DiT):
    """SiT (Ma et al., "SiT: Exploring Flow and Diffusion-based Generative Models with Scalable Interpolant
    Transformers"): DiT's network, constructor and state_dict keys, with continuous t in [0, 1]; with
    learn_sigma its forward returns only the first in_channels output channels, as published."""

    returns_sigma = False


def published_output(model: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """The model's output as its family publishes it: all channels (DiT), or without the learned-sigma
    half (SiT: ``returns_sigma = False``)."""
    if model.returns_sigma or not model.learn_sigma:
        return out
    return out.chunk(2, dim=1)[0]


def check_config(**config) -> None:
    """Refuse a DiT configuration the model cannot compute, naming the argument (shared by both models)."""
    for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
        v = config[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    ratio, p_drop = config["mlp_ratio"], config["class_dropout_prob"]
    if (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0
            or int(config["hidden_size"] * ratio) < 1):
        raise ValueError(f"mlp_ratio must be a number > 0 giving at least one hidden unit, got {ratio!r}")
    if isinstance(p_drop, bool) or not isinstance(p_drop, (int, float)) or not 0 <= p_drop <= 1:
        raise ValueError(f"class_dropout_prob must be a number in [0, 1], got {p_drop!r}")
    if config["hidden_size"] % config["num_heads"]:
        raise ValueError(f"hidden_size ({config['hidden_size']}) must be divisible by "
                         f"num_heads ({config['num_heads']})")
    if config["input_size"] % config["patch_size"]:
        raise ValueError(
            f"input_size ({config['input_size']}) must be a multiple of patch_size ({config['patch_size']})"
        )


def forward_with_cfg(model: nn.Module, x, t, y, cfg_scale, guide_all_channels: bool = False):
    """Classifier-free guidance; the batch's second half holds the null labels.

    The first half of x is run twice (labels y give the conditional, the null labels the
    unconditional prediction). The published sampler guides only the first 3 channels (that
    reproduces the reported FID); ``guide_all_channels=True`` guides all ``in_channels`` instead.
    The remaining channels pass through unguided.
    """
    half = x[: len(x) // 2]
    out = model.forward(torch.cat([half, half], dim=0), t, y)
    n_guided = model.in_channels if guide_all_channels else 3
    eps, rest = out[:, :n_guided], out[:, n_guided:]
    cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
    guided = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)


def initialize_dit_weights(model: nn.Module) -> None:
    """The paper's init: xavier Linear weights, zero biases, N(0, 0.02) embeddings, zeroed adaLN and output.

    Works on any module tree with the DiT attribute names (the reference and the fast model).
    """
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    grid = int(model.x_embedder.num_patches**0.5)
    pos = get_2d_sincos_pos_embed(model.pos_embed.shape[-1], grid)
    model.pos_embed.data.copy_(pos.float().unsqueeze(0))
    w = model.x_embedder.proj.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.x_embedder.proj.bias)
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for block in model.blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    nn.init.zeros_(model.final_layer.adaLN_modulation[-1].weight)
    nn.init.zeros_(model.final_layer.adaLN_modulation[-1].bias)
    nn.init.zeros_(model.final_layer.linear.weight)
    nn.init.zeros_(model.final_layer.linear.bias)


def _config_factory(cls, name: str, family: str):
    if family == "LightningDiT":
        depth, hidden, patch, heads = LIGHTNING_CONFIGS[name]
    else:
        depth, hidden, patch, heads = CONFIGS["DiT" + name[len(family):]]

    def build(**kwargs):
        return cls(depth=depth, hidden_size=hidden, patch_size=patch, num_heads=heads, **kwargs)

    build.__name__ = name.replace("-", "_").replace("/", "_")
    build.__doc__ = f"{name}: depth {depth}, hidden {hidden}, patch {patch}, {heads} heads."
    return build


class ConfigTable(dict):
    """name -> constructor, like the published DiT_models dict; an unknown name says which exist."""

    family = "DiT"

    def __missing__(self, name):
        raise KeyError(f"unknown {self.family} config {name!r}; known configs: {', '.join(self)}")


def config_table(cls, family: str = "DiT") -> ConfigTable:
    """The published name -> constructor table of a family ("DiT-XL/2", or "SiT-XL/2" with family="SiT")."""
    names = LIGHTNING_CONFIGS if family == "LightningDiT" else (family + name[len("DiT"):] for name in CONFIGS)
    table = ConfigTable({name: _config_factory(cls, name, family) for name in names})
    table.family = family
    return table


DiT_models = config_table(DiT)
SiT_models = config_table(SiT, "SiT")
LightningDiT_models = config_table(LightningDiT, "LightningDiT")
