"""Convert DiT weights to and from diffusers' ``DiTTransformer2DModel``.

Layout (read off diffusers' source, checked by tests/test_diffusers.py):

    DiT (official / dit_fast)              diffusers DiTTransformer2DModel
    x_embedder.proj                        pos_embed.proj
    pos_embed (Parameter, saved)           not saved: diffusers rebuilds it as a non-persistent buffer
    t_embedder.mlp.0 / .2                  transformer_blocks.<i>.norm1.emb.timestep_embedder.linear_1 / linear_2
    y_embedder.embedding_table             transformer_blocks.<i>.norm1.emb.class_embedder.embedding_table
                                           (the embedders are stored once per block; the final layer uses block 0's)
    blocks.<i>.adaLN_modulation.1          transformer_blocks.<i>.norm1.linear (same chunk order: shift, scale,
                                           gate of attention, then of the MLP)
    blocks.<i>.attn.qkv [3D, D]            transformer_blocks.<i>.attn1.to_q / to_k / to_v (rows 0:D, D:2D, 2D:3D)
    blocks.<i>.attn.proj                   transformer_blocks.<i>.attn1.to_out.0
    blocks.<i>.mlp.fc1 / fc2               transformer_blocks.<i>.ff.net.0.proj / ff.net.2
    final_layer.adaLN_modulation.1         proj_out_1 (same chunk order: shift, scale)
    final_layer.linear                     proj_out_2

Numerical differences between diffusers' model and the official one (same weights):

1. Timestep frequencies. diffusers embeds t with ``Timesteps(256, flip_sin_to_cos=True,
   downscale_freq_shift=1)``: frequencies exp(-ln(10000) * i / (half - 1)), i < half = 128, where the
   official model uses exp(-ln(10000) * i / half). The channel order ([cos, sin]) and the highest
   frequency (1, at i = 0) agree; every other frequency is lower in diffusers, by a factor
   10000^(-i / (128*127)), down to 0.931 at i = 127 (1.000e-4 against 1.075e-4). The phase error
   t * df grows with t: the relative L2 difference of the 256-vector is 1.3e-3 at t = 1, 0.013 at
   t = 10, 0.13 at t = 100 and 1.01 at t = 999 (0.57 averaged over t = 0..999); single entries differ
   by up to 1.98. So a diffusers DiT and the official DiT with the same weights give different
   outputs. The conversion does NOT change this (it is how each model computes, not a weight);
   setting ``norm1.emb.time_proj.downscale_freq_shift = 0`` in every block of the diffusers model
   makes its embedding bitwise equal to the official one, and then the two models agree to float64
   rounding (tested).
2. LayerNorm eps. diffusers hard-codes eps 1e-6 for the pre-attention norm (``AdaLayerNormZero``) and
   the final norm (``norm_out``), as the official model does, but the pre-MLP norm (``norm3``) takes
   the config's ``norm_eps``, whose default is 1e-5 (what any config that does not set it gets). With
   unit-variance activations that changes the outputs by ~1e-6 relative (measured on random small
   models): far below bf16 rounding, but not the same function. ``dit_to_diffusers`` builds models
   with ``norm_eps=1e-6``; ``from_diffusers`` warns when a config has another value.
3. Label dropout in training mode: each block's copy of the class embedder (and block 0's again for
   the final layer) draws its own random drop, so in ``train()`` a label can be dropped in some blocks
   and kept in others; the official model draws once per forward. Eval mode is unaffected.
Everything else is the same computation: the 2D sin-cos position table at the configured size
(diffusers' base_size = sample_size / patch_size and interpolation_scale = 1 give the same positions;
its table equals dit_fast.get_2d_sincos_pos_embed bitwise in float32), GELU with the tanh
approximation ("gelu-approximate"), attention scale 1/sqrt(head_dim), SiLU before every adaLN linear.
Diffusers also accepts other input sizes by rescaling positions; the official model does not.
"""
from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping

import torch

from .checkpoint import StateDictMismatchError, format_key_problems
from .reference import CONFIGS, get_2d_sincos_pos_embed
from .reference import DiT as ReferenceDiT

