"""Exact matrix-multiply work of a DiT, from its configuration.

Counted: every GEMM and convolution (patch embedding, QKV, attention's QK^T and PV, proj, fc1,
fc2, the adaLN projections, the final linear, the timestep MLP), as multiply-accumulates (MACs).
Not counted: norms, softmax, activations, elementwise and embedding lookups. That is the
convention of the DiT paper (Table 4: DiT-XL/2 = 118.64 "Gflops", which are GMACs); this count
gives 118.62 for DiT-XL/2 at 256px and matches all twelve published sizes to their two decimals
within 0.02%. FLOPs = 2 x MACs; a training step (forward + backward) is 3 x the forward.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..reference import CONFIGS

FREQUENCY_EMBEDDING_SIZE = 256  # sinusoidal timestep features fed to the t-embedder MLP
LATENT_DOWNSAMPLE = 8  # the SD VAE: a 256px image is a 32x32 latent


@dataclass(frozen=True)
class DiTShape:
    depth: int
    hidden_size: int
    patch_size: int
    num_heads: int
    input_size: int  # latent side
    in_channels: int = 4
    learn_sigma: bool = True
    mlp_ratio: float = 4.0

    @property
    def tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    def as_dict(self) -> dict:
        return asdict(self) | {"tokens": self.tokens}


def shape_for(model_name: str, image_size: int = 256, depth: int | None = None) -> DiTShape:
    if model_name not in CONFIGS:
        raise ValueError(f"model must be one of {sorted(CONFIGS)}, got {model_name!r}")
    if image_size % LATENT_DOWNSAMPLE:
        raise ValueError(f"image_size must be a multiple of {LATENT_DOWNSAMPLE}, got {image_size}")
    d, hidden, patch, heads = CONFIGS[model_name]
    return DiTShape(depth if depth is not None else d, hidden, patch, heads, image_size // LATENT_DOWNSAMPLE)


def shape_of(model) -> DiTShape:
    """The shape of a built model (reference or fast: same attribute names)."""
    block = model.blocks[0]
    hidden = model.pos_embed.shape[-1]
    return DiTShape(
        depth=len(model.blocks),
        hidden_size=hidden,
        patch_size=model.patch_size,
        num_heads=model.num_heads,
        input_size=model.input_size,
        in_channels=model.in_channels,
        learn_sigma=model.out_channels != model.in_channels,
        mlp_ratio=block.mlp.fc1.out_features / hidden,
    )


def forward_macs_per_image(s: DiTShape) -> dict[str, int]:
    """MACs of one image's forward, per kind of GEMM (the adaLN/t-embedder GEMMs act on one vector per image)."""
    L, D, p = s.tokens, s.hidden_size, s.patch_size
    H = int(D * s.mlp_ratio)
    n = s.depth
    return {
        "patch_embed": L * (s.in_channels * p * p) * D,
        "t_embedder": FREQUENCY_EMBEDDING_SIZE * D + D * D,
        "adaLN": n * D * 6 * D + D * 2 * D,
        "qkv": n * L * D * 3 * D,
        "attention_qk": n * L * L * D,
        "attention_pv": n * L * L * D,
        "proj": n * L * D * D,
        "fc1": n * L * D * H,
        "fc2": n * L * H * D,
        "final_linear": L * D * (p * p * s.out_channels),
    }


def forward_flops_per_image(s: DiTShape) -> int:
    return 2 * sum(forward_macs_per_image(s).values())


MODES = ("fwd", "cfg", "train")


def flops_per_step(s: DiTShape, mode: str, batch: int) -> int:
    """FLOPs of one benchmark step on `batch` images.

    fwd: one forward. cfg: forward_with_cfg runs one forward on the whole batch (its conditional
    half twice: once with labels, once with the null label), so the same count. train: forward +
    backward = 3 x forward (the optimizer's elementwise update is not counted).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    f = forward_flops_per_image(s) * batch
    return 3 * f if mode == "train" else f
