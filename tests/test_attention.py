"""dit_fast.attention: every backend against a float64 reference, and how "auto" chooses.

FlashAttention is not installed on the CI machine: its backends are exercised with fake modules
put into sys.modules that check the layout they receive (the strided [B, L, 3, H, Dh] view of the
QKV output, no copy) and compute plain attention; on a GPU the `gpu` tests run the real ones.
"""
import sys
import types

import pytest
import torch

from conftest import DEVICE
from dit_fast import attention as attn_mod
from dit_fast.attention import ATTN_BACKENDS, attention, attention_report, math_attention
from tolerances import assert_close


def reference(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """float64 attention, written independently of the module under test."""
    B, L, D3 = qkv.shape
    D = D3 // 3
    q, k, v = qkv.double().reshape(B, L, 3, num_heads, D // num_heads).unbind(2)  # [B, L, H, Dh]
    scores = torch.einsum("blhd,bmhd->bhlm", q, k) / (D // num_heads) ** 0.5
    return torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v).reshape(B, L, D)


@pytest.fixture(autouse=True)
def _fresh_resolution():
    attn_mod.clear_cache()
    yield
    attn_mod.clear_cache()


# -- numerics on the CPU ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sdpa", "math", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,L,H,Dh", [(2, 17, 2, 72), (1, 1, 3, 8), (3, 16, 1, 40)])
def test_forward_matches_float64(backend, dtype, B, L, H, Dh):
    qkv = torch.randn(B, L, 3 * H * Dh, dtype=dtype)
    ref = reference(qkv, H)
    eager = None
    if dtype != torch.float32:
        q, k, v = qkv.reshape(B, L, 3, H, Dh).permute(2, 0, 3, 1, 4)
        eager = math_attention(q, k, v).transpose(1, 2).reshape(B, L, -1)
    out = attention(qkv, H, backend)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, eager_lowp=eager, name=f"{backend} attention")


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_backward_matches_float64(backend):
    B, L, H, Dh = 2, 9, 2, 24
    qkv = torch.randn(B, L, 3 * H * Dh, requires_grad=True)
    qkv64 = qkv.detach().double().requires_grad_()
    grad = torch.randn(B, L, H * Dh)
    attention(qkv, H, backend).backward(grad)
    reference(qkv64, H).backward(grad.double())
    assert_close(qkv.grad, qkv64.grad, torch.float32, name=f"{backend} dqkv")


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_backward_writes_packed_qkv_grad_once(backend):
    """Between the attention kernel's backward and the QKV GEMM's backward the packed gradient is
    written once (one stack into [B, L, 3, H, Dh]), with no clone or copy to make it contiguous."""
    from torch.utils._python_dispatch import TorchDispatchMode

    B, L, H, Dh = 2, 9, 2, 24
    qkv = torch.randn(B, L, 3 * H * Dh, requires_grad=True)
    out = attention(qkv, H, backend)
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if isinstance(result, torch.Tensor) and result.numel() == qkv.numel():
                seen.append(func.overloadpacket.__name__)
            return result

    with Record():
        (dqkv,) = torch.autograd.grad(out, qkv, torch.randn_like(out))
    packed_writes = [n for n in seen if n in ("stack", "cat", "clone", "copy_", "contiguous", "_to_copy")]
    assert packed_writes == ["stack"], f"{backend}: ops producing a qkv-sized tensor in backward: {seen}"
    assert dqkv.is_contiguous()


def test_strided_qkv_input():
    # A qkv whose rows are padded (a slice of a wider buffer) still works and is not copied by views.
    B, L, H, Dh = 2, 5, 2, 16
    wide = torch.randn(B, L, 3 * H * Dh + 8)
    qkv = wide[..., : 3 * H * Dh]
    assert not qkv.is_contiguous()
    assert_close(attention(qkv, H, "sdpa"), reference(qkv, H), torch.float32)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="num_heads"):
        attention(torch.randn(1, 4, 30), 4)
    with pytest.raises(ValueError, match=r"\[B, L, 3\*D\]"):
        attention(torch.randn(4, 30), 2)
    with pytest.raises(ValueError, match="must be one of"):
        attention(torch.randn(1, 4, 24), 2, "flash")


