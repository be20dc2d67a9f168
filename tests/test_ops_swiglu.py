"""swiglu (LightningDiT's SwiGLU activation on the packed w12 projection) on every backend that runs it.

Called through dit_fast.ops; forward and every gradient compared with the torch backend run on float64
copies (tests/tolerances.py), outputs poisoned before the kernels write them, odd sizes, strided inputs.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dit_fast.ops as ops
from dit_fast import backends
from dit_fast.ops import torch_lightning
from tolerances import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ("torch", "triton")
LOWP = (torch.bfloat16, torch.float16)

# ab's leading shape and H: batch 1, one token, odd H, H = 3072 (LightningDiT-XL) at few tokens,
# H = 4778 (LightningDiT-1p6B: int(2/3 * 4 * 1792), not a multiple of 8), 2-D and 4-D inputs.
CASES = [((1, 1), 1), ((3, 5), 50), ((2, 7), 72), ((1, 3), 3072), ((1, 2), 4778), ((11,), 129), ((2, 1, 3), 40)]


def need(backend: str) -> None:
    ok, why = backends.probe(backend, DEVICE)
    if not ok:
        pytest.skip(f"backend {backend!r} unavailable on {DEVICE}: {why}")


def with_grads(fn, leaves_in, cot):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in leaves_in]
    out = fn(*leaves)
    wrt = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, wrt, grad_outputs=cot)
    it = iter(grads)
    return out, [next(it) if t is not None else None for t in leaves]


def eager_lowp(ab, bias):
    """PyTorch's own composition in ab's (low) precision, as SwiGLUFFN runs it: the tolerance bound."""
    x = ab if bias is None else ab + bias.to(ab.dtype)
    a, b = x.chunk(2, dim=-1)
    return F.silu(a) * b


def run_and_check(backend, ab, bias=None, cot=None):
    H = ab.shape[-1] // 2
    if cot is None:
        cot = torch.randn(*ab.shape[:-1], H, device=DEVICE).to(ab.dtype)
    out, (dab, dbias) = with_grads(lambda a, b: ops.swiglu(a, bias=b, backend=backend), [ab, bias], cot)
    as64 = [t.double() if t is not None else None for t in (ab, bias)]
    ref, (ref_dab, ref_dbias) = with_grads(torch_lightning.swiglu, as64, cot.double())
    eager, (e_dab, e_dbias) = (None, (None, None))
    if ab.dtype in LOWP:
        eager, (e_dab, e_dbias) = with_grads(eager_lowp, [ab, bias], cot)
    assert out.dtype == ab.dtype and dab.dtype == ab.dtype
    assert_close(out, ref, ab.dtype, eager, name=f"{backend} swiglu out")
    assert_close(dab, ref_dab, ab.dtype, e_dab, name=f"{backend} swiglu d(ab)")
    if bias is not None:
        assert dbias.dtype == bias.dtype
        assert_close(dbias, ref_dbias, bias.dtype if bias.dtype in LOWP else ab.dtype, e_dbias,
                     name=f"{backend} swiglu d(bias)")
    return out, dab, dbias


@pytest.mark.parametrize("lead,H", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float32(backend, lead, H):
    need(backend)
    run_and_check(backend, torch.randn(*lead, 2 * H, device=DEVICE))


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("lead,H", [((3, 5), 50), ((1, 3), 3072)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision(backend, lead, H, dtype):
    need(backend)
    run_and_check(backend, torch.randn(*lead, 2 * H, device=DEVICE).to(dtype))


@pytest.mark.parametrize("dtypes", ["float32", "bfloat16", "mixed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bias(backend, dtypes):
    """w12's bias added in the op (the GEMM run without it); "mixed": the model under autocast, a bfloat16 GEMM
    output and the float32 bias parameter."""
    need(backend)
    ab_dtype = torch.float32 if dtypes == "float32" else torch.bfloat16
    b_dtype = torch.bfloat16 if dtypes == "bfloat16" else torch.float32
    H = 72
    ab = torch.randn(3, 17, 2 * H, device=DEVICE).to(ab_dtype)
    run_and_check(backend, ab, (0.5 * torch.randn(2 * H, device=DEVICE)).to(b_dtype))


@pytest.mark.parametrize("layout", ["row slice", "last dim strided", "cotangent strided"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend, layout):
    need(backend)
    H = 40
    if layout == "row slice":  # the packed half of a wider GEMM output: rows strided, last dim contiguous
        ab = torch.randn(2, 5, 2 * H + 7, device=DEVICE)[..., 3:3 + 2 * H]
    elif layout == "last dim strided":
        ab = torch.randn(2, 2 * H, 5, device=DEVICE).transpose(1, 2)
    else:
        ab = torch.randn(2, 5, 2 * H, device=DEVICE)
    cot = torch.randn(H, 5, 2, device=DEVICE).permute(2, 1, 0) if layout == "cotangent strided" else None
    assert not ab.is_contiguous() or cot is not None
    run_and_check(backend, ab, torch.randn(2 * H, device=DEVICE), cot)


def test_triton_writes_every_element():
    """Every buffer the launchers allocate (output, d(ab), bias partial sums) starts as NaN."""
    need("triton")
    from dit_fast.kernels import adaln as kernels

    with kernels.poison_outputs():
        run_and_check("triton", torch.randn(5, 3, 2 * 77, device=DEVICE), torch.randn(2 * 77, device=DEVICE))


def test_triton_bias_grad_is_deterministic():
    need("triton")
    ab = torch.randn(64, 2 * 96, device=DEVICE)
    bias, cot = torch.randn(2 * 96, device=DEVICE), torch.randn(64, 96, device=DEVICE)
    runs = [with_grads(lambda a, b: ops.swiglu(a, bias=b, backend="triton"), [ab, bias], cot)[1] for _ in range(2)]
    assert torch.equal(runs[0][1], runs[1][1]) and torch.equal(runs[0][0], runs[1][0])


def test_saturated_inputs_stay_finite():
    """silu at |a| ~ 1e30: exp overflows to inf inside the sigmoid; outputs and gradients must not turn NaN."""
    need("triton")
    ab = torch.tensor([[-1e30, 1e30, -50.0, 2.0, 3.0, -1.0]], device=DEVICE)
    out, (dab, _) = with_grads(lambda a, b: ops.swiglu(a, bias=b, backend="triton"), [ab, None],
                               torch.ones(1, 3, device=DEVICE))
    ref, (ref_dab, _) = with_grads(lambda a, b: torch_lightning.swiglu(a, b), [ab.double(), None],
                                   torch.ones(1, 3, device=DEVICE, dtype=torch.float64))
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(dab.double(), ref_dab, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend):
    need(backend)
    H = 24
    w3 = torch.randn(8, H, device=DEVICE)

    def mlp(ab, bias):
        return F.linear(ops.swiglu(ab, bias=bias, backend=backend), w3)

    compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")
    ab, bias = torch.randn(2, 5, 2 * H, device=DEVICE), torch.randn(2 * H, device=DEVICE)
    cot = torch.randn(2, 5, 8, device=DEVICE)
    want = with_grads(mlp, [ab, bias], cot)
    got = with_grads(compiled, [ab, bias], cot)
    for g, w in zip([got[0], *got[1]], [want[0], *want[1]]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_triton_opcheck():
    need("triton")
    import dit_fast.ops.triton_backend  # noqa: F401  (registers the ops)

    ab, bias = torch.randn(3, 2 * 20, device=DEVICE), torch.randn(2 * 20, device=DEVICE)
    dout = torch.randn(3, 20, device=DEVICE)
    torch.library.opcheck(torch.ops.dit_fast_triton.swiglu_fwd, (ab.requires_grad_(), bias.requires_grad_()))
    torch.library.opcheck(torch.ops.dit_fast_triton.swiglu_fwd, (ab, None))
    torch.library.opcheck(torch.ops.dit_fast_triton.swiglu_bwd, (dout, ab.detach(), bias.detach(), True))
    torch.library.opcheck(torch.ops.dit_fast_triton.swiglu_bwd, (dout, ab.detach(), None, False))


def test_triton_second_derivatives_match_torch():
    """create_graph=True through the Triton op: second derivatives are the torch backend's (float64)."""
    need("triton")
    ab, bias = torch.randn(4, 2 * 12, device=DEVICE), torch.randn(2 * 12, device=DEVICE)
    cot, dirs = torch.randn(4, 12, device=DEVICE), [torch.randn(4, 24, device=DEVICE), torch.randn(24, device=DEVICE)]

    def hvp(backend, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (ab, bias)]
        out = ops.swiglu(leaves[0], bias=leaves[1], backend=backend)
        grads = torch.autograd.grad((out * cot.to(dtype)).sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum((g * d.to(dtype)).sum() for g, d in zip(grads, dirs)), leaves)

    for g, w in zip(hvp("triton", torch.float32), hvp("torch", torch.float64)):
        assert_close(g, w, torch.float32, name="swiglu second derivative")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows(backend):
    need(backend)
    out, (dab, dbias) = with_grads(lambda a, b: ops.swiglu(a, bias=b, backend=backend),
                                   [torch.randn(0, 3, 16, device=DEVICE), torch.randn(16, device=DEVICE)],
                                   torch.randn(0, 3, 8, device=DEVICE))
    assert out.shape == (0, 3, 8) and dab.shape == (0, 3, 16)
    assert dbias.shape == (16,) and not dbias.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_messages(backend):
    need(backend)
    ab = torch.randn(2, 3, 10, device=DEVICE)
    with pytest.raises(ValueError, match=r"ab must have shape \[\.\.\., 2H\] with H >= 1.*got \[2, 3, 9\]"):
        ops.swiglu(ab[..., :9], backend=backend)
    with pytest.raises(ValueError, match=r"bias must have shape \[2H\] = \[10\], got \[5\]"):
        ops.swiglu(ab, bias=torch.randn(5, device=DEVICE), backend=backend)
    with pytest.raises(TypeError, match="ab must be a floating-point tensor, got dtype torch.int64"):
        ops.swiglu(ab.long(), backend=backend)


def test_float64_runs_on_the_torch_backend():
    """The Triton kernels compute in float32: float64 goes to the torch backend (with a reason when triton
    was asked for) and stays float64."""
    need("triton")
    ab = torch.randn(2, 3, 8, dtype=torch.float64, device=DEVICE)
    assert backends.resolve("auto", "swiglu", ab.device.type, True) == "torch"
    assert "no float64 kernels" in backends.why_not("triton", "swiglu", ab.device.type, float64=True)
    assert ops.swiglu(ab, backend="auto").dtype == torch.float64


# ---- full-size checks, for a GPU -------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lightningdit_xl_shapes_gpu(dtype):
    """LightningDiT-XL/1 at batch 8: N = 8 * 256 tokens, H = 3072; bias under autocast as float32."""
    need("triton")
    from dit_fast.kernels import adaln as kernels

    ab = torch.randn(8, 256, 2 * 3072, device=DEVICE).to(dtype)
    with kernels.poison_outputs():
        run_and_check("triton", ab, 0.5 * torch.randn(2 * 3072, device=DEVICE))
        run_and_check("triton", torch.randn(2, 1024, 2 * 4778, device=DEVICE).to(dtype))
