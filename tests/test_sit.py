"""SiT on the DiT engine: the published configs, constructor, state_dict keys and forward semantics.

SiT's network is DiT's with continuous t in [0, 1]; with learn_sigma its forward returns only the first
in_channels channels, and forward_with_cfg guides the first 3 of those. dit_fast.reference.SiT is the
yardstick (checked against the official willisma/SiT models.py with timm 1.0.31 on random weights:
relative error <= 5e-7, see the closing note of the session that added it).
"""
import pytest
import torch

import dit_fast
from dit_fast import reference
from dit_fast.testing import randomize_weights_
from model_pairs import assert_same_step
from tolerances import FP32_RTOL, rel_err


def test_the_published_config_names():
    names = [f"SiT-{s}/{p}" for s in ("XL", "L", "B", "S") for p in (2, 4, 8)]
    assert sorted(dit_fast.SiT_models) == sorted(names)
    assert sorted(reference.SiT_models) == sorted(names)
    model = dit_fast.SiT_models["SiT-S/8"](input_size=16, num_classes=10)
    assert type(model) is dit_fast.SiT
    assert (len(model.blocks), model.pos_embed.shape[-1], model.patch_size, model.num_heads) == (12, 384, 8, 6)
    with pytest.raises(KeyError, match="SiT-XL/2"):
        dit_fast.SiT_models["SiT-XXL/2"]


def test_state_dict_keys_are_dits():
    kw = dict(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    assert list(dit_fast.SiT(**kw).state_dict()) == list(reference.DiT(**kw).state_dict())


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
@pytest.mark.parametrize("learn_sigma,patch", [(True, 2), (False, 4)])
def test_forward_and_cfg_match_the_published_sit(backend, learn_sigma, patch, one_thread):
    ref = reference.SiT(input_size=8, patch_size=patch, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                        learn_sigma=learn_sigma)
    randomize_weights_(ref).eval()
    fast = dit_fast.from_reference(ref, backend=backend).eval()
    assert type(fast) is dit_fast.SiT
    x, t, y = torch.randn(4, 4, 8, 8), torch.rand(4), torch.randint(0, 10, (4,))
    with torch.no_grad():
        out = fast(x, t, y)
        assert out.shape == (4, 4, 8, 8), "SiT returns in_channels channels, learned sigma or not"
        assert rel_err(out, ref(x, t, y)) < FP32_RTOL
        assert rel_err(fast.forward_with_cfg(x, t, y, 4.0), ref.forward_with_cfg(x, t, y, 4.0)) < FP32_RTOL
        full = dit_fast.from_reference(ref, backend=backend, cls=dit_fast.DiT).eval()(x, t, y)
    assert full.shape[1] == (8 if learn_sigma else 4)
    assert torch.equal(out, full[:, :4])


def test_a_one_element_t_broadcasts_and_gradients_flow():
    ref = reference.SiT(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    randomize_weights_(ref)
    fast = dit_fast.from_reference(ref, backend="torch")
    x, y = torch.randn(3, 4, 8, 8), torch.randint(0, 10, (3,))
    t = torch.tensor([0.25])
    assert_same_step(fast, ref, x, t, y, seed=1)