@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
def test_compile_fullgraph(backend):
    H = 2
    qkv = torch.randn(2, 7, 3 * H * 8, requires_grad=True)
    compiled = torch.compile(lambda t: attention(t, H, backend), fullgraph=True, backend="aot_eager")
    out = compiled(qkv)
    assert_close(out, reference(qkv, H), torch.float32)
    out.sum().backward()
    assert torch.isfinite(qkv.grad).all()


# -- selection, with FlashAttention faked --------------------------------------------------------


class FakeFlash:
    """Stand-ins for the FlashAttention entry points; they record what they were given."""

    def __init__(self):
        self.calls = []
        self.expected_ptr = None

    def _check(self, name, t, shape_rank):
        assert t.dim() == shape_rank, f"{name}: got rank {t.dim()}"
        assert t.stride(-1) == 1, f"{name}: last dim must be contiguous"
        if self.expected_ptr is not None:
            assert t.data_ptr() == self.expected_ptr, f"{name}: input was copied"

    def qkvpacked(self, tag):
        def fn(qkv, softmax_scale=None, causal=False, **kwargs):
            self._check(tag, qkv, 5)
            assert qkv.shape[2] == 3 and not causal and softmax_scale is None
            self.calls.append(tag)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            return math_attention(q, k, v).transpose(1, 2)  # [B, L, H, Dh]

        return fn

    def separate(self, tag, with_lse):
        def fn(q, k, v, softmax_scale=None, causal=False, **kwargs):
            for t in (q, k, v):
                assert t.dim() == 4 and t.stride(-1) == 1, f"{tag}: bad layout"
            if self.expected_ptr is not None:
                assert q.data_ptr() == self.expected_ptr, f"{tag}: q was copied"
            assert not causal and softmax_scale is None
            self.calls.append(tag)
            out = math_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
            return (out, torch.zeros(out.shape[:3])) if with_lse else out

        return fn


@pytest.fixture
def fake_flash(monkeypatch):
    """Install fake flash_attn (FA2), flash_attn_interface (FA3) and flash_attn.cute (FA4)."""
    fake = FakeFlash()
    fa2 = types.ModuleType("flash_attn")
    fa2.flash_attn_qkvpacked_func = fake.qkvpacked("flash_attn")
    fa3 = types.ModuleType("flash_attn_interface")
    fa3.flash_attn_qkvpacked_func = fake.qkvpacked("flash_attn_3")
    fa3.flash_attn_func = fake.separate("flash_attn_3/separate", with_lse=False)
    fa4 = types.ModuleType("flash_attn.cute")
    fa4.flash_attn_func = fake.separate("flash_attn_4", with_lse=True)
    fa2.cute = fa4
    for name, mod in (("flash_attn", fa2), ("flash_attn_interface", fa3), ("flash_attn.cute", fa4)):
        monkeypatch.setitem(sys.modules, name, mod)
    fake.modules = {"flash_attn": fa2, "flash_attn_3": fa3, "flash_attn_4": fa4}
    return fake


def fake_gpu(monkeypatch, cap):
    """Make every device look like a CUDA GPU of compute capability `cap`, for the selection logic."""
    monkeypatch.setattr(attn_mod, "_device_capability", lambda device: cap)


def uninstall(monkeypatch, *modules):
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError


@pytest.mark.parametrize(
    "cap,head_dim,expected",
    [
        ((9, 0), 72, "flash_attn_3"),
        ((9, 0), 64, "flash_attn_3"),
        ((10, 0), 64, "flash_attn_4"),
        ((10, 0), 72, "flash_attn"),  # FA4 documents hd 64/96/128 only
        ((8, 0), 72, "flash_attn"),
        ((8, 6), 128, "flash_attn"),
        ((7, 5), 64, "sdpa"),  # no FlashAttention 2 before Ampere
        ((8, 0), 300, "sdpa"),  # head_dim > 256
        ((8, 0), 36, "sdpa"),  # FA2 would pad 36 -> 40 (a copy)
    ],
)
def test_auto_picks_best_installed(fake_flash, monkeypatch, cap, head_dim, expected):
    fake_gpu(monkeypatch, cap)
    H = 2
    qkv = torch.randn(2, 5, 3 * H * head_dim, dtype=torch.bfloat16, requires_grad=True)
    fake_flash.expected_ptr = qkv.data_ptr()
    out = attention(qkv, H)
    called = fake_flash.calls[0] if fake_flash.calls else "sdpa"
    assert called == expected
    assert attention_report("cuda", torch.bfloat16, head_dim)[expected] == "used"
    ref = reference(qkv, H)
    eager = math_attention(*qkv.reshape(2, 5, 3, H, head_dim).permute(2, 0, 3, 1, 4)).transpose(1, 2).reshape(2, 5, -1)
    assert_close(out, ref, torch.bfloat16, eager_lowp=eager, name=expected)
    out.float().sum().backward()  # gradients reach qkv through the strided views
    assert qkv.grad is not None and torch.isfinite(qkv.grad.float()).all()


