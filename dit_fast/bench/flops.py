"""Exact matrix-multiply work of a DiT-family model (DiT, SiT, LightningDiT), from its configuration.

Counted: every GEMM and convolution (patch embedding, QKV, attention's QK^T and PV, proj, fc1,
fc2, the adaLN projections, the final linear, the timestep MLP), as multiply-accumulates (MACs).
Not counted: norms, softmax, activations, elementwise and embedding lookups. That is the
convention of the DiT paper (Table 4: DiT-XL/2 = 118.64 "Gflops", which are GMACs); this count
gives 118.62 for DiT-XL/2 at 256px and matches all twelve published sizes to their two decimals
within 0.02%. FLOPs = 2 x MACs; a training step (forward + backward) is 3 x the forward.
LightningDiT: SwiGLU's packed w12 (D -> 2H) and w3 (H -> D) in place of fc1/fc2 (H = int(2/3 * 4D)), a
scale-only adaLN (wo_shift) projects to 4D instead of 6D; RMSNorm, RoPE and QK-norm are elementwise (not
counted). SiT has DiT's network exactly.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..configs import CONFIGS, LIGHTNING_CONFIGS

FREQUENCY_EMBEDDING_SIZE = 256  # sinusoidal timestep features fed to the t-embedder MLP
LATENT_DOWNSAMPLE = 8  # the SD VAE: a 256px image is a 32x32 latent
FAMILIES = ("DiT", "SiT", "LightningDiT")
# LightningDiT's tokenizer, VA-VAE f16d32: a 256px image is a 16x16 latent of 32 channels
LIGHTNING_DOWNSAMPLE, LIGHTNING_CHANNELS = 16, 32
# LightningDiT's constructor switches, by their short names (use_<name>, and wo_shift)
LIGHTNING_OPTIONS = ("qknorm", "swiglu", "rope", "rmsnorm", "wo_shift")
LIGHTNING_RECIPE = ("swiglu", "rope", "rmsnorm")  # the published XL/1 recipe (FID 1.35)


def model_names() -> list[str]:
    """Every published name the benchmarks take: DiT-*, SiT-* (DiT's 12 sizes) and LightningDiT-*."""
    return [*CONFIGS, *("SiT" + n[len("DiT"):] for n in CONFIGS), *LIGHTNING_CONFIGS]


def family_of(model_name: str) -> str:
    for family in ("LightningDiT", "SiT", "DiT"):
        if model_name.startswith(family + "-"):
            return family
    raise ValueError(f"model must be one of {model_names()}, got {model_name!r}")


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
    family: str = "DiT"  # "DiT" | "SiT" | "LightningDiT"
    options: tuple[str, ...] = ()  # LightningDiT's switches that are on (LIGHTNING_OPTIONS)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        bad = [o for o in self.options if o not in LIGHTNING_OPTIONS]
        if bad or (self.options and self.family != "LightningDiT"):
            raise ValueError(f"options must be LightningDiT switches ({', '.join(LIGHTNING_OPTIONS)}) of a "
                             f"LightningDiT shape, got {self.options!r} for family {self.family!r}")

    @property
    def tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def out_channels(self) -> int:
        """Channels of the final linear layer (with learned sigma: twice in_channels)."""
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def returned_channels(self) -> int:
        """Channels of forward's output: SiT and LightningDiT cut the learned-sigma half, DiT returns it."""
        return self.out_channels if self.family == "DiT" else self.in_channels

    @property
    def flow(self) -> bool:
        """Trained and sampled with dit_fast.transport (continuous t in [0, 1]), not DDPM."""
        return self.family != "DiT"

    @property
    def swiglu(self) -> bool:
        return "swiglu" in self.options

    @property
    def mlp_hidden(self) -> int:
        from ..lightning_modules import swiglu_hidden_size

        if self.swiglu:
            return swiglu_hidden_size(self.hidden_size, self.mlp_ratio)
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def adaln_chunks(self) -> int:
        return 4 if "wo_shift" in self.options else 6

    def constructor_kwargs(self) -> dict:
        """Keyword arguments of the family's published constructor (num_classes aside)."""
        kwargs = dict(input_size=self.input_size, patch_size=self.patch_size, in_channels=self.in_channels,
                      hidden_size=self.hidden_size, depth=self.depth, num_heads=self.num_heads,
                      mlp_ratio=self.mlp_ratio, learn_sigma=self.learn_sigma)
        if self.family == "LightningDiT":
            kwargs |= {("wo_shift" if o == "wo_shift" else f"use_{o}"): o in self.options for o in LIGHTNING_OPTIONS}
        return kwargs

    def as_dict(self) -> dict:
        return asdict(self) | {"tokens": self.tokens, "options": list(self.options)}


def parse_lightning_options(text: str | None) -> tuple[str, ...]:
    """LightningDiT's switches from a comma list ("qknorm,wo_shift"; "recipe" = the XL/1 recipe, "none" = all
    off); None gives the recipe. Returned in LIGHTNING_OPTIONS order."""
    if text is None:
        return LIGHTNING_RECIPE
    items = [s.strip() for s in text.split(",") if s.strip()]
    chosen: set[str] = set()
    for item in items:
        if item == "recipe":
            chosen |= set(LIGHTNING_RECIPE)
        elif item in LIGHTNING_OPTIONS:
            chosen.add(item)
        elif item != "none":
            raise ValueError(f"expected LightningDiT options among {', '.join(LIGHTNING_OPTIONS)}, recipe or none, "
                             f"got {item!r}")
    return tuple(o for o in LIGHTNING_OPTIONS if o in chosen)


def shape_for(model_name: str, image_size: int = 256, depth: int | None = None,
              options: tuple[str, ...] | None = None) -> DiTShape:
    """The benchmark shape of a published model name at image_size pixels. LightningDiT: latents of the f16
    VA-VAE (32 channels, image_size / 16), no learned sigma, `options` (default: LIGHTNING_RECIPE)."""
    family = family_of(model_name)
    if family == "LightningDiT":
        configs, key, downsample = LIGHTNING_CONFIGS, model_name, LIGHTNING_DOWNSAMPLE
        latents = dict(in_channels=LIGHTNING_CHANNELS, learn_sigma=False,
                       options=LIGHTNING_RECIPE if options is None else tuple(options))
    else:  # DiT and SiT share the DiT configs and the SD VAE's latents
        if options:
            raise ValueError(f"options are LightningDiT's switches, got {options!r} for {model_name!r}")
        configs, key, downsample = CONFIGS, "DiT" + model_name[len(family):], LATENT_DOWNSAMPLE
        latents = {}
    if key not in configs:
        raise ValueError(f"model must be one of {model_names()}, got {model_name!r}")
    if image_size % downsample:
        raise ValueError(f"image_size must be a multiple of {downsample}, got {image_size}")
    d, hidden, patch, heads = configs[key]
    return DiTShape(depth if depth is not None else d, hidden, patch, heads, image_size // downsample,
                    family=family, **latents)


def shape_of(model) -> DiTShape:
    """The shape of a built model (reference or fast, any family: same attribute names)."""
    block = model.blocks[0]
    hidden = model.pos_embed.shape[-1]
    name = type(model).__name__
    family = name if name in FAMILIES else "DiT"
    options: tuple[str, ...] = ()
    mlp_ratio = block.mlp.fc1.out_features / hidden if hasattr(block.mlp, "fc1") else 4.0
    if family == "LightningDiT":
        on = {"qknorm": type(block.attn.q_norm).__name__ != "Identity", "swiglu": hasattr(block.mlp, "w12"),
              "rope": getattr(model, "feat_rope", None) is not None,
              "rmsnorm": type(block.norm1).__name__ == "RMSNorm",
              "wo_shift": block.adaLN_modulation[-1].out_features == 4 * hidden}
        options = tuple(o for o in LIGHTNING_OPTIONS if on[o])
    return DiTShape(
        depth=len(model.blocks),
        hidden_size=hidden,
        patch_size=model.patch_size,
        num_heads=model.num_heads,
        input_size=model.input_size,
        in_channels=model.in_channels,
        learn_sigma=model.out_channels != model.in_channels,
        mlp_ratio=mlp_ratio,
        family=family,
        options=options,
    )


def forward_macs_per_image(s: DiTShape) -> dict[str, int]:
    """MACs of one image's forward, per kind of GEMM (the adaLN/t-embedder GEMMs act on one vector per image).
    With SwiGLU, fc1 is the packed w12 (D -> 2H) and fc2 is w3 (H -> D)."""
    L, D, p = s.tokens, s.hidden_size, s.patch_size
    H = s.mlp_hidden
    n = s.depth
    return {
        "patch_embed": L * (s.in_channels * p * p) * D,
        "t_embedder": FREQUENCY_EMBEDDING_SIZE * D + D * D,
        "adaLN": n * D * s.adaln_chunks * D + D * 2 * D,
        "qkv": n * L * D * 3 * D,
        "attention_qk": n * L * L * D,
        "attention_pv": n * L * L * D,
        "proj": n * L * D * D,
        "fc1": n * L * D * H * (2 if s.swiglu else 1),
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
