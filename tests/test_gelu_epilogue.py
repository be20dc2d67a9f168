"""fc1's GELU in the GEMM epilogue (dit_fast/ops/gelu_epilogue.py): the check that decides whether
torch._addmm_activation computes GELU-tanh, and the inference path that uses it once checked.

On the CPU, _addmm_activation is the erf GELU: the check must refuse it. A stand-in that computes the
tanh form (or is off by a little) exercises the rest; the CUDA check itself runs in gpu_check.sh.
"""

import pytest
import torch
import torch.nn.functional as F

import dit_fast.ops as ops
from conftest import needs_triton
from dit_fast.ops import gelu_epilogue
from dit_fast.ops import torch_backend as tb
from tolerances import assert_close


def _tanh_addmm(bias, x, wt, use_gelu=False, beta=1, alpha=1):
    """_addmm_activation as a library whose epilogue is GELU-tanh would compute it (one rounding)."""
    pre = torch.addmm(bias.double(), x.double(), wt.double())
    return F.gelu(pre, approximate="tanh").to(x.dtype)


@pytest.fixture
def fresh_verdicts(monkeypatch):
    monkeypatch.setattr(gelu_epilogue, "_verdicts", {})


def test_check_refuses_the_cpu_erf_form(fresh_verdicts):
    ok, why = gelu_epilogue.check(torch.device("cpu"), torch.float32)
    assert not ok and "erf form" in why, why


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_check_accepts_a_tanh_epilogue(monkeypatch, dtype):
    monkeypatch.setattr(torch, "_addmm_activation", _tanh_addmm)
    ok, why = gelu_epilogue.check(torch.device("cpu"), dtype)
    assert ok, why


def test_check_refuses_an_inaccurate_tanh_epilogue(monkeypatch):
    """The tanh form, but with an error of 1% in bf16: more than twice eager's bf16 error."""
    def sloppy(bias, x, wt, use_gelu=False):
        out = _tanh_addmm(bias, x, wt)
        return out if out.dtype == torch.float32 else (out.double() * 1.01).to(out.dtype)

    monkeypatch.setattr(torch, "_addmm_activation", sloppy)
    ok, why = gelu_epilogue.check(torch.device("cpu"), torch.bfloat16)
    assert not ok and "exceeds twice eager" in why, why


def test_refusal_is_warned_once(fresh_verdicts):
    with pytest.warns(UserWarning, match="without cuBLASLt's GELU epilogue.*erf form"):
        assert not gelu_epilogue.verdict(torch.device("cpu"), torch.float32)[0]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not gelu_epilogue.verdict(torch.device("cpu"), torch.float32)[0]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_takes_the_epilogue_once_checked(monkeypatch, fresh_verdicts, dtype):
    """With the device allowed and a tanh epilogue: no grad -> one _addmm_activation, equal to the
    reference; with grad, under an env switch-off or with a cast needed -> the F.linear + Triton path."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return _tanh_addmm(*args, **kwargs)

    monkeypatch.setattr(torch, "_addmm_activation", counting)
    monkeypatch.setattr(gelu_epilogue, "_DEVICE_TYPES", ("cuda", "cpu"))
    x, w, b = torch.randn(2, 5, 32).to(dtype), (torch.randn(64, 32) / 6).to(dtype), torch.randn(64).to(dtype)
    ref = tb.linear_gelu_tanh(x.double(), w.double(), b.double())
    with torch.no_grad():
        out = ops.linear_gelu_tanh(x, w, b, backend="triton")
    assert len(calls) == 3  # the check's two runs, then the call itself
    assert out.shape == (2, 5, 64) and out.dtype == dtype
    eager = F.gelu(F.linear(x, w, b), approximate="tanh")
    assert_close(out, ref, dtype, eager_lowp=eager if dtype != torch.float32 else None, name="epilogue")

    calls.clear()
    ops.linear_gelu_tanh(x, w.requires_grad_(), b, backend="triton")  # autograd: needs the pre-activation
    monkeypatch.setenv("DIT_FAST_GELU_EPILOGUE", "0")
    with torch.no_grad():
        ops.linear_gelu_tanh(x, w, b, backend="triton")
    monkeypatch.delenv("DIT_FAST_GELU_EPILOGUE")
    with torch.no_grad():
        ops.linear_gelu_tanh(x, w.to(torch.float16), b, backend="triton")  # a cast would be needed
    assert calls == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_epilogue_verdict_and_use_gpu(fresh_verdicts, dtype):
    """On the GPU: the check runs and answers; if it takes the epilogue, a bf16 model's fc1 + GELU under
    no_grad matches float64 GELU-tanh within the low-precision tolerance."""
    ok, why = gelu_epilogue.verdict(torch.device("cuda"), dtype)
    print(f"cuBLASLt GELU epilogue, {dtype}: {'taken' if ok else 'not used'} - {why}")
    x = torch.randn(4, 256, 1152, device="cuda").to(dtype)
    w = (torch.randn(4608, 1152, device="cuda") / 34).to(dtype)
    b = torch.randn(4608, device="cuda").to(dtype)
    with torch.no_grad():
        out = ops.linear_gelu_tanh(x, w, b, backend="triton")
    ref = tb.linear_gelu_tanh(x.double(), w.double(), b.double())
    eager = F.gelu(F.linear(x, w, b), approximate="tanh")
    assert_close(out, ref, dtype, eager_lowp=eager, name="fc1 + GELU (no grad)")


def test_no_check_inside_a_cuda_graph_capture(monkeypatch, fresh_verdicts):
    """The check synchronizes, so an undecided (device, dtype) is not checked while a graph is captured:
    the call takes the F.linear + GELU path and the verdict stays open for an eager call."""
    monkeypatch.setattr(gelu_epilogue, "_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(gelu_epilogue, "_capturing", lambda device: True)
    monkeypatch.setattr(torch, "_addmm_activation", lambda *a, **k: pytest.fail("checked during capture"))
    x, w, b = torch.randn(3, 16), torch.randn(8, 16), torch.randn(8)
    assert gelu_epilogue.linear_gelu_tanh(x, w, b, torch.float32) is None
    assert gelu_epilogue._verdicts == {}