def test_auto_skips_uninstalled(fake_flash, monkeypatch):
    fake_gpu(monkeypatch, (9, 0))
    uninstall(monkeypatch, "flash_attn_interface")
    qkv = torch.randn(1, 4, 3 * 2 * 64, dtype=torch.float16)
    attention(qkv, 2)
    assert fake_flash.calls == ["flash_attn_4"]
    report = attention_report("cuda", torch.float16, 64)
    assert report["flash_attn_3"].startswith("skipped: flash_attn_interface is not importable")
    assert report["flash_attn_4"] == "used"
    assert report["flash_attn"] == "available" and report["sdpa"] == "available"


def test_fa3_without_qkvpacked_uses_separate_views(fake_flash, monkeypatch):
    fake_gpu(monkeypatch, (9, 0))
    monkeypatch.delattr(fake_flash.modules["flash_attn_3"], "flash_attn_qkvpacked_func")
    qkv = torch.randn(2, 3, 3 * 2 * 16, dtype=torch.bfloat16)
    fake_flash.expected_ptr = qkv.data_ptr()
    attention(qkv, 2, "flash_attn_3")
    assert fake_flash.calls == ["flash_attn_3/separate"]


def test_flash_needs_half_precision_and_cuda(fake_flash, monkeypatch):
    # float32 (no autocast): every flash kernel is skipped, sdpa runs.
    fake_gpu(monkeypatch, (9, 0))
    attention(torch.randn(1, 4, 3 * 2 * 64), 2)
    assert fake_flash.calls == []
    report = attention_report("cuda", torch.float32, 64)
    assert report["sdpa"] == "used" and "float16/bfloat16" in report["flash_attn"]
    with pytest.raises(RuntimeError, match="float16/bfloat16"):
        attention(torch.randn(1, 4, 3 * 2 * 64), 2, "flash_attn")
    # A CPU tensor: no flash kernel either.
    monkeypatch.setattr(attn_mod, "_device_capability", lambda device: None)
    attn_mod.clear_cache()
    assert "needs a CUDA device" in attention_report("cpu", torch.bfloat16, 64)["flash_attn"]


@pytest.mark.parametrize("backend,module,hint", [
    ("flash_attn", "flash_attn", "pip install flash-attn"),
    ("flash_attn_3", "flash_attn_interface", "hopper"),
    ("flash_attn_4", "flash_attn.cute", "flash-attn-4"),
])
def test_named_backend_missing_is_a_clear_error(monkeypatch, backend, module, hint):
    uninstall(monkeypatch, module)
    fake_gpu(monkeypatch, (9, 0))
    qkv = torch.randn(1, 4, 3 * 2 * 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError) as info:
        attention(qkv, 2, backend)
    msg = str(info.value)
    assert repr(backend) in msg and module in msg and hint in msg and "sdpa" in msg


def test_named_backend_wrong_gpu_is_a_clear_error(fake_flash, monkeypatch):
    fake_gpu(monkeypatch, (8, 0))
    qkv = torch.randn(1, 4, 3 * 2 * 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"'flash_attn_3'.*Hopper.*Usable here: flash_attn, sdpa, math"):
        attention(qkv, 2, "flash_attn_3")
    # A named backend that can run is used even where "auto" would not pick it.
    attention(qkv, 2, "flash_attn")
    assert fake_flash.calls == ["flash_attn"]


def test_resolution_is_cached(fake_flash, monkeypatch):
    fake_gpu(monkeypatch, (8, 0))
    qkv = torch.randn(1, 4, 3 * 2 * 64, dtype=torch.bfloat16)
    attention(qkv, 2)
    uninstall(monkeypatch, "flash_attn")  # not looked up again: the choice is cached per case
    attention(qkv, 2)
    assert fake_flash.calls == ["flash_attn", "flash_attn"]


def test_report_lists_every_backend():
    report = attention_report("cpu", torch.float32, 72)
    assert set(report) == set(ATTN_BACKENDS) - {"auto"}
    assert report["sdpa"] == "used" and report["math"] == "available"


