"""The C++/CUDA extension dit_fast._C (backend "ext"): build metadata, CPU kernels against float64
references, poisoned outputs, determinism, op registration (opcheck, torch.compile), and on a GPU
the CUDA kernels against Triton and torch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import test_ops_adaln_norm_modes as norm_modes  # LightningDiT's modes: their inputs and eager composition
import torch
import torch.nn.functional as F

from dit_fast import ops
from dit_fast.ops import ext_backend, torch_backend
from tolerances import assert_close

ROOT = Path(__file__).resolve().parents[1]
EPS = 1e-6

needs_ext = pytest.mark.skipif(not ext_backend.available("cpu")[0], reason=str(ext_backend.available("cpu")[1]))


# ----------------------------------------------------------------------------------------------
# Inputs, references and PyTorch's own low-precision composition
# ----------------------------------------------------------------------------------------------

OPS = ("adaln_modulate", "gated_residual", "gated_residual_adaln")


def make_inputs(op, B, L, D, dtype, mod_dtype=None, device="cpu", requires_grad=True):
    """Large-mean x (norms must not lose accuracy there), modulation vectors of O(1)."""
    mod_dtype = mod_dtype or dtype
    x = (torch.randn(B, L, D, device=device) * 2 + 5 * torch.rand(B, L, 1, device=device)).to(dtype)
    y = torch.randn(B, L, D, device=device).to(mod_dtype)
    gate, shift, scale = [(0.5 * torch.randn(B, D, device=device)).to(mod_dtype) for _ in range(3)]
    args = {
        "adaln_modulate": (x, shift, scale),
        "gated_residual": (x, y, gate),
        "gated_residual_adaln": (x, y, gate, shift, scale),
    }[op]
    return [a.requires_grad_(requires_grad) for a in args]


def call(module, op, args, h_dtype=None):
    """Outputs of `op` from a backend module, always as a tuple."""
    if op == "gated_residual":
        return (module.gated_residual(*args),)
    if op == "adaln_modulate":
        return (module.adaln_modulate(*args, EPS, h_dtype),)
    return tuple(module.gated_residual_adaln(*args, EPS, h_dtype))


def eager_lowp(op, args, h_dtype=None):
    """DiT's own eager PyTorch computation, in the inputs' precision."""

    def modulate(x, shift, scale):
        h = F.layer_norm(x, x.shape[-1:], eps=EPS) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
        return h.to(h_dtype or x.dtype)

    if op == "adaln_modulate":
        return (modulate(*args),)
    x, y, gate = args[:3]
    x_out = (x + gate.unsqueeze(1) * y).to(x.dtype)
    if op == "gated_residual":
        return (x_out,)
    return x_out, modulate(x_out, *args[3:])


def fwd_bwd(fn, args, grads_out):
    """Outputs of fn(*args) and the gradients of sum(out * g) with respect to args."""
    outs = fn(args)
    loss = sum((o.to(g.dtype) * g).sum() for o, g in zip(outs, grads_out))
    grads = torch.autograd.grad(loss, args)
    return [o.detach() for o in outs], list(grads)


def as64(args):
    return [a.detach().double().requires_grad_(True) for a in args]


def detached(args):
    return [a.detach().clone().requires_grad_(True) for a in args]


# ----------------------------------------------------------------------------------------------
# Build metadata and availability
# ----------------------------------------------------------------------------------------------


@needs_ext
def test_extension_reports_torch_version():
    from dit_fast import _C

    assert _C.torch_version == torch.__version__.split("+")[0]
    assert isinstance(_C.with_cuda, bool)
    assert ext_backend.available("cpu") == (True, "C++ CPU kernels (dit_fast._C)")
    for name in ("adaln_modulate_fwd", "adaln_modulate_bwd", "gated_residual_fwd", "gated_residual_bwd",
                 "gated_residual_adaln_fwd", "gated_residual_adaln_bwd"):
        assert hasattr(torch.ops.dit_fast_ext, name)


@needs_ext
def test_cuda_unavailable_is_explained():
    from dit_fast import _C

    if _C.with_cuda:
        pytest.skip("this build has CUDA kernels")
    ok, why = ext_backend.available("cuda")
    assert not ok
    assert "built without CUDA" in why and "pip install --no-build-isolation -e ." in why


def test_stale_build_is_detected(monkeypatch):
    def undefined_symbol(name):
        raise ImportError(f"{name}: undefined symbol: _ZN3c104impl3cow11cow_deleterEPv")

    mod, why = ext_backend._load(undefined_symbol)
    assert mod is None
    assert f"but torch {torch.__version__} is installed; rebuild with pip install --no-build-isolation -e ." in why
    assert "undefined symbol" in why

    class Stale:
        torch_version = "2.0.0"
        with_cuda = False

    mod, why = ext_backend._load(lambda name: Stale)
    assert mod is None
    assert why.startswith(f"dit_fast._C was built for torch 2.0.0 but torch {torch.__version__} is installed")

    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    mod, why = ext_backend._load(missing)
    assert mod is None and "not built" in why


def test_dit_fast_works_without_extension():
    # A fresh interpreter in which dit_fast._C cannot be imported: dit_fast imports, "ext" says why
    # it is unusable, and a request for it falls back to torch with a warning.
    code = """
