"""fc1 as one Triton GEMM with a bias + GELU(tanh) epilogue (kernels/gemm_gelu.py), opted into with
DIT_FAST_FC1_GEMM=triton: the launcher against float64 references (NaN-poisoned buffers, partial tiles in
every dimension, the GPU tile configs run by the interpreter), the op's gradients through the public API,
the switch and its fallback warning, torch.compile, and one training step of a tiny DiT against the
reference model.
"""
import contextlib
import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from test_ops_embed import _leaves, _run  # the same leaves and gradient helpers as the other embed ops

import dit_fast
import dit_fast.ops as ops
from conftest import DEVICE, needs_triton
from dit_fast import backends, reference
from dit_fast.kernels import gelu
from dit_fast.kernels import gemm_gelu as gg
from dit_fast.kernels.adaln import poison_outputs
from dit_fast.ops import torch_backend as tb
from dit_fast.ops import triton_embed as te
from tolerances import FP32_RTOL, assert_close, rel_err

pytestmark = [needs_triton, pytest.mark.usefixtures("one_thread")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (leading dims of x, K, N): one row, odd rows, K = 72 (DiT's odd test width), odd K and N, 3-D x
SHAPES = [((1,), 72, 288), ((37,), 72, 288), ((37,), 33, 75), ((2, 5), 160, 96), ((64,), 144, 320)]


def _ref_gelu(pre64, bias):
    return F.gelu(pre64 if bias is None else pre64 + bias.double(), approximate="tanh")


def _inputs(lead, K, N, bias=True):
    x = torch.randn(*lead, K, device=DEVICE) * 2
    w = torch.randn(N, K, device=DEVICE) / math.sqrt(K)
    b = torch.randn(N, device=DEVICE) if bias else None
    return x, w, b


@contextlib.contextmanager
def _fc1_calls(monkeypatch):
    """Counts of fc1 runs by the Triton GEMM ("gemm") and by the elementwise GELU pass of the default path."""
    calls = {"gemm": 0, "gelu_pass": 0}

    def counting(key, fn):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(gg, "choose_tiles", counting("gemm", gg.choose_tiles))
    monkeypatch.setattr(gelu, "gelu_tanh_fwd", counting("gelu_pass", gelu.gelu_tanh_fwd))
    yield calls


@pytest.fixture
def triton_fc1(monkeypatch):
    monkeypatch.setenv(te.FC1_GEMM_VAR, "triton")
    monkeypatch.setattr(backends, "_warned", set())
    with _fc1_calls(monkeypatch) as calls:
        yield calls


# ------------------------------------------------------------------------------------------ launcher


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_float64(shape, dtype):
    lead, K, N = shape
    x, w, b = _inputs(lead, K, N)
    xl, wl, bl = x.to(dtype), w.to(dtype), b.to(dtype)
    with poison_outputs():
        out, pre = gg.linear_bias_gelu_fwd(xl, wl, bl, need_pre=True)
    assert out.dtype == pre.dtype == dtype and out.shape == pre.shape == (*lead, N)
    pre64 = x.double() @ w.double().T
    low_pre = F.linear(xl, wl) if dtype != torch.float32 else None
    low = F.gelu(F.linear(xl, wl, bl), approximate="tanh") if dtype != torch.float32 else None
    assert_close(pre, pre64, dtype, eager_lowp=low_pre, name="pre")
    assert_close(out, _ref_gelu(pre64, b), dtype, eager_lowp=low, name="out")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [((37,), 72, 288), ((1,), 160, 75)], ids=str)
def test_float32_weight_with_low_precision_x(shape, dtype):
    """Autocast's case: the float32 weight and bias are read as stored, the weight rounded to x's dtype per
    tile; judged against PyTorch's autocast F.linear (weight and bias cast to x's dtype)."""
    lead, K, N = shape
    x, w, b = _inputs(lead, K, N)
    xl = x.to(dtype)
    with poison_outputs():
        out, pre = gg.linear_bias_gelu_fwd(xl, w, b)
    assert out.dtype == pre.dtype == dtype
    pre64 = xl.double() @ w.to(dtype).double().T  # the GEMM's inputs as autocast rounds them
    low_pre = F.linear(xl, w.to(dtype))
    low = F.gelu(F.linear(xl, w.to(dtype), b.to(dtype)), approximate="tanh")
    assert_close(pre, pre64, dtype, eager_lowp=low_pre, name="pre")
    assert_close(out, _ref_gelu(pre64, b), dtype, eager_lowp=low, name="out")


@pytest.mark.parametrize(
    "tiles", ["_HALF_TILES", "_HALF_X_FP32_W_TILES", "_HALF_SMALL_M_TILES", "_HALF_UNALIGNED_TILES", "_FP32_TILES"]
)
@pytest.mark.parametrize("K", [72, 128])  # K a multiple of BLOCK_K (no K mask) or not
def test_gpu_tile_configs(tiles, K):
    """The GPU configs, run by the interpreter: M, N and (K=72) K smaller than one tile."""
    config = getattr(gg, tiles)
    dtype = torch.float32 if config is gg._FP32_TILES else torch.bfloat16
    x, w, b = _inputs((37,), K, 75)
    xl, wl = x.to(dtype), w.to(torch.float32 if "FP32_W" in tiles else dtype)
    with poison_outputs():
        out, pre = gg.linear_bias_gelu_fwd(xl, wl, b, tiles=config)
    pre64 = xl.double() @ wl.to(dtype).double().T
    low_pre = F.linear(xl, wl.to(dtype)) if dtype != torch.float32 else None
    low = F.gelu(F.linear(xl, wl.to(dtype), b.to(dtype)), approximate="tanh") if dtype != torch.float32 else None
    assert_close(pre, pre64, dtype, eager_lowp=low_pre, name="pre")
    assert_close(out, _ref_gelu(pre64, b), dtype, eager_lowp=low, name="out")


def test_without_bias_and_without_pre():
    x, w, _ = _inputs((37,), 72, 288)
    with poison_outputs():
        out, pre = gg.linear_bias_gelu_fwd(x, w, None, need_pre=True)
        out_inference, none = gg.linear_bias_gelu_fwd(x, w, None, need_pre=False)
    assert none.numel() == 0  # inference writes no pre-activation
    assert torch.equal(out, out_inference)
    pre64 = x.double() @ w.double().T
    assert_close(pre, pre64, torch.float32, name="pre")
    assert_close(out, _ref_gelu(pre64, None), torch.float32, name="out")


def test_empty_inputs():
    out, pre = gg.linear_bias_gelu_fwd(torch.randn(0, 7, 16, device=DEVICE), torch.randn(24, 16, device=DEVICE))
    assert out.shape == pre.shape == (0, 7, 24)
    b = torch.randn(24, device=DEVICE)
    out, _ = gg.linear_bias_gelu_fwd(torch.randn(3, 0, device=DEVICE), torch.randn(24, 0, device=DEVICE), b)
    assert_close(out, _ref_gelu(torch.zeros(3, 24, dtype=torch.float64), b), torch.float32, name="K = 0")


def test_tile_choice_is_a_fixed_function_of_the_shape(monkeypatch):
    monkeypatch.setattr(gg, "n_sm", lambda device: 132)  # an H100's SMs, without a GPU
    cuda = torch.device("cuda")
    bf16, fp32 = torch.bfloat16, torch.float32
    assert gg.choose_tiles(65536, 4608, 1152, bf16, bf16, cuda) == gg._HALF_TILES
    assert gg.choose_tiles(65536, 4608, 1152, bf16, fp32, cuda) == gg._HALF_X_FP32_W_TILES
    assert gg.choose_tiles(256, 4608, 1152, bf16, bf16, cuda) == gg._HALF_SMALL_M_TILES  # 72 tiles of 128 rows
    assert gg.choose_tiles(256, 4608, 1152, bf16, fp32, cuda) == gg._HALF_SMALL_M_FP32_W_TILES
    assert gg.choose_tiles(65536, 288, 72, bf16, bf16, cuda) == gg._HALF_UNALIGNED_TILES
    assert gg.choose_tiles(65536, 4608, 1152, fp32, fp32, cuda) == gg._FP32_TILES
    assert gg.choose_tiles(65536, 4608, 1152, bf16, bf16, torch.device("cpu")) == gg._INTERPRETER_TILES


def test_launcher_refuses_float64():
    x, w, b = _inputs((4,), 16, 32)
    with pytest.raises(ValueError, match="x must be float16, bfloat16 or float32, got torch.float64"):
        gg.linear_bias_gelu_fwd(x.double(), w, b)
    with pytest.raises(ValueError, match="weight must be float16, bfloat16 or float32"):
        gg.linear_bias_gelu_fwd(x, w.double(), b)


# ---------------------------------------------------------------------------------- op and gradients


def _eager(x, w, b):
    return F.gelu(F.linear(x, w, b), approximate="tanh")


@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [((2, 5), 72, 288), ((1, 37), 33, 75)], ids=str)
def test_gradients_match_float64(triton_fc1, shape, dtype, has_bias):
    lead, K, N = shape
    base = _inputs(lead, K, N, bias=has_bias)
    out, grads, g = _run(lambda *a: ops.linear_gelu_tanh(*a, backend="triton"), _leaves(*base, dtype=dtype))
    assert triton_fc1 == {"gemm": 1, "gelu_pass": 0}
    ref, ref_grads, _ = _run(tb.linear_gelu_tanh, _leaves(*base, dtype=torch.float64), g)
    low = low_grads = None
    if dtype != torch.float32:
        low, low_grads, _ = _run(_eager, _leaves(*base, dtype=dtype), g)
    assert out.dtype == dtype and [t.dtype for t in grads] == [dtype] * len(grads)
    assert_close(out, ref, dtype, eager_lowp=low, name="out")
    for name, got, want, lg in zip(["x", "weight", "bias"], grads, ref_grads, low_grads or [None] * 3):
        assert_close(got, want, dtype, eager_lowp=lg, name=f"d{name}")


