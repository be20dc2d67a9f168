"""kernels.common.sum_partials: per-sample sums over chunks, and totals over the batch (the bias
gradients of attn.proj / mlp.fc2 come out of the same launch as the modulation gradients)."""
import pytest
import torch

from conftest import DEVICE, needs_triton


@needs_triton
@pytest.mark.parametrize("B,n_chunks,K,D,totals", [
    (1, 1, 1, 1, ()),
    (3, 2, 2, 40, (False, True)),
    (70, 3, 4, 40, (False, True, False, True)),  # B over one tile of rows: several row tiles
    (5, 1, 3, 1152, (True,)),
    (4, 2, 5, 40, (False, True, False, False, True)),  # RMS adaLN with bias and gain: dweight a total too
])
def test_sums_and_totals_match_float64(B, n_chunks, K, D, totals):
    from dit_fast.kernels import adaln
    from dit_fast.kernels.common import sum_partials

    part = torch.randn(B, n_chunks, K, D, device=DEVICE)
    dtypes = [torch.bfloat16 if k % 2 else torch.float32 for k in range(K)]
    with adaln.poison_outputs():
        outs = sum_partials(part, dtypes, totals)
    ref = part.double().sum(1)  # [B, K, D]
    flags = tuple(totals) + (False,) * (K - len(totals))
    for k, (out, dt, tot) in enumerate(zip(outs, dtypes, flags)):
        want = ref[:, k].sum(0) if tot else ref[:, k]
        assert out.dtype == dt and out.shape == want.shape
        tol = 1e-6 if dt == torch.float32 else 8e-3
        torch.testing.assert_close(out.double().cpu(), want.cpu(), rtol=tol, atol=tol * max(1.0, B ** 0.5))
    again = sum_partials(part, dtypes, totals)
    assert all(torch.equal(a, b) for a, b in zip(outs, again))  # fixed order: bitwise reproducible


@needs_triton
def test_bad_flags_are_refused():
    from dit_fast.kernels.common import sum_partials

    with pytest.raises(ValueError, match="totals"):
        sum_partials(torch.zeros(2, 1, 1, 4, device=DEVICE), (torch.float32,), (True, False))
    with pytest.raises(ValueError, match="K=6"):
        sum_partials(torch.zeros(2, 1, 6, 4, device=DEVICE), (torch.float32,) * 6)