import sys, warnings
sys.modules["dit_fast._C"] = None
import torch, dit_fast
from dit_fast import ops
from dit_fast.ops import ext_backend, torch_backend
ok, why = ext_backend.available("cpu")
assert not ok and "not built" in why, why
x, s, c = torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(2, 8)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    h = ops.adaln_modulate(x, s, c, backend="ext")
assert torch.equal(h, torch_backend.adaln_modulate(x, s, c)), "fallback result"
assert any("not built" in str(m.message) for m in w), [str(m.message) for m in w]
print("OK")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]


@needs_ext
def test_dispatcher_runs_ext_without_fallback(recwarn):
    x, shift, scale = make_inputs("adaln_modulate", 2, 3, 72, torch.float32, requires_grad=False)
    h = ops.adaln_modulate(x, shift, scale, backend="ext")
    assert torch.equal(h, ext_backend.adaln_modulate(x, shift, scale, EPS, None))
    assert not [w for w in recwarn if "dit_fast" in str(w.message)]


# ----------------------------------------------------------------------------------------------
# The ext kernels against float64 (dtypes, shapes, mixed dtypes, strides, poisoned outputs, float64,
# determinism, torch.compile) run in the backend-parametrized suites: tests/test_ops_adaln.py and
# tests/test_double_backward.py. Here: what only the extension has (build metadata, its raw ops).
# ----------------------------------------------------------------------------------------------


@needs_ext
def test_cpu_bad_input_names_argument():
    x = torch.randn(2, 3, 8)
    with pytest.raises(RuntimeError, match=r"scale must have shape \[B, D\] = \[2, 8\]"):
        torch.ops.dit_fast_ext.adaln_modulate_fwd(x, torch.randn(2, 8), torch.randn(2, 7), EPS, None)
    with pytest.raises(RuntimeError, match="y must have shape"):
        torch.ops.dit_fast_ext.gated_residual_fwd(x, torch.randn(2, 3, 9), torch.randn(2, 8), None)
    with pytest.raises(RuntimeError, match=r"bias must have shape \[D\] = \[8\]"):
        torch.ops.dit_fast_ext.gated_residual_fwd(x, torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(7))


# ----------------------------------------------------------------------------------------------
# Registration: opcheck and torch.compile
# ----------------------------------------------------------------------------------------------