def test_float32_weight_with_bfloat16_x(triton_fc1):
    """No autocast, x bfloat16, weight and bias float32: the dtypes of the default path (GEMM in bfloat16,
    d(weight) and d(bias) in float32), its accuracy or better."""
    base = _inputs((3, 7), 72, 288)
    inputs = _leaves(base[0], dtype=torch.bfloat16) + _leaves(*base[1:])
    out, grads, g = _run(lambda *a: ops.linear_gelu_tanh(*a, backend="triton"), inputs)
    assert triton_fc1["gemm"] == 1
    ref, ref_grads, _ = _run(tb.linear_gelu_tanh, _leaves(*base, dtype=torch.float64), g)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(te.FC1_GEMM_VAR, "cublas")
        default, default_grads, _ = _run(lambda *a: ops.linear_gelu_tanh(*a, backend="triton"), inputs, g)
    assert out.dtype == default.dtype == torch.bfloat16
    want_dtypes = [torch.bfloat16, torch.float32, torch.float32]
    assert [t.dtype for t in grads] == [t.dtype for t in default_grads] == want_dtypes
    assert_close(out, ref, torch.bfloat16, eager_lowp=default, name="out")
    for name, got, want, d in zip(["x", "weight", "bias"], grads, ref_grads, default_grads):
        assert_close(got, want, torch.bfloat16, eager_lowp=d, name=f"d{name}")