__all__ = [
    "to_diffusers",
    "from_diffusers",
    "diffusers_config",
    "dit_from_diffusers",
    "dit_to_diffusers",
    "OFFICIAL_LAYER_NORM_EPS",
]

OFFICIAL_LAYER_NORM_EPS = 1e-6
_INSTALL_HINT = "diffusers is needed for this: pip install dit_fast[diffusers]"

# Per-block parameters that are a plain rename (the qkv split and the embedders are handled apart).
_BLOCK_RENAMES = {
    "adaLN_modulation.1": "norm1.linear",
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
_GLOBAL_RENAMES = {
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.adaLN_modulation.1": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}
# The conditioning embedders, which diffusers keeps inside every block's norm1.emb.
_EMBEDDER_RENAMES = {
    "t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
    "y_embedder.embedding_table": "norm1.emb.class_embedder.embedding_table",
}
_QKV = ("to_q", "to_k", "to_v")


# -- DiT -> diffusers -----------------------------------------------------------------------------


def to_diffusers(state_dict: Mapping[str, torch.Tensor], config: Mapping | None = None) -> dict[str, torch.Tensor]:
    """A DiT state_dict (official keys) as a ``DiTTransformer2DModel`` state_dict.

    config: the DiT constructor kwargs, optional; when given, each one must agree with the shapes.
    The label table must have the null-class row (class_dropout_prob > 0, as in every official
    model): diffusers always has one, and without a config the table is taken to include it.
    The embedders are copied into every block and qkv is split, so the result has no shared storage
    (safe for safetensors). pos_embed is checked against the fixed sin-cos table and dropped:
    diffusers does not store it and rebuilds that table, so any other pos_embed cannot be carried.
    """
    sd = dict(state_dict)
    inferred = _infer_dit_config(sd)
    _check_dit_keys(sd, inferred["depth"])
    if config is not None:
        if config.get("class_dropout_prob", 0.1) <= 0:
            raise ValueError(
                "config: class_dropout_prob=0 (no null-class row), but diffusers' DiT always has one "
                "(its label embedder is built with dropout 0.1); this model cannot be expressed in diffusers"
            )
        _check_config_agrees(config, inferred)
    _check_pos_embed(sd["pos_embed"], inferred["hidden_size"], inferred["input_size"] // inferred["patch_size"])

    out: dict[str, torch.Tensor] = {}
    for dit_name, diff_name in _GLOBAL_RENAMES.items():
        for leaf in ("weight", "bias"):
            out[f"{diff_name}.{leaf}"] = sd[f"{dit_name}.{leaf}"]
    for i in range(inferred["depth"]):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        for dit_name, diff_name in _BLOCK_RENAMES.items():
            for leaf in ("weight", "bias"):
                out[f"{dst}{diff_name}.{leaf}"] = sd[f"{src}{dit_name}.{leaf}"]
        for leaf in ("weight", "bias"):
            for proj, part in zip(_QKV, sd[f"{src}attn.qkv.{leaf}"].chunk(3, dim=0)):
                out[f"{dst}attn1.{proj}.{leaf}"] = part.clone()
        for dit_name, diff_name in _EMBEDDER_RENAMES.items():
            leaves = ("weight",) if dit_name.startswith("y_") else ("weight", "bias")
            for leaf in leaves:
                tensor = sd[f"{dit_name}.{leaf}"]
                out[f"{dst}{diff_name}.{leaf}"] = tensor if i == 0 else tensor.clone()
    return out


def diffusers_config(config: Mapping) -> dict:
    """``DiTTransformer2DModel`` constructor kwargs for a DiT's constructor kwargs (reference defaults fill gaps)."""
    defaults = {k: p.default for k, p in inspect.signature(ReferenceDiT).parameters.items()}
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise ValueError(f"config: unknown DiT constructor argument(s) {unknown}; expected some of {sorted(defaults)}")
    c = {**defaults, **config}
    hidden, heads = c["hidden_size"], c["num_heads"]
    if hidden % heads:
        raise ValueError(f"config: hidden_size ({hidden}) must be a multiple of num_heads ({heads})")
    if c["mlp_ratio"] != 4.0:
        raise ValueError(
            f"config: mlp_ratio={c['mlp_ratio']}, but diffusers' DiTTransformer2DModel fixes the MLP width "
            "at 4 x hidden"
        )
    if c["class_dropout_prob"] <= 0:
        raise ValueError("config: class_dropout_prob=0, but diffusers' DiT always has a null-class row")
    return dict(
        num_attention_heads=heads,
        attention_head_dim=hidden // heads,
        in_channels=c["in_channels"],
        out_channels=c["in_channels"] * 2 if c["learn_sigma"] else c["in_channels"],
        num_layers=c["depth"],
        sample_size=c["input_size"],
        patch_size=c["patch_size"],
        num_embeds_ada_norm=c["num_classes"],
        activation_fn="gelu-approximate",
        attention_bias=True,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        # diffusers' default (1e-5) would change the pre-MLP LayerNorm; the official model uses 1e-6.
        norm_eps=OFFICIAL_LAYER_NORM_EPS,
    )


# -- diffusers -> DiT -----------------------------------------------------------------------------


def from_diffusers(
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping | None = None,
    *,
    num_heads: int | None = None,
    input_size: int | None = None,
    strict_embedders: bool = True,
) -> tuple[dict[str, torch.Tensor], dict]:
    """A ``DiTTransformer2DModel`` state_dict as (DiT state_dict with official keys, DiT constructor kwargs).

    config: the diffusers model's config (``transformer.config``), optional. Shapes give everything
    but two numbers, taken in this order:
      num_heads:  the num_heads argument, else config["num_attention_heads"], else the standard DiT
                  config with this depth and width (DiT-S/B/L/XL, with a warning), else an error;
      input_size: the input_size argument, else config["sample_size"], else an error (diffusers
                  does not store pos_embed, which is regenerated here).
    Block 0's embedders become t_embedder/y_embedder (the ones diffusers' final layer uses); the
    other blocks' copies must be equal to them, else ValueError (strict_embedders=False: a warning).
    """
    sd = dict(state_dict)
    config = dict(config or {})
    shapes = _infer_diffusers_shapes(sd)
    depth, hidden = shapes["depth"], shapes["hidden_size"]
    _check_diffusers_keys(sd, depth)
    _check_diffusers_config(config, shapes)

    heads = _pick_num_heads(num_heads, config, depth, hidden)
    size = input_size if input_size is not None else config.get("sample_size")
    if size is None:
        raise ValueError(
            "input_size is needed: diffusers does not store pos_embed, so the latent size is not in the "
            "weights; pass input_size=... or the diffusers config (sample_size)"
        )
    if config.get("sample_size") is not None and input_size is not None and input_size != config["sample_size"]:
        raise ValueError(f"input_size={input_size} disagrees with config sample_size={config['sample_size']}")
    if size % shapes["patch_size"]:
        raise ValueError(f"input_size ({size}) must be a multiple of patch_size ({shapes['patch_size']})")
    _check_embedders_shared(sd, depth, strict_embedders)

    out: dict[str, torch.Tensor] = {}
    for dit_name, diff_name in _GLOBAL_RENAMES.items():
        for leaf in ("weight", "bias"):
            out[f"{dit_name}.{leaf}"] = sd[f"{diff_name}.{leaf}"]
    for dit_name, diff_name in _EMBEDDER_RENAMES.items():
        leaves = ("weight",) if dit_name.startswith("y_") else ("weight", "bias")
        for leaf in leaves:
            out[f"{dit_name}.{leaf}"] = sd[f"transformer_blocks.0.{diff_name}.{leaf}"]
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for dit_name, diff_name in _BLOCK_RENAMES.items():
            for leaf in ("weight", "bias"):
                out[f"{dst}{dit_name}.{leaf}"] = sd[f"{src}{diff_name}.{leaf}"]
        for leaf in ("weight", "bias"):
            out[f"{dst}attn.qkv.{leaf}"] = torch.cat([sd[f"{src}attn1.{p}.{leaf}"] for p in _QKV], dim=0)
    patch_weight = sd["pos_embed.proj.weight"]
    grid = size // shapes["patch_size"]
    pos = get_2d_sincos_pos_embed(hidden, grid).float().unsqueeze(0)
    out["pos_embed"] = pos.to(device=patch_weight.device, dtype=patch_weight.dtype)
    out = {k: out[k] for k in _dit_keys(depth)}  # the official order

    dit_kwargs = dict(
        input_size=size,
        patch_size=shapes["patch_size"],
        in_channels=shapes["in_channels"],
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        mlp_ratio=shapes["mlp_hidden"] / hidden,
        class_dropout_prob=0.1,  # diffusers builds every DiT label embedder with 0.1 (hence the null row)
        num_classes=shapes["num_labels"] - 1,
        learn_sigma=shapes["learn_sigma"],
    )
    return out, dit_kwargs


# -- whole models ---------------------------------------------------------------------------------


def dit_from_diffusers(transformer, backend: str = "auto", **kwargs):
    """A ``dit_fast.DiT`` computing the official DiT with the weights of a diffusers ``DiTTransformer2DModel``.

    Same device, dtype and train/eval mode as `transformer`; extra kwargs go to dit_fast.DiT
    (e.g. attn_backend). See the module docstring for how the two models differ numerically.
    """
    from .models import DiT

    sd, config = from_diffusers(transformer.state_dict(), transformer.config)
    like = next(transformer.parameters())
    with torch.device("meta"):
        model = DiT(**config, backend=backend, **kwargs)
    model = model.to_empty(device=like.device).to(like.dtype)
    model.load_state_dict(sd, strict=True)
    model.pos_embed.requires_grad_(False)
    return model.train(transformer.training)


def dit_to_diffusers(model):
    """A diffusers ``DiTTransformer2DModel`` holding the weights of a DiT (reference, official or fast).

    Built with norm_eps=1e-6 so that its pre-MLP LayerNorm matches; the timestep-frequency difference
    of diffusers remains (module docstring). Same device, dtype and train/eval mode as `model`.
    """
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    from .models import _reference_config

    config = _reference_config(model)
    like = next(model.parameters())
    state_dict = to_diffusers(model.state_dict(), config)
    # Cast before loading: loading float64 weights into the float32 default would round them.
    transformer = DiTTransformer2DModel(**diffusers_config(config))
    # nn.Module.to: diffusers' own .to(dtype=...) logs a spurious warning about fp32 modules (it has none).
    torch.nn.Module.to(transformer, device=like.device, dtype=like.dtype)
    transformer.load_state_dict(state_dict, strict=True)
    return transformer.train(model.training)


# -- checks and shape inference -------------------------------------------------------------------


def _dit_keys(depth: int) -> list[str]:
    """The official state_dict keys, in the official order."""
    def pair(name):
        return [f"{name}.weight", f"{name}.bias"]

    keys = ["pos_embed", *pair("x_embedder.proj"), *pair("t_embedder.mlp.0"), *pair("t_embedder.mlp.2"),
            "y_embedder.embedding_table.weight"]
    for i in range(depth):
        for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            keys += pair(f"blocks.{i}.{name}")
    return keys + pair("final_layer.linear") + pair("final_layer.adaLN_modulation.1")


def _diffusers_keys(depth: int) -> list[str]:
    keys = []
    for name in _GLOBAL_RENAMES.values():
        keys += [f"{name}.weight", f"{name}.bias"]
    for i in range(depth):
        names = [*_BLOCK_RENAMES.values(), *(f"attn1.{p}" for p in _QKV), *list(_EMBEDDER_RENAMES.values())[:2]]
        for name in names:
            keys += [f"transformer_blocks.{i}.{name}.weight", f"transformer_blocks.{i}.{name}.bias"]
        keys.append(f"transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight")
    return keys


def _count_blocks(sd: Mapping, prefix: str, leaf: str) -> int:
    depth = 0
    while f"{prefix}{depth}.{leaf}" in sd:
        depth += 1
    return depth


def _require(sd: Mapping, key: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise StateDictMismatchError(f"state_dict: {key!r} is missing; is this {what}? Its first keys: {list(sd)[:5]}")
    return sd[key]


def _infer_dit_config(sd: Mapping) -> dict:
    patch_w = _require(sd, "x_embedder.proj.weight", "a DiT state_dict")
    pos = _require(sd, "pos_embed", "a DiT state_dict")
    hidden, in_ch, p = patch_w.shape[0], patch_w.shape[1], patch_w.shape[2]
    tokens = pos.shape[1]
    grid = int(round(tokens**0.5))
    if pos.dim() != 3 or grid * grid != tokens or pos.shape[2] != hidden:
        raise ValueError(f"state_dict: pos_embed must be [1, grid*grid, {hidden}], got {list(pos.shape)}")
    out_ch = _require(sd, "final_layer.linear.weight", "a DiT state_dict").shape[0] // (p * p)
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"state_dict: final_layer gives {out_ch} channels; a DiT gives {in_ch} or {2 * in_ch}")
    return dict(
        input_size=grid * p,
        patch_size=p,
        in_channels=in_ch,
        hidden_size=hidden,
        depth=_count_blocks(sd, "blocks.", "attn.qkv.weight"),
        mlp_ratio=_require(sd, "blocks.0.mlp.fc1.weight", "a DiT state_dict").shape[0] / hidden,
        learn_sigma=out_ch == 2 * in_ch,
        num_labels=_require(sd, "y_embedder.embedding_table.weight", "a DiT state_dict").shape[0],
    )


def _infer_diffusers_shapes(sd: Mapping) -> dict:
    what = "a diffusers DiTTransformer2DModel state_dict"
    patch_w = _require(sd, "pos_embed.proj.weight", what)
    hidden, in_ch, p = patch_w.shape[0], patch_w.shape[1], patch_w.shape[2]
    out_ch = _require(sd, "proj_out_2.weight", what).shape[0] // (p * p)
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(
            f"state_dict: proj_out_2 gives {out_ch} output channels; a DiT gives in_channels ({in_ch}) "
            f"or 2 x in_channels (learn_sigma)"
        )
    table = _require(sd, "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight", what)
    return dict(
        hidden_size=hidden,
        in_channels=in_ch,
        patch_size=p,
        out_channels=out_ch,
        learn_sigma=out_ch == 2 * in_ch,
        depth=_count_blocks(sd, "transformer_blocks.", "attn1.to_q.weight"),
        mlp_hidden=_require(sd, "transformer_blocks.0.ff.net.0.proj.weight", what).shape[0],
        num_labels=table.shape[0],
    )


def _check_dit_keys(sd: Mapping, depth: int) -> None:
    expected = _dit_keys(depth)
    _raise_on_key_problems(sd, expected, "DiT")


def _check_diffusers_keys(sd: Mapping, depth: int) -> None:
    _raise_on_key_problems(sd, _diffusers_keys(depth), "diffusers DiTTransformer2DModel")


def _raise_on_key_problems(sd: Mapping, expected: list[str], what: str) -> None:
    want = set(expected)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in want]
    if missing or unexpected:
        raise StateDictMismatchError(
            f"state_dict does not have the keys of a {what} with {_count_from(expected)} blocks:\n"
            + format_key_problems(missing, unexpected, [])
        )


def _count_from(keys: list[str]) -> int:
    return len({k.split(".")[1] for k in keys if k.startswith(("blocks.", "transformer_blocks."))})


def _check_config_agrees(config: Mapping, inferred: Mapping) -> None:
    for name, value in inferred.items():
        if name != "num_labels" and name in config and config[name] != value:
            raise ValueError(f"config: {name}={config[name]!r}, but the state_dict's shapes give {value!r}")
    if "num_classes" in config:
        rows = config["num_classes"] + int(config.get("class_dropout_prob", 0.1) > 0)
        if rows != inferred["num_labels"]:
            raise ValueError(
                f"config: num_classes={config['num_classes']} means a label table of {rows} rows, but the "
                f"state_dict's has {inferred['num_labels']}"
            )
    if "num_heads" in config and inferred["hidden_size"] % config["num_heads"]:
        raise ValueError(
            f"config: num_heads={config['num_heads']} does not divide hidden_size {inferred['hidden_size']}"
        )


def _check_diffusers_config(config: Mapping, shapes: Mapping) -> None:
    if not config:
        return
    wrong = {
        key: (config[key], want)
        for key, want in (
            ("norm_type", "ada_norm_zero"),
            ("activation_fn", "gelu-approximate"),
            ("norm_elementwise_affine", False),
            ("attention_bias", True),
        )
        if key in config and config[key] != want
    }
    if wrong:
        raise ValueError(
            "config: not a DiT the official model can compute: "
            + ", ".join(f"{k}={got!r} (the official DiT has {want!r})" for k, (got, want) in wrong.items())
        )
    checks = (
        ("in_channels", shapes["in_channels"]),
        ("out_channels", shapes["out_channels"]),
        ("patch_size", shapes["patch_size"]),
        ("num_layers", shapes["depth"]),
        ("num_embeds_ada_norm", shapes["num_labels"] - 1),
    )
    for key, value in checks:
        if config.get(key) is not None and config[key] != value:
            raise ValueError(f"config: {key}={config[key]!r}, but the state_dict's shapes give {value!r}")
    heads, head_dim = config.get("num_attention_heads"), config.get("attention_head_dim")
    if heads is not None and head_dim is not None and heads * head_dim != shapes["hidden_size"]:
        raise ValueError(
            f"config: num_attention_heads x attention_head_dim = {heads} x {head_dim} != the weights' width "
            f"{shapes['hidden_size']}"
        )
    eps = config.get("norm_eps")
    if eps is not None and eps != OFFICIAL_LAYER_NORM_EPS:
        warnings.warn(
            f"the diffusers config has norm_eps={eps} (the pre-MLP LayerNorm); the official DiT uses "
            f"{OFFICIAL_LAYER_NORM_EPS} there, so the converted model's outputs differ slightly from diffusers'",
            stacklevel=3,
        )


def _pick_num_heads(num_heads, config: Mapping, depth: int, hidden: int) -> int:
    from_config = config.get("num_attention_heads")
    if num_heads is not None and from_config is not None and num_heads != from_config:
        raise ValueError(f"num_heads={num_heads} disagrees with config num_attention_heads={from_config}")
    heads = num_heads if num_heads is not None else from_config
    if heads is None:
        known = {(d, h): (name.split("/")[0], n) for name, (d, h, _, n) in CONFIGS.items()}
        if (depth, hidden) not in known:
            raise ValueError(
                f"num_heads is needed: it is not in the weights and depth {depth} / width {hidden} is no "
                "standard DiT config; pass num_heads=... or the diffusers config"
            )
        name, heads = known[(depth, hidden)]
        warnings.warn(
            f"num_heads not given: assuming {heads}, the {name} value for depth {depth} and width {hidden}",
            stacklevel=3,
        )
    if heads <= 0 or hidden % heads:
        raise ValueError(f"num_heads={heads} must be a positive divisor of the width {hidden}")
    return heads


def _check_embedders_shared(sd: Mapping, depth: int, strict: bool) -> None:
    for i in range(1, depth):
        for diff_name in _EMBEDDER_RENAMES.values():
            for leaf in ("weight", "bias"):
                key0 = f"transformer_blocks.0.{diff_name}.{leaf}"
                if key0 not in sd:
                    continue
                a, b = sd[key0], sd[f"transformer_blocks.{i}.{diff_name}.{leaf}"]
                if torch.equal(a, b):
                    continue
                msg = (
                    f"transformer_blocks.{i}.{diff_name}.{leaf} differs from block 0's copy (max abs diff "
                    f"{(a.double() - b.double()).abs().max().item():.3g}): the official DiT has one timestep "
                    "and one class embedder shared by all blocks, so it cannot compute this model"
                )
                if strict:
                    raise ValueError(msg + "; pass strict_embedders=False to use block 0's copies")
                warnings.warn(msg + "; using block 0's copies (the ones diffusers' final layer uses)", stacklevel=3)
                return


def _check_pos_embed(pos: torch.Tensor, hidden: int, grid: int) -> None:
    table = get_2d_sincos_pos_embed(hidden, grid).unsqueeze(0)
    # The canonical table is stored in float32 (then maybe cast): allow that rounding, nothing more.
    tol = max(torch.finfo(pos.dtype).eps, torch.finfo(torch.float32).eps) if pos.is_floating_point() else 0.0
    err = (pos.detach().double().cpu() - table).abs().max().item()
    if not err <= tol:
        raise ValueError(
            f"state_dict: pos_embed is not the fixed 2D sin-cos table (max abs diff {err:.3g}); diffusers "
            "does not store pos_embed but rebuilds that table, so this pos_embed cannot be converted"
        )