def _opcheck_cases():
    B, L, D = 2, 3, 16
    r = lambda *s, dt=torch.float32: torch.randn(*s, dtype=dt)  # noqa: E731
    x, y = r(B, L, D), r(B, L, D)
    stats = (r(B, L), r(B, L).abs() + 0.5)
    return [
        ("adaln_modulate_fwd", lambda: (r(B, L, D), r(B, D), r(B, D), EPS, None), True),
        ("adaln_modulate_fwd", lambda: (r(B, L, D), r(B, D, dt=torch.bfloat16), r(B, D, dt=torch.bfloat16), EPS,
                                        torch.bfloat16), True),
        ("adaln_modulate_bwd", lambda: (r(B, L, D), x, *stats, r(B, D)), False),
        ("gated_residual_fwd", lambda: (r(B, L, D), r(B, L, D), r(B, D), None), True),
        ("gated_residual_fwd", lambda: (r(B, L, D), r(B, L, D, dt=torch.bfloat16), r(B, D), r(D)), True),
        ("gated_residual_bwd", lambda: (r(B, L, D), y, r(B, D), None), False),
        ("gated_residual_bwd", lambda: (r(B, L, D), y, r(B, D), r(D)), False),
        ("gated_residual_adaln_fwd", lambda: (r(B, L, D), r(B, L, D), r(B, D), None, r(B, D), r(B, D), EPS, None),
         True),
        ("gated_residual_adaln_fwd", lambda: (r(B, L, D), r(B, L, D), r(B, D), r(D), r(B, D), r(B, D), EPS, None),
         True),
        ("gated_residual_adaln_bwd", lambda: (r(B, L, D), r(B, L, D), x, y, r(B, D), None, *stats, r(B, D)), False),
        ("gated_residual_adaln_bwd", lambda: (r(B, L, D), r(B, L, D), x, y, r(B, D), r(D), *stats, r(B, D)), False),
        ("gated_residual_adaln_bwd", lambda: (r(B, L, D), None, x, y, r(B, D), None, *stats, r(B, D)), False),
        # LightningDiT's modes: RMSNorm (saved mean 0) with a gain, no shift
        ("adaln_modulate_fwd", lambda: (r(B, L, D), None, r(B, D), EPS, None, True, r(D)), True),
        ("adaln_modulate_bwd", lambda: (r(B, L, D), x, torch.zeros(B, L), stats[1], r(B, D), True, r(D)), False),
        ("gated_residual_adaln_fwd", lambda: (r(B, L, D), r(B, L, D), r(B, D), None, None, r(B, D), EPS, None, True,
                                              r(D, dt=torch.bfloat16)), True),
        ("gated_residual_adaln_bwd", lambda: (r(B, L, D), r(B, L, D), x, y, r(B, D), None, torch.zeros(B, L), stats[1],
                                              r(B, D), True, r(D)), False),
    ]


