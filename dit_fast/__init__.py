"""dit_fast: a fast, drop-in Diffusion Transformer (DiT).

    from dit_fast import DiT_models, load_checkpoint
    model = DiT_models["DiT-XL/2"](input_size=32)
    load_checkpoint(model, "DiT-XL-2-256x256.pt")
"""
from . import convert_diffusers, diffusion, ops, reference, transport
from .checkpoint import load_checkpoint, save_checkpoint
from .convert_diffusers import dit_from_diffusers, dit_to_diffusers
from .diffusion import create_diffusion
from .flow_sampling import sample_flow
from .models import DiT, DiT_models, LightningDiT, LightningDiT_models, SiT, SiT_models, from_reference
from .reference import get_2d_sincos_pos_embed
from .sampling import sample
from .transport import create_transport

__version__ = "0.1.0"
__all__ = [
    "DiT",
    "DiT_models",
    "SiT",
    "SiT_models",
    "LightningDiT",
    "LightningDiT_models",
    "from_reference",
    "load_checkpoint",
    "save_checkpoint",
    "dit_from_diffusers",
    "dit_to_diffusers",
    "convert_diffusers",
    "ops",
    "reference",
    "get_2d_sincos_pos_embed",
    "diffusion",
    "create_diffusion",
    "sample",
    "sample_flow",
    "transport",
    "create_transport",
]