def test_under_autocast(triton_fc1):
    """float32 x, weight and bias under bfloat16 autocast: output and gradient dtypes of autocast's F.linear +
    GELU, its accuracy or better; the weight is not cast in the forward (the kernel rounds its tiles)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    base = _inputs((2, 9), 72, 288)
    N, K = base[1].shape
    casts = []

    class RecordWeightCasts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("_to_copy", "to", "copy_") and tuple(args[0].shape) == (N, K):
                casts.append(func)
            return func(*args, **(kwargs or {}))

    inputs = _leaves(*base)
    with torch.autocast(torch.device(DEVICE).type, torch.bfloat16):
        with RecordWeightCasts():
            out = ops.linear_gelu_tanh(*inputs, backend="triton")
    assert casts == [], f"the weight was cast in the forward: {casts}"
    assert triton_fc1["gemm"] == 1
    g = torch.randn_like(out, dtype=torch.float32)
    grads = torch.autograd.grad(out, inputs, g.to(out.dtype))
    low_inputs = _leaves(*base)
    with torch.autocast(torch.device(DEVICE).type, torch.bfloat16):
        low = _eager(*low_inputs)
    low_grads = torch.autograd.grad(low, low_inputs, g.to(low.dtype))
    ref, ref_grads, _ = _run(tb.linear_gelu_tanh, _leaves(*base, dtype=torch.float64), g)
    assert out.dtype == low.dtype == torch.bfloat16
    assert [t.dtype for t in grads] == [t.dtype for t in low_grads] == [torch.float32] * 3
    assert_close(out, ref, torch.bfloat16, eager_lowp=low, name="out")
    for name, got, want, lg in zip(["x", "weight", "bias"], grads, ref_grads, low_grads):
        assert_close(got, want, torch.bfloat16, eager_lowp=lg, name=f"d{name}")


def test_inference_writes_no_pre_activation(triton_fc1, monkeypatch):
    seen = []
    launch = gg.linear_bias_gelu_fwd
    monkeypatch.setattr(te._LINEAR_BIAS_GELU, "_launch_no_grad",
                        lambda *a: seen.append(a[3]) or launch(*a))
    x, w, b = _inputs((2, 5), 72, 96)
    with torch.no_grad():
        out = te.linear_gelu_tanh(x, w, b)
    out_plain = te.linear_gelu_tanh(x, w, b)  # no input requires grad: inference too
    assert seen == [False, False]
    assert_close(out, tb.linear_gelu_tanh(x.double(), w.double(), b.double()), torch.float32)
    assert torch.equal(out, out_plain)


def test_second_derivatives_match_torch_backend(triton_fc1):
    base = _inputs((2, 9), 5, 7)
    cot, directions = torch.randn(2, 9, 7, device=DEVICE), [torch.randn_like(t) for t in base]

    def hvp(fn, tensors):
        leaves = _leaves(*tensors)
        grads = torch.autograd.grad((fn(*leaves) * cot.to(leaves[0].dtype)).sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum((g * d.to(g.dtype)).sum() for g, d in zip(grads, directions)), leaves)

    got = hvp(lambda *a: ops.linear_gelu_tanh(*a, backend="triton"), base)
    assert triton_fc1["gemm"] == 1
    want = hvp(tb.linear_gelu_tanh, [t.double() for t in base])
    for name, g, w in zip(["x", "weight", "bias"], got, want):
        assert_close(g, w, torch.float32, name=f"d2/d{name}")


# ------------------------------------------------------------------------------------------ the switch


def test_default_path_is_unchanged(monkeypatch):
    monkeypatch.delenv(te.FC1_GEMM_VAR, raising=False)
    x, w, b = _inputs((2, 5), 72, 96)
    with _fc1_calls(monkeypatch) as calls:
        unset = te.linear_gelu_tanh(x, w, b)
        monkeypatch.setenv(te.FC1_GEMM_VAR, "cublas")
        cublas = te.linear_gelu_tanh(x, w, b)
    assert calls == {"gemm": 0, "gelu_pass": 2}
    assert torch.equal(unset, cublas)
    assert torch.equal(unset, gelu.gelu_tanh_fwd(F.linear(x, w), bias=b))


def test_bad_value_is_refused(monkeypatch):
    monkeypatch.setenv(te.FC1_GEMM_VAR, "cutlass")
    x, w, b = _inputs((2, 5), 16, 32)
    with pytest.raises(ValueError, match=r"DIT_FAST_FC1_GEMM must be one of \('cublas', 'triton'\), got 'cutlass'"):
        te.linear_gelu_tanh(x, w, b)


def test_unsupported_inputs_fall_back_with_one_warning(triton_fc1, monkeypatch):
    x, w, b = _inputs((2, 5), 16, 32)
    x, w, b = x.double(), w.double(), b.double()
    with pytest.warns(backends.BackendFallbackWarning, match=r"DIT_FAST_FC1_GEMM=triton.*x is torch\.float64") as rec:
        first = te.linear_gelu_tanh(x, w, b)
        second = te.linear_gelu_tanh(x, w, b)
    assert len([r for r in rec if "DIT_FAST_FC1_GEMM" in str(r.message)]) == 1
    assert triton_fc1 == {"gemm": 0, "gelu_pass": 2}
    monkeypatch.setenv(te.FC1_GEMM_VAR, "cublas")
    assert torch.equal(first, te.linear_gelu_tanh(x, w, b)) and torch.equal(first, second)


# ------------------------------------------------------------------------------ registered op, compile


@pytest.mark.parametrize("need_pre", [True, False])
@pytest.mark.parametrize("has_bias", [True, False])
def test_opcheck(need_pre, has_bias):
    x, w, b = _inputs((3, 5), 24, 40, bias=has_bias)
    args = [x.requires_grad_(need_pre), w.requires_grad_(need_pre), b, need_pre]
    torch.library.opcheck(torch.ops.dit_fast_triton.linear_bias_gelu_tanh_fwd.default, args)


def test_compile_fullgraph_matches_eager(triton_fc1):
    def mlp_in(x, w1, b1):
        return te.linear_gelu_tanh(x, w1, b1) * 0.5

    args = _leaves(*_inputs((2, 9), 40, 72))
    torch._dynamo.reset()
    compiled = torch.compile(mlp_in, fullgraph=True, backend="aot_eager")
    out_e, grads_e, g = _run(mlp_in, args)
    out_c, grads_c, _ = _run(compiled, args, g)
    assert triton_fc1 == {"gemm": 2, "gelu_pass": 0}
    assert rel_err(out_c, out_e) <= FP32_RTOL
    for a, b in zip(grads_c, grads_e):
        assert rel_err(a, b) <= FP32_RTOL


# --------------------------------------------------------------------------------------- a tiny DiT

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=40, depth=2, num_heads=2, num_classes=10,
            class_dropout_prob=0.0)


def _tiny_pair():
    ref = reference.DiT(**TINY).train()
    with torch.no_grad():  # the published init zeroes the adaLN and final layers: randomize everything
        for p in ref.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05)
    fast = dit_fast.DiT(**TINY, backend="triton", attn_backend="math")
    fast.load_state_dict(ref.state_dict())
    return ref, fast.train()


def _step(model, x, t, y, grad_out, autocast_dtype=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = model(x, t, y)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=str)
def test_tiny_dit_trains_one_step(triton_fc1, autocast_dtype):
    ref, fast = _tiny_pair()
    ref64 = copy.deepcopy(ref).double()
    x = torch.randn(3, 4, 8, 8)
    t = torch.randint(0, 1000, (3,)).float()
    y = torch.randint(0, 10, (3,))
    grad_out = torch.randn(3, 8, 8, 8)
    out, grads = _step(fast, x, t, y, grad_out, autocast_dtype)
    assert triton_fc1 == {"gemm": TINY["depth"], "gelu_pass": 0}
    out64, grads64 = _step(ref64, x.double(), t.double(), y, grad_out.double())
    if autocast_dtype is not None:  # the reference model under autocast sets the bound
        ref_out, ref_grads = _step(ref, x, t, y, grad_out, autocast_dtype)
        assert_close(out, out64, autocast_dtype, eager_lowp=ref_out, name="output")
        assert_close(grads, grads64, autocast_dtype, eager_lowp=ref_grads, name="param grads")
        return
    assert_close(out, out64, torch.float32, name="output")
    assert_close(grads, grads64, torch.float32, name="param grads")
    for model in (fast, ref64):
        torch.optim.SGD(model.parameters(), lr=0.1).step()
    for (name, p), q in zip(fast.named_parameters(), ref64.parameters()):
        assert_close(p.detach(), q.detach(), torch.float32, name=f"{name} after one SGD step")


@needs_triton
def test_bench_contender_runs_the_gemm_path(monkeypatch):
    """`dit-fast kernels`' triton-gemm contender times linear_gelu_tanh with DIT_FAST_FC1_GEMM=triton over
    its whole pass, and only that op; the variable is restored after."""
    from dit_fast.bench.kernels import CONTENDERS, op_fn

    monkeypatch.delenv("DIT_FAST_FC1_GEMM", raising=False)
    assert "triton-gemm" in CONTENDERS
    assert op_fn("triton-gemm", "gated_residual_adaln") is None
    fn = op_fn("triton-gemm", "linear_gelu_tanh")
    x, w, b = _inputs((5,), 40, 72)
    with _fc1_calls(monkeypatch) as calls, fn.bench_context():
        assert te.fc1_gemm_choice() == "triton"
        fn(x, w, b)
    assert "DIT_FAST_FC1_GEMM" not in os.environ
    assert calls == {"gemm": 1, "gelu_pass": 0}