@needs_ext
@pytest.mark.parametrize("name,make,differentiable", _opcheck_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, make, differentiable):
    args = list(make())
    if differentiable:
        args = [a.requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    torch.library.opcheck(getattr(torch.ops.dit_fast_ext, name).default, tuple(args))


# ----------------------------------------------------------------------------------------------
# CUDA: compile check (CI runs the script directly) and GPU parity
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(os.environ.get("DIT_FAST_TEST_NVCC") != "1", reason="set DIT_FAST_TEST_NVCC=1 (slow: nvcc)")
def test_cuda_sources_compile_with_nvcc():
    res = subprocess.run(["bash", str(ROOT / "scripts" / "check_cuda_compile.sh")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]


def _gpu_parity(op, dtype, mod_dtype, h_dtype, B, L, D):
    from dit_fast.ops import triton_backend

    args = make_inputs(op, B, L, D, dtype, mod_dtype, device="cuda")
    out_shapes = [o.shape for o in call(torch_backend, op, [a.detach() for a in args], h_dtype)]
    grads_out = [torch.randn(s, device="cuda") for s in out_shapes]
    ref, ref_grads = fwd_bwd(lambda a: call(torch_backend, op, a), as64(args), [g.double() for g in grads_out])
    low, low_grads = fwd_bwd(lambda a: eager_lowp(op, a, h_dtype), detached(args), grads_out)
    lowp = torch.bfloat16 if torch.bfloat16 in (dtype, mod_dtype) else torch.float16
    if dtype == mod_dtype == torch.float32:
        lowp = torch.float32
    for name, module in (("ext", ext_backend), ("triton", triton_backend)):
        out, grads = fwd_bwd(lambda a, module=module: call(module, op, a, h_dtype), detached(args), grads_out)
        for i, (o, r, lo) in enumerate(zip(out, ref, low)):
            assert_close(o, r, lowp, eager_lowp=lo, name=f"{name} {op} out{i}")
        for i, (g, r, lo) in enumerate(zip(grads, ref_grads, low_grads)):
            assert_close(g, r, lowp, eager_lowp=lo, name=f"{name} {op} grad{i}")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype,mod_dtype,h_dtype",
    [
        (torch.float32, torch.float32, None),
        (torch.bfloat16, torch.bfloat16, None),
        (torch.float16, torch.float16, None),
        (torch.float32, torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float16, None),
    ],
    ids=str,
)
@pytest.mark.parametrize("op", OPS)
def test_gpu_ext_matches_triton_and_reference_dit_xl(op, dtype, mod_dtype, h_dtype):
    ok, why = ext_backend.available("cuda")
    if not ok:
        pytest.skip(why)
    _gpu_parity(op, dtype, mod_dtype, h_dtype, B=8, L=256, D=1152)  # DiT-XL/2 at 256px, batch 8


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 1, 72), (3, 17, 100), (2, 33, 4096)], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_gpu_ext_odd_shapes(op, shape):
    ok, why = ext_backend.available("cuda")
    if not ok:
        pytest.skip(why)
    _gpu_parity(op, torch.bfloat16, torch.bfloat16, None, *shape)


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
def test_gpu_ext_bitwise_deterministic(op):
    ok, why = ext_backend.available("cuda")
    if not ok:
        pytest.skip(why)
    args = make_inputs(op, 8, 256, 1152, torch.bfloat16, device="cuda")
    grads_out = [torch.randn(8, 256, 1152, device="cuda") for _ in range(2)]
    first = fwd_bwd(lambda a: call(ext_backend, op, a), detached(args), grads_out)
    second = fwd_bwd(lambda a: call(ext_backend, op, a), detached(args), grads_out)
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(a, b)


