"""dit_fast: a fast, drop-in Diffusion Transformer (DiT).

    from dit_fast import DiT_models, from_reference, load_checkpoint
    model = DiT_models["DiT-XL/2"](input_size=32)
"""
from . import ops, reference
from .models import DiT, DiT_models, from_reference
from .reference import get_2d_sincos_pos_embed

__version__ = "0.1.0"
__all__ = ["DiT", "DiT_models", "from_reference", "ops", "reference", "get_2d_sincos_pos_embed"]
