"""Host overhead table: the launcher stub really stops kernels, and every op/backend gets a row or a reason."""
import math

import torch

from dit_fast.bench.overhead import measure, stubbed_triton_launches


def test_stub_stops_triton_launches_and_is_undone():
    from dit_fast.kernels import adaln as K

    x, y, gate = torch.randn(1, 4, 8), torch.randn(1, 4, 8), torch.randn(1, 8)
    with K.poison_outputs():
        with stubbed_triton_launches():
            out = K.gated_residual_fwd(x, y, gate)
        assert torch.isnan(out).all()  # nothing wrote the poisoned output
        out = K.gated_residual_fwd(x, y, gate)
    torch.testing.assert_close(out, x + gate[:, None] * y)


def test_overhead_rows_cover_every_backend_with_and_without_autograd():
    rows = measure("cpu", rounds=1, ops=["gated_residual", "patch_embed"])
    by = {(r["op"], r["backend"], r["grad"]): r for r in rows}
    assert len(by) == 2 * 3 * 2
    for key, r in by.items():
        assert "error" not in r, r
        if key[:2] == ("patch_embed", "ext"):
            assert "no patch_embed" in r["na"] and "us_per_call" not in r
        else:
            assert r["us_per_call"] > 0 and math.isfinite(r["us_per_call"]), r
    assert by[("gated_residual", "triton", "yes")]["launcher"] == "stubbed"
    assert by[("gated_residual", "ext", "no")]["launcher"] == "real"