@needs_ext
def test_cpu_kernels_take_the_norm_modes_directly():
    """The registered CPU op's RMSNorm mode with a gain and no shift is the torch backend's (float64 inputs)."""
    x = torch.randn(2, 3, 40, dtype=torch.float64)
    scale, w = torch.randn(2, 40, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    h, mean, rstd = torch.ops.dit_fast_ext.adaln_modulate_fwd(x, None, scale, 1e-6, None, True, w)
    torch.testing.assert_close(h, torch_backend.adaln_modulate(x, None, scale, 1e-6, None, "rms", w))
    assert (mean == 0).all()
    torch.testing.assert_close(rstd, (x.square().mean(-1) + 1e-6).rsqrt())


# LightningDiT's norm modes (issue 22) on the CUDA kernels: (norm, shift, gain) as in
# tests/test_ops_adaln_norm_modes.py (its inputs and eager composition), called on ext_backend directly (no
# fallback can hide a missing kernel). D = 1152 (XL), 1536 (1p6B), 117 (odd: element-wise loads, a partial thread).
NORM_MODES = [("rms", False, True), ("rms", True, True), ("rms", True, False), ("layer", True, True),
              ("layer", False, False)]
NORM_MODE_SHAPES = [(4, 256, 1152), (2, 64, 1536), (3, 17, 117)]


def _run_norm_mode(module, op, t, norm):
    """Outputs of `op` in a norm mode from a backend module (ext_backend or torch_backend), as a tuple."""
    if op == "adaln_modulate":
        return (module.adaln_modulate(t["x"], t.get("shift"), t["scale"], EPS, None, norm, t.get("weight")),)
    return tuple(module.gated_residual_adaln(t["x"], t["y"], t["gate"], t.get("shift"), t["scale"], EPS, None, None,
                                             norm, t.get("weight")))


def _poison_cuda_cache(tensors):
    """NaN-filled blocks of these tensors' sizes, freed into the caching allocator, so that the outputs the C++ ops
    allocate next reuse them: an element a kernel leaves unwritten reads as NaN."""
    blocks = [torch.full_like(t, float("nan")) for t in tensors for _ in range(2)]
    del blocks


def _gpu_norm_mode_parity(op, norm, shift, gain, dtype, B, L, D):
    t = norm_modes.make_inputs(op, B, L, D, dtype, shift, gain, norm)
    cot = [torch.randn(B, L, D, device="cuda").to(dtype) for _ in range(2 if "gated" in op else 1)]
    ref, ref_grads = norm_modes.with_grads(lambda a: _run_norm_mode(torch_backend, op, a, norm),
                                           {k: v.double() for k, v in t.items()}, [c.double() for c in cot])
    low, low_grads = (None,) * len(ref), {}
    if dtype != torch.float32:
        low, low_grads = norm_modes.with_grads(lambda a: norm_modes.eager_lowp(op, a, norm), t, cot)
    _poison_cuda_cache([*cot, *t.values()])
    outs, grads = norm_modes.with_grads(lambda a: _run_norm_mode(ext_backend, op, a, norm), t, cot)
    for i, (o, r, lo) in enumerate(zip(outs, ref, low)):
        assert o.dtype == dtype
        assert_close(o, r, dtype, eager_lowp=lo, name=f"ext {op} {norm} out{i}")
    assert set(grads) == set(t)
    for k, g in grads.items():
        assert g.dtype == t[k].dtype and g.shape == t[k].shape, k
        assert_close(g, ref_grads[k], dtype, eager_lowp=low_grads.get(k), name=f"ext {op} {norm} d{k}")


def _need_cuda_ext():
    ok, why = ext_backend.available("cuda")
    if not ok:
        pytest.skip(why)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("B,L,D", NORM_MODE_SHAPES)
@pytest.mark.parametrize("norm,shift,gain", NORM_MODES)
@pytest.mark.parametrize("op", ["adaln_modulate", "gated_residual_adaln"])
def test_gpu_ext_norm_modes_match_reference(op, norm, shift, gain, B, L, D, dtype):
    _need_cuda_ext()
    _gpu_norm_mode_parity(op, norm, shift, gain, dtype, B, L, D)


@pytest.mark.gpu
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_gpu_ext_norm_mode_statistics(norm):
    """The saved statistics of a norm mode: RMSNorm's mean is 0 and its rstd 1 / sqrt(mean(x^2) + eps)."""
    _need_cuda_ext()
    x = torch.randn(3, 17, 1152, device="cuda").to(torch.bfloat16) + (0.0 if norm == "rms" else 3.0)
    scale, w = torch.randn(3, 1152, device="cuda"), 1 + 0.3 * torch.randn(1152, device="cuda")
    _poison_cuda_cache([torch.empty(3, 17, device="cuda")])
    _, mean, rstd = torch.ops.dit_fast_ext.adaln_modulate_fwd(x, None, scale, EPS, None, norm == "rms", w)
    x64 = x.double()
    if norm == "rms":
        assert (mean == 0).all()
        want = (x64.square().mean(-1) + EPS).rsqrt()
    else:
        assert_close(mean, x64.mean(-1), torch.float32, name="mean")
        want = (x64.var(-1, unbiased=False) + EPS).rsqrt()
    assert_close(rstd, want, torch.float32, name="rstd")


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["adaln_modulate", "gated_residual_adaln"])
def test_gpu_ext_norm_modes_bitwise_deterministic(op):
    """LightningDiT's mode (RMSNorm with its gain, no shift): dweight's fixed-order reduction included."""
    _need_cuda_ext()
    t = norm_modes.make_inputs(op, 8, 256, 1152, torch.bfloat16, False, True, "rms")
    cot = [torch.randn(8, 256, 1152, device="cuda").to(torch.bfloat16) for _ in range(2 if "gated" in op else 1)]
    first = norm_modes.with_grads(lambda a: _run_norm_mode(ext_backend, op, a, "rms"), t, cot)
    second = norm_modes.with_grads(lambda a: _run_norm_mode(ext_backend, op, a, "rms"), t, cot)
    for a, b in zip(first[0], second[0]):
        assert torch.equal(a, b)
    for k in t:
        assert torch.equal(first[1][k], second[1][k]), k
