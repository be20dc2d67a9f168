"""The fast DiT as a training backbone, on the CPU: autocast, torch.compile, activation
checkpointing, a short training run against the reference (the training example script:
test_train_script.py).
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from dit_fast import reference
from dit_fast.models import from_reference
from dit_fast.testing import randomize_weights_
from tolerances import assert_close

# DiT-S/2 widths (hidden 384, 6 heads of 64) at depth 2 on an 8x8 latent (16 tokens).
SMALL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=384, depth=2, num_heads=6,
             num_classes=10, class_dropout_prob=0.0)
TINY = dict(SMALL, hidden_size=64, num_heads=2)


# Tiny models: one thread (conftest's fixture)
pytestmark = pytest.mark.usefixtures("one_thread")


def make_pair(config=SMALL):
    """A reference DiT with random weights and a fast copy of it (training mode, no label dropout)."""
    ref = randomize_weights_(reference.DiT(**config)).train()
    return ref, from_reference(ref).train()


def make_inputs(config, n=4, dtype=torch.float32):
    s = config["input_size"]
    x = torch.randn(n, config["in_channels"], s, s, dtype=dtype)
    t = torch.randint(0, 1000, (n,)).to(dtype)
    y = torch.randint(0, config["num_classes"], (n,))
    return x, t, y


def flat_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])


def run_fwd_bwd(model, x, t, y, grad_out, autocast_dtype=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = model(x, t, y)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), flat_grads(model)


def float64_reference(ref, x, t, y, grad_out):
    ref64 = copy.deepcopy(ref).double()
    return run_fwd_bwd(ref64, x.double(), t.double(), y, grad_out.double())


def _cpu_autocast_supports(dtype) -> bool:
    try:
        with torch.autocast("cpu", dtype=dtype):
            return torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == dtype
    except (RuntimeError, ValueError):
        return False


# -- autocast ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_matches_reference(dtype):
    if not _cpu_autocast_supports(dtype):
        pytest.skip(f"this torch has no CPU autocast for {dtype}")
    ref, fast = make_pair()
    x, t, y = make_inputs(SMALL)
    grad_out = torch.randn(4, 8, 8, 8)
    out64, grads64 = float64_reference(ref, x, t, y, grad_out)
    eager_out, eager_grads = run_fwd_bwd(ref, x, t, y, grad_out, autocast_dtype=dtype)
    out, grads = run_fwd_bwd(fast, x, t, y, grad_out, autocast_dtype=dtype)
    assert out.dtype == eager_out.dtype == dtype
    assert_close(out, out64, dtype, eager_lowp=eager_out, name="autocast output")
    assert_close(grads, grads64, dtype, eager_lowp=eager_grads, name="autocast param grads")
    assert all(p.grad.dtype == torch.float32 for p in fast.parameters() if p.requires_grad)


# -- torch.compile ----------------------------------------------------------------------------------


def _check_compiled(compile_backend, config=SMALL, model_backend=None, autocast_dtype=None):
    ref, fast = make_pair(config)
    if model_backend:
        fast.set_backend(model_backend)
    x, t, y = make_inputs(config)
    grad_out = torch.randn(4, 2 * config["in_channels"], config["input_size"], config["input_size"])
    eager_out, eager_grads = run_fwd_bwd(fast, x, t, y, grad_out, autocast_dtype)
    torch._dynamo.reset()
    compiled = torch.compile(fast, fullgraph=True, backend=compile_backend)
    out, grads = run_fwd_bwd(compiled, x, t, y, grad_out, autocast_dtype)
    out64, grads64 = float64_reference(ref, x, t, y, grad_out)
    if autocast_dtype is None:
        assert_close(out, eager_out.double(), torch.float32, name=f"{compile_backend} output vs eager")
        assert_close(grads, eager_grads.double(), torch.float32, name=f"{compile_backend} grads vs eager")
        assert_close(out, out64, torch.float32, name=f"{compile_backend} output")
        assert_close(grads, grads64, torch.float32, name=f"{compile_backend} param grads")
    else:  # the reference model under autocast sets the bound
        ref_out, ref_grads = run_fwd_bwd(ref, x, t, y, grad_out, autocast_dtype)
        assert_close(out, out64, autocast_dtype, eager_lowp=ref_out, name=f"{compile_backend} output")
        assert_close(grads, grads64, autocast_dtype, eager_lowp=ref_grads, name=f"{compile_backend} param grads")


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
def test_compile_aot_eager_fullgraph(autocast_dtype):
    _check_compiled("aot_eager", autocast_dtype=autocast_dtype)


@pytest.mark.slow
def test_compile_inductor_fullgraph():
    _check_compiled("inductor", config=dict(TINY, depth=1))


def test_compile_fullgraph_with_triton_kernels():
    # The Triton ops are registered custom ops: opaque to dynamo, run by the interpreter here.
    from dit_fast.backends import probe

    ok, why = probe("triton", "cpu")
    if not ok:
        pytest.skip(f"triton backend: {why}")
    _check_compiled("aot_eager", config=dict(TINY, depth=1), model_backend="triton")


FRESH_PROCESS_COMPILE = """
import torch
from dit_fast.models import DiT
model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10)
x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 500.0]), torch.tensor([0, 3])
torch.compile(model, fullgraph=True, backend="aot_eager")(x, t, y).sum().backward()
"""


def test_compile_fullgraph_first_thing_in_a_fresh_process():
    # Caches filled by earlier eager runs hide import-time graph breaks: start from nothing.
    import subprocess
    import sys

    env = dict(__import__("os").environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS_COMPILE], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


# -- activation checkpointing ----------------------------------------------------------------------


@pytest.mark.parametrize("every,recomputed", [(1, [2, 2]), (2, [2, 1])])
def test_checkpointing_gives_identical_grads(every, recomputed):
    ref, plain = make_pair()
    ckpt = from_reference(ref, checkpoint_every=every).train()
    calls = [0] * len(ckpt.blocks)
    for i, block in enumerate(ckpt.blocks):
        block.attn.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    x, t, y = make_inputs(SMALL)
    grad_out = torch.randn(4, 8, 8, 8)
    out0, grads0 = run_fwd_bwd(plain, x, t, y, grad_out)
    out1, grads1 = run_fwd_bwd(ckpt, x, t, y, grad_out)
    assert calls == recomputed, "checkpointed blocks (only those) run their forward again in backward"
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    torch.testing.assert_close(grads1, grads0, rtol=0, atol=0)


# -- a short training run --------------------------------------------------------------------------


def test_training_loss_curve_matches_reference():
    """AdamW on synthetic latents with the DDPM noise-prediction loss: same curve as the reference."""
    steps, n = 120, 8
    config = dict(TINY, class_dropout_prob=0.1)
    ref = reference.DiT(**config).train()  # the published init, as training starts from it
    fast = from_reference(ref).train()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, 0).float()
    gen = torch.Generator().manual_seed(1234)
    # A small fixed data set with structure to learn: smooth per-class patterns plus noise.
    grid = torch.linspace(0, 3.14, 8)
    patterns = torch.stack([torch.sin((c + 1) * grid)[:, None] * torch.cos((c % 3 + 1) * grid)[None]
                            for c in range(10)])
    data_y = torch.randint(0, 10, (32,), generator=gen)
    data_x = patterns[data_y][:, None].repeat(1, 4, 1, 1) + 0.1 * torch.randn(32, 4, 8, 8, generator=gen)
    batches = []
    for _ in range(steps):
        idx = torch.randint(0, 32, (n,), generator=gen)
        t = torch.randint(0, 1000, (n,), generator=gen)
        eps = torch.randn(n, 4, 8, 8, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        batches.append((a.sqrt() * data_x[idx] + (1 - a).sqrt() * eps, t, data_y[idx], eps))

    def train(model, dtype=torch.float32):
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
        losses = []
        for step, (x_t, t, y, eps) in enumerate(batches):
            torch.manual_seed(step)  # the same label dropout draws for both models
            loss = F.mse_loss(model(x_t.to(dtype), t, y)[:, :4], eps.to(dtype))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return torch.tensor(losses, dtype=torch.float64)

    exact = train(copy.deepcopy(ref).double(), torch.float64)
    ref_losses, fast_losses = train(ref), train(fast)
    assert fast_losses[-20:].mean() < 0.5 * fast_losses[:20].mean(), f"loss did not go down: {fast_losses}"

    def drift(losses):  # largest relative distance from the float64 run's curve
        return ((losses - exact).abs() / exact).max().item()

    # Both float32 runs drift from the float64 curve. Adam turns the rounding of a gradient coordinate
    # that is nearly zero into a step of up to lr, and which coordinates those are depends on the
    # summation order and the weights drawn: over 120 steps a float32 run drifts 1e-7..1e-5 typically and
    # up to ~6e-5 for some draws, whichever implementation it is (seed 1300379908: the reference 2.4e-6,
    # the fast model 5.7e-5 on both the ext and the torch backend, from step 17, at the 1st step's
    # near-zero coordinates of final_layer.linear). So: twice the reference's drift, or 1e-4 at least; a
    # wrong gradient or a missed update drifts by 1e-2 and more. Per-step gradients are held to 1e-5 by
    # test_model.py's parity tests.
    bound = max(2 * drift(ref_losses), 1e-4)
    assert drift(fast_losses) <= bound, (
        f"fast drifts {drift(fast_losses):.2e} from the float64 curve, the reference {drift(ref_losses):.2e}")


# -- on a GPU --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("attn_backend", ["auto", "sdpa", "flash_attn", "flash_attn_3", "flash_attn_4"])
@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_bf16_training_step_matches_reference(attn_backend, compiled):
    from dit_fast.attention import _cannot_run

    config = dict(SMALL, input_size=16, num_heads=6)  # hd 64, 64 tokens
    why = "" if attn_backend == "auto" else _cannot_run(attn_backend, "cuda", torch.bfloat16, 64, for_auto=False)
    if why:
        pytest.skip(f"{attn_backend}: {why}")
    ref = randomize_weights_(reference.DiT(**config)).cuda().train()
    fast = from_reference(ref, attn_backend=attn_backend).train()
    model = torch.compile(fast, fullgraph=True) if compiled else fast
    x, t, y = (v.cuda() for v in make_inputs(config, n=8))
    grad_out = torch.randn(8, 8, 16, 16, device="cuda")
    out64, grads64 = float64_reference(ref, x, t, y, grad_out)

    def run(m):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(x, t, y)
        out.backward(grad_out.to(out.dtype))
        return out.detach(), flat_grads(fast if m is model else m)

    eager_out, eager_grads = run(ref)
    out, grads = run(model)
    assert_close(out, out64, torch.bfloat16, eager_lowp=eager_out, name=f"{attn_backend} output")
    assert_close(grads, grads64, torch.bfloat16, eager_lowp=eager_grads, name=f"{attn_backend} grads")
