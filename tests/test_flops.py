"""The FLOP model of the benchmarks (dit_fast.bench.flops) against the paper and torch's own counter."""
from dataclasses import replace

import pytest
import torch

from dit_fast.bench.flops import flops_per_step, forward_flops_per_image, forward_macs_per_image, shape_for

# DiT paper, Table 4: forward "Gflops" per 256px image (GMACs), two decimals.
PAPER_GMACS = {
    "DiT-XL/2": 118.64, "DiT-XL/4": 29.05, "DiT-XL/8": 7.39,
    "DiT-L/2": 80.71, "DiT-L/4": 19.70, "DiT-L/8": 5.01,
    "DiT-B/2": 23.01, "DiT-B/4": 5.56, "DiT-B/8": 1.42,
    "DiT-S/2": 6.06, "DiT-S/4": 1.41, "DiT-S/8": 0.36,
}


def test_dit_xl2_is_118_6_gmacs():
    s = shape_for("DiT-XL/2", 256)
    gmacs = sum(forward_macs_per_image(s).values()) / 1e9
    assert abs(gmacs - 118.6) / 118.6 < 1e-3, gmacs
    assert forward_flops_per_image(s) == 2 * sum(forward_macs_per_image(s).values())
    assert abs(forward_flops_per_image(s) / 1e9 - 237.2) < 0.1


@pytest.mark.parametrize("name", sorted(PAPER_GMACS))
def test_matches_paper_table(name):
    gmacs = sum(forward_macs_per_image(shape_for(name, 256)).values()) / 1e9
    # the paper rounds to two decimals: allow that rounding plus 0.1%
    assert abs(gmacs - PAPER_GMACS[name]) <= 0.005 + 1e-3 * PAPER_GMACS[name], (name, gmacs)


def test_modes_and_512px():
    s256, s512 = shape_for("DiT-XL/2", 256), shape_for("DiT-XL/2", 512)
    assert s512.tokens == 4 * s256.tokens == 1024
    assert flops_per_step(s256, "train", 4) == 3 * flops_per_step(s256, "fwd", 4) == 12 * forward_flops_per_image(s256)
    assert flops_per_step(s256, "cfg", 4) == flops_per_step(s256, "fwd", 4)
    # attention grows with L^2, the rest with L: more than 4x the work per image at 4x the tokens
    assert forward_flops_per_image(s512) > 4 * forward_flops_per_image(s256)
    with pytest.raises(ValueError, match="mode"):
        flops_per_step(s256, "sample", 1)
    with pytest.raises(ValueError, match="model"):
        shape_for("DiT-XXL/2")


@pytest.mark.parametrize("name,input_size,depth", [("DiT-S/2", 8, 2), ("DiT-B/4", 16, 1)])
def test_matches_torch_flop_counter(name, input_size, depth):
    """An independent count: torch.utils.flop_counter on the reference model (GEMMs, convs, attention bmm)."""
    from torch.utils.flop_counter import FlopCounterMode

    from dit_fast.bench.contenders import build_reference, set_reference_attention

    s = replace(shape_for(name, 256, depth=depth), input_size=input_size)
    # the explicit attention path: FlopCounterMode counts its two bmm, not the CPU SDPA kernel
    model = set_reference_attention(build_reference(s, "cpu"), math=True)
    n = 3
    x = torch.randn(n, 4, input_size, input_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, torch.rand(n) * 1000, torch.randint(0, 1000, (n,)))
    assert counter.get_total_flops() == flops_per_step(s, "fwd", n)
