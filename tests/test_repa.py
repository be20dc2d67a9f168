"""REPA-style training on the fused path: the features of block k through a hook that only reads, the
projector, the negative-cosine alignment loss; loss and gradients equal the reference model's, and the
fused path (the carried next norm) stays on."""
import copy

import pytest
import torch

import dit_fast
from dit_fast import ops, reference
from dit_fast.repa import BlockFeatures, alignment_loss, build_projector
from dit_fast.testing import randomize_weights_
from dit_fast.transport import create_transport
from tolerances import FP32_RTOL, rel_err


def _loss(model, projector, x, y, target, seed):
    features = BlockFeatures(model, encoder_depth=2)
    torch.manual_seed(seed)
    transport = create_transport("Linear", "velocity")
    loss = transport.training_losses(model, x, dict(y=y))["loss"].mean()
    loss = loss + 0.5 * alignment_loss([projector(features.pop())], [target])
    features.remove()
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_repa_loss_and_gradients_match_the_reference_on_the_fused_path(backend, monkeypatch, one_thread):
    ref = reference.SiT(input_size=8, patch_size=2, hidden_size=32, depth=3, num_heads=2, num_classes=10)
    randomize_weights_(ref).train()
    fast = dit_fast.from_reference(ref, backend=backend).train()
    ref.y_embedder.dropout_prob = fast.y_embedder.dropout_prob = 0.0  # no label draws: t and x0 only
    proj_ref = build_projector(32, 24, 12)
    proj_fast = copy.deepcopy(proj_ref)
    x, y, target = torch.randn(2, 4, 8, 8), torch.randint(0, 10, (2,)), torch.randn(2, 16, 12)

    calls = []
    real = ops.adaln_modulate
    monkeypatch.setattr(ops, "adaln_modulate", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = _loss(fast, proj_fast, x, y, target, seed=3)
    assert len(calls) == 1, "a reading hook keeps the carried norm: one stand-alone adaln_modulate (block 0's)"
    want = _loss(ref, proj_ref, x, y, target, seed=3)
    assert rel_err(got, want) < FP32_RTOL
    for (n, p), q in zip([*fast.named_parameters(), *proj_fast.named_parameters()],
                         [*ref.parameters(), *proj_ref.parameters()]):
        if q.grad is not None:
            assert rel_err(p.grad, q.grad) < 1e-4, n


def test_alignment_loss_is_the_mean_negative_cosine():
    a, b = torch.randn(3, 5, 7, dtype=torch.float64), torch.randn(3, 5, 7, dtype=torch.float64)
    want = -torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()
    assert torch.allclose(alignment_loss([a], [b]), want)
    assert torch.allclose(alignment_loss([a, a], [b, a]), (want - 1) / 2)
    with pytest.raises(ValueError, match="projected\\[0\\] and targets\\[0\\]"):
        alignment_loss([a], [b[:, :4]])


def test_bad_arguments_are_named():
    model = dit_fast.SiT(input_size=8, patch_size=2, hidden_size=32, depth=3, num_heads=2, num_classes=10)
    with pytest.raises(ValueError, match="encoder_depth must be an int in \\[1, 3\\]"):
        BlockFeatures(model, 4)
    with pytest.raises(RuntimeError, match="run the model's forward first"):
        BlockFeatures(model, 1).pop()
    with pytest.raises(ValueError, match="projector_dim"):
        build_projector(32, 0)