# -- on a GPU: every installed backend -----------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash_attn_3", "flash_attn_4", "flash_attn", "sdpa", "math", "auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B,L,H,Dh", [(4, 256, 16, 72), (2, 77, 6, 64), (1, 1, 2, 128)])
def test_gpu_backend_matches_float64(backend, dtype, B, L, H, Dh):
    why = attn_mod._cannot_run(backend, "cuda", dtype, Dh, for_auto=False) if backend != "auto" else ""
    if why:
        pytest.skip(f"{backend}: {why}")
    qkv = torch.randn(B, L, 3 * H * Dh, device=DEVICE, dtype=dtype, requires_grad=True)
    qkv64 = qkv.detach().double().requires_grad_()
    grad = torch.randn(B, L, H * Dh, device=DEVICE, dtype=dtype)
    eager_qkv = qkv.detach().clone().requires_grad_()
    q, k, v = eager_qkv.reshape(B, L, 3, H, Dh).permute(2, 0, 3, 1, 4)
    eager = math_attention(q, k, v).transpose(1, 2).reshape(B, L, -1)
    eager.backward(grad)

    out = attention(qkv, H, backend)
    out.backward(grad)
    ref = reference(qkv64, H)
    ref.backward(grad.double())
    assert_close(out, ref, dtype, eager_lowp=eager, name=f"{backend} out")
    assert_close(qkv.grad, qkv64.grad, dtype, eager_lowp=eager_qkv.grad, name=f"{backend} dqkv")


@pytest.mark.gpu
def test_memory_efficient_sdpa_backward_writes_the_packed_qkv_gradient_gpu():
    """PyTorch's memory-efficient SDPA allocates dq, dk, dv as slices of one [B, L, 3, H, Dh] tensor when
    q, k, v are views of one packed tensor (ours are): qkv's gradient is then that tensor, no stack."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils._python_dispatch import TorchDispatchMode

    class Stacks(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("stack", "cat"):
                Stacks.n += 1
            return func(*args, **(kwargs or {}))

    B, L, H, Dh = 2, 64, 2, 64
    qkv = torch.randn(B, L, 3 * H * Dh, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(B, L, H * Dh, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        out = attention(qkv, H, "sdpa")
        with Stacks():
            out.backward(g)
    assert Stacks.n == 0
    ref = qkv.detach().double().requires_grad_()
    q, k, v = (t.transpose(1, 2) for t in ref.reshape(B, L, 3, H, Dh).unbind(2))
    math_attention(q, k, v).transpose(1, 2).reshape(B, L, H * Dh).backward(g.double())
    assert_close(qkv.grad, ref.grad, torch.bfloat16, eager_lowp=_eager_sdpa_grad(qkv.detach(), g, H), name="dqkv")


def _eager_sdpa_grad(qkv, g, H):
    x = qkv.clone().requires_grad_()
    B, L, D3 = x.shape
    q, k, v = (t.transpose(1, 2) for t in x.reshape(B, L, 3, H, D3 // (3 * H)).unbind(2))
    math_attention(q, k, v).transpose(1, 2).reshape(B, L, D3 // 3).backward(g)
    return x.grad


@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
def test_attention_qkv_matches_the_packed_call_and_is_twice_differentiable(backend):
    """attention_qkv (separate q, k, v [B, H, L, Dh], as qk_norm_rope gives them) is attention() of the packed
    tensor, gradients included, and a gradient penalty through it works on every backend."""
    from dit_fast.attention import attention, attention_qkv

    B, L, H, Dh = 2, 5, 3, 8
    qkv = torch.randn(B, L, 3 * H * Dh, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv.reshape(B, L, 3, H, Dh).unbind(2)
    out = attention_qkv(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend)
    want = attention(qkv, H, "math")
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    (g,) = torch.autograd.grad(out.square().sum(), qkv, create_graph=True)
    (g_want,) = torch.autograd.grad(want.square().sum(), qkv, create_graph=True)
    torch.testing.assert_close(g, g_want, rtol=1e-10, atol=1e-12)
    (gg,) = torch.autograd.grad(g.square().sum(), qkv)
    (gg_want,) = torch.autograd.grad(g_want.square().sum(), qkv)
    torch.testing.assert_close(gg, gg_want, rtol=1e-10, atol=1e-12)
