"""qk_norm_rope (LightningDiT's q/k preparation: per-head RMS QK-norm + 2D RoPE, v passed through) on every
backend that runs it.

Called through dit_fast.ops; q, k, v and the gradients of qkv (packed) and of both gains compared with the
torch backend on float64 copies (tests/tolerances.py), outputs poisoned before the kernels write them, the
head dims of the published models (72, 64) and odd ones, L = 1, batch 1, strided inputs and gradients.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import dit_fast.ops as ops
from dit_fast import backends
from dit_fast.ops import torch_lightning
from dit_fast.ops.torch_lightning import rope_2d_tables
from tolerances import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ("torch", "triton")
LOWP = (torch.bfloat16, torch.float16)
EPS = 1e-6
# "norm": RMS QK-norm with gains; "layer": LayerNorm QK-norm (LightningDiT's use_qknorm without use_rmsnorm);
# "bias": the norms' biases too
MODES = ["norm+rope", "norm", "rope", "neither", "layer+bias+rope"]

# (B, L, H, Dh): LightningDiT-XL (16 heads of 72, D = 1152) and 1p0B (24 of 64, D = 1536) at few tokens,
# L = 1, batch 1, odd head counts and head dims (even: RoPE rotates pairs).
CASES = [(1, 1, 16, 72), (2, 3, 16, 72), (1, 4, 24, 64), (3, 5, 3, 10), (1, 1, 1, 2), (2, 9, 2, 64), (1, 16, 5, 6)]


def need(backend: str) -> None:
    ok, why = backends.probe(backend, DEVICE)
    if not ok:
        pytest.skip(f"backend {backend!r} unavailable on {DEVICE}: {why}")


def make_inputs(B, L, H, Dh, dtype, mode, gain_dtype=None, table_dtype=None):
    """qkv with a per-head scale spread (what the RMS norm undoes), gains near 1, and cos/sin: the published
    2D tables for a square L with Dh % 4 == 0, random ones otherwise (the op takes any tables)."""
    head_scale = (0.5 + 2 * torch.rand(3 * H, device=DEVICE)).repeat_interleave(Dh)
    qkv = torch.randn(B, L, 3 * H * Dh, device=DEVICE) * head_scale
    inp = {"qkv": qkv.to(dtype), "q_gain": None, "k_gain": None, "cos": None, "sin": None, "q_bias": None,
           "k_bias": None, "norm": "layer" if "layer" in mode else "rms"}
    if "norm" in mode or "layer" in mode:
        for name in ("q_gain", "k_gain"):
            inp[name] = (1 + 0.3 * torch.randn(Dh, device=DEVICE)).to(gain_dtype or dtype)
    if "bias" in mode:
        for name in ("q_bias", "k_bias"):
            inp[name] = (0.3 * torch.randn(Dh, device=DEVICE)).to(gain_dtype or dtype)
    if "rope" in mode:
        grid = math.isqrt(L)
        if grid * grid == L and Dh % 4 == 0:
            cos, sin = rope_2d_tables(Dh, grid, device=DEVICE)
        else:
            cos, sin = torch.randn(2, L, Dh, device=DEVICE)
        inp["cos"], inp["sin"] = cos.to(table_dtype or dtype), sin.to(table_dtype or dtype)
    return inp


def call(inp, num_heads, backend, eps=EPS):
    extra = {"q_bias": inp["q_bias"], "k_bias": inp["k_bias"], "norm": inp["norm"]}
    fn = torch_lightning.qk_norm_rope if backend == "reference" else (
        lambda *a, **kw: ops.qk_norm_rope(*a, **kw, backend=backend))
    return fn(inp["qkv"], num_heads, inp["q_gain"], inp["k_gain"], eps, inp["cos"], inp["sin"], **extra)


def as_dtype(inp, dtype):
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in inp.items()}


def eager_lowp(inp, num_heads):
    """The published composition in qkv's (low) precision, as LightningDiT's attention runs it: RMSNorm in
    float32 rounded back, then the gain, then the rotation, every step rounded to the dtype."""
    qkv = inp["qkv"]
    B, L, D3 = qkv.shape
    dt = qkv.dtype
    q, k, v = qkv.reshape(B, L, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

    def prep(x, gain, bias):
        if gain is not None and inp["norm"] == "layer":
            x = F.layer_norm(x, x.shape[-1:], gain.to(dt), None if bias is None else bias.to(dt), EPS)
        elif gain is not None:
            xf = x.float()
            x = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(dt) * gain.to(dt)
            x = x if bias is None else x + bias.to(dt)
        if inp["cos"] is not None:
            x = x * inp["cos"].to(dt) + torch_lightning.rotate_half_interleaved(x) * inp["sin"].to(dt)
        return x

    return prep(q, inp["q_gain"], inp["q_bias"]), prep(k, inp["k_gain"], inp["k_bias"]), v


GRAD_NAMES = ("qkv", "q_gain", "k_gain", "q_bias", "k_bias")


def with_grads(fn, inp, cotangents):
    """(outputs, {name: grad}) of fn on leaf copies of inp; cos/sin stay fixed buffers."""
    leaves = {k: (v.detach().clone().requires_grad_() if k in GRAD_NAMES else v) if v is not None else None
              for k, v in inp.items()}
    outs = fn(leaves)
    wrt = [k for k in GRAD_NAMES if leaves[k] is not None]
    used = [(o, c) for o, c in zip(outs, cotangents) if c is not None]
    grads = torch.autograd.grad([o for o, _ in used], [leaves[k] for k in wrt], grad_outputs=[c for _, c in used],
                                allow_unused=True, materialize_grads=True)
    return outs, dict(zip(wrt, grads))


def random_cotangents(outs, layout="contiguous"):
    """Gradients of q, k, v as SDPA might hand them back: [B, H, L, Dh] contiguous, or in [B, L, H, Dh] order."""
    if layout == "contiguous":
        return [torch.randn(o.shape, device=o.device).to(o.dtype) for o in outs]
    return [torch.randn(o.transpose(1, 2).shape, device=o.device).to(o.dtype).transpose(1, 2) for o in outs]


def run_and_check(backend, inp, num_heads, cotangents=None, lowp_inputs=None):
    outs = call(inp, num_heads, backend)
    cotangents = random_cotangents(outs) if cotangents is None else cotangents
    outs, grads = with_grads(lambda t: call(t, num_heads, backend), inp, cotangents)
    as64 = as_dtype(inp, torch.float64)
    cot64 = [c.double() if c is not None else None for c in cotangents]
    ref, ref_grads = with_grads(lambda t: call(t, num_heads, "reference"), as64, cot64)
    dtype = inp["qkv"].dtype
    eager, eager_grads = (None,) * 3, {}
    if dtype in LOWP:
        eager, eager_grads = with_grads(lambda t: eager_lowp(t, num_heads), inp, cotangents)
    for name, o, r, e in zip("qkv", outs, ref, eager):
        assert o.dtype == dtype and o.shape == r.shape, f"{backend} {name}: {o.dtype} {tuple(o.shape)}"
        assert_close(o, r, dtype, e, name=f"{backend} {name}")
    for k, g in grads.items():
        assert g.dtype == inp[k].dtype, f"{backend}: grad of {k} has dtype {g.dtype}, input {inp[k].dtype}"
        assert_close(g, ref_grads[k], g.dtype if g.dtype in LOWP else dtype, eager_grads.get(k),
                     name=f"{backend} grad of {k}")
    return outs, grads


@pytest.mark.parametrize("B,L,H,Dh", CASES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float32(backend, mode, B, L, H, Dh):
    need(backend)
    if mode.startswith("layer") and Dh == 2:
        # LayerNorm over 2 elements maps every row to (-1, 1) up to eps: its input gradient is O(eps / d^3), so
        # float32 rounding (condition ~ 1 / eps) decides it and no relative bound holds. 4 is the smallest
        # well-posed head dim for LayerNorm (RMSNorm keeps 2).
        Dh = 4
    run_and_check(backend, make_inputs(B, L, H, Dh, torch.float32, mode), H)


@pytest.mark.parametrize("mode", ["layer", "layer+rope", "norm+bias+rope", "layer+bias"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_variants(backend, mode):
    """LayerNorm QK-norm with and without its bias, RMSNorm with a bias, each with and without RoPE."""
    need(backend)
    run_and_check(backend, make_inputs(2, 4, 16, 72, torch.float32, mode), 16)
    run_and_check(backend, make_inputs(1, 5, 3, 10, torch.float32, mode), 3)


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("B,L,H,Dh", [(2, 4, 16, 72), (1, 9, 24, 64)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision(backend, B, L, H, Dh, dtype):
    need(backend)
    run_and_check(backend, make_inputs(B, L, H, Dh, dtype, "norm+rope"), H)
    run_and_check(backend, make_inputs(B, L, H, Dh, dtype, "layer+bias+rope"), H)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_as_under_autocast(backend):
    """The model under autocast: a bfloat16 QKV GEMM output, float32 gain parameters and RoPE buffers."""
    need(backend)
    inp = make_inputs(2, 16, 16, 72, torch.bfloat16, "norm+rope", gain_dtype=torch.float32,
                      table_dtype=torch.float32)
    run_and_check(backend, inp, 16)


def test_v_is_a_view_and_q_k_are_laid_out_for_attention():
    """v: a view of qkv (no copy); q, k: [B, H, L, Dh] whose transpose(1, 2) is contiguous, on every backend."""
    for backend in BACKENDS:
        need(backend)
        inp = make_inputs(2, 4, 3, 8, torch.float32, "norm+rope")
        q, k, v = call(inp, 3, backend)
        assert v.data_ptr() == inp["qkv"].data_ptr() + 2 * 3 * 8 * inp["qkv"].element_size(), backend
        assert v.untyped_storage().data_ptr() == inp["qkv"].untyped_storage().data_ptr(), backend
        for t in (q, k):
            assert t.shape == (2, 3, 4, 8) and t.transpose(1, 2).is_contiguous(), backend
        with torch.no_grad():  # and without grad (the launcher path) the same
            assert call(inp, 3, backend)[2].data_ptr() == v.data_ptr()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotation_matches_published_formula_elementwise(backend):
    """One token, one head, written out: out[2i] = n[2i] cos[2i] - n[2i+1] sin[2i],
    out[2i+1] = n[2i+1] cos[2i+1] + n[2i] sin[2i+1] (EVA's rotate_half on interleaved pairs)."""
    need(backend)
    Dh = 8
    inp = make_inputs(1, 1, 1, Dh, torch.float64 if backend == "torch" else torch.float32, "rope")
    q = call(inp, 1, backend)[0][0, 0, 0].double()
    x, c, s = inp["qkv"][0, 0, :Dh].double(), inp["cos"][0].double(), inp["sin"][0].double()
    want = torch.empty(Dh, dtype=torch.float64, device=DEVICE)
    want[0::2] = x[0::2] * c[0::2] - x[1::2] * s[0::2]
    want[1::2] = x[1::2] * c[1::2] + x[0::2] * s[1::2]
    torch.testing.assert_close(q, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("grid,Dh", [(16, 72), (16, 64), (3, 8), (24, 72)])
def test_rope_tables_are_the_published_2d_construction(grid, Dh):
    """Element by element: token (r, c) = (l // grid, l % grid); feature d < Dh/2 turns by
    r * theta^(-2 (d // 2) / (Dh / 2)), feature d >= Dh/2 by c * theta^(-2 ((d - Dh/2) // 2) / (Dh / 2))."""
    cos, sin = rope_2d_tables(Dh, grid)
    assert cos.shape == (grid * grid, Dh) and cos.dtype == torch.float32
    half = Dh // 2
    ls, ds = torch.meshgrid(torch.arange(grid * grid), torch.arange(Dh), indexing="ij")
    pos = torch.where(ds < half, ls // grid, ls % grid).double()
    freq = 10000.0 ** (-2 * ((ds % half) // 2).double() / half)
    torch.testing.assert_close(cos.double(), torch.cos(pos * freq), rtol=0, atol=2e-6)
    torch.testing.assert_close(sin.double(), torch.sin(pos * freq), rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="head_dim must be a multiple of 4, got 6"):
        rope_2d_tables(6, grid)


@pytest.mark.parametrize("layout", ["qkv row slice", "qkv batch-strided", "grads heads-last", "grads contiguous"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend, layout):
    need(backend)
    B, L, H, Dh = 2, 4, 3, 8
    inp = make_inputs(B, L, H, Dh, torch.float32, "norm+rope")
    if layout == "qkv row slice":  # the packed part of a wider projection: rows strided
        wide = torch.randn(B, L, 3 * H * Dh + 5, device=DEVICE)
        wide[..., 2:2 + 3 * H * Dh] = inp["qkv"]
        inp["qkv"] = wide[..., 2:2 + 3 * H * Dh]
    elif layout == "qkv batch-strided":  # [L, B, 3D] storage seen as [B, L, 3D]
        inp["qkv"] = inp["qkv"].transpose(0, 1).contiguous().transpose(0, 1)
    outs = call(inp, H, "reference")
    cot = random_cotangents(outs, "heads-last" if layout == "grads heads-last" else "contiguous")
    run_and_check(backend, inp, H, cot)


@pytest.mark.parametrize("used", ["q and k only", "v only", "q only"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_unused_outputs(backend, used):
    """Outputs with no gradient (None) count as zero; v unused leaves zeros in the v third of d(qkv)."""
    need(backend)
    inp = make_inputs(2, 3, 2, 8, torch.float32, "norm+rope")
    cot = random_cotangents(call(inp, 2, "reference"))
    keep = {"q and k only": (0, 1), "v only": (2,), "q only": (0,)}[used]
    cot = [c if i in keep else None for i, c in enumerate(cot)]
    run_and_check(backend, inp, 2, cot)


def test_triton_writes_every_element():
    """Every buffer the launchers allocate (q, k, d(qkv), gain partial sums) starts as NaN."""
    need("triton")
    from dit_fast.kernels import adaln as kernels

    with kernels.poison_outputs():
        run_and_check("triton", make_inputs(3, 7, 5, 12, torch.float32, "norm+rope"), 5)
        run_and_check("triton", make_inputs(2, 3, 2, 8, torch.float32, "neither"), 2)


def test_triton_gain_grads_are_deterministic():
    need("triton")
    inp = make_inputs(4, 9, 4, 16, torch.float32, "layer+bias+rope")
    cot = random_cotangents(call(inp, 4, "reference"))
    runs = [with_grads(lambda t: call(t, 4, "triton"), inp, cot)[1] for _ in range(2)]
    for k in GRAD_NAMES:
        assert torch.equal(runs[0][k], runs[1][k]), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend):
    """The attention input path compiled whole: qk_norm_rope + SDPA, forward and every gradient."""
    need(backend)
    B, L, H, Dh = 2, 4, 2, 8
    inp = make_inputs(B, L, H, Dh, torch.float32, "layer+bias+rope")

    def attn(qkv, q_gain, k_gain, cos, sin, q_bias, k_bias, norm):
        q, k, v = ops.qk_norm_rope(qkv, H, q_gain, k_gain, EPS, cos, sin, q_bias=q_bias, k_bias=k_bias, norm=norm,
                                   backend=backend)
        return F.scaled_dot_product_attention(q, k, v)

    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    cot = [torch.randn(B, H, L, Dh, device=DEVICE)]
    want, want_grads = with_grads(lambda t: (attn(**t),), inp, cot)
    got, got_grads = with_grads(lambda t: (compiled(**t),), inp, cot)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for k in GRAD_NAMES:
        torch.testing.assert_close(got_grads[k], want_grads[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("mode", ["norm+rope", "rope", "layer+bias+rope"])
def test_triton_opcheck(mode):
    need("triton")
    import dit_fast.ops.triton_backend  # noqa: F401  (registers the ops)

    inp = make_inputs(2, 3, 2, 8, torch.float32, mode)
    args = (inp["qkv"], 2, inp["q_gain"], inp["k_gain"], EPS, inp["cos"], inp["sin"], inp["q_bias"], inp["k_bias"],
            inp["norm"])
    grad_args = tuple(a.detach().requires_grad_() if i in (0, 2, 3, 7, 8) and a is not None else a
                      for i, a in enumerate(args))
    torch.library.opcheck(torch.ops.dit_fast_triton.qk_norm_rope_fwd, grad_args)
    dq, dk, dv = torch.randn(3, 2, 3, 2, 8, device=DEVICE)
    torch.library.opcheck(torch.ops.dit_fast_triton.qk_norm_rope_bwd, (dq, dk, dv, *args, True))
    torch.library.opcheck(torch.ops.dit_fast_triton.qk_norm_rope_bwd, (dq, None, None, *args, False))


@pytest.mark.parametrize("mode", ["norm+rope", "layer+bias+rope"])
def test_triton_second_derivatives_match_torch(mode):
    """create_graph=True through the Triton op: second derivatives are the torch backend's (float64)."""
    need("triton")
    inp = make_inputs(2, 3, 2, 8, torch.float32, mode)
    cot = random_cotangents(call(inp, 2, "reference"))
    names = [k for k in GRAD_NAMES if inp[k] is not None]
    dirs = [torch.randn_like(inp[k]) for k in names]

    def hvp(backend, dtype):
        leaves = as_dtype(inp, dtype)
        for k in names:
            leaves[k].requires_grad_()
        outs = call(leaves, 2, backend)
        loss = sum((o * c.to(dtype)).sum() for o, c in zip(outs, cot))
        grads = torch.autograd.grad(loss, [leaves[k] for k in names], create_graph=True)
        penalty = sum((g * d.to(dtype)).sum() for g, d in zip(grads, dirs))
        # the biases enter no first-order gradient: their second derivatives are zero (unused)
        return torch.autograd.grad(penalty, [leaves[k] for k in names], allow_unused=True, materialize_grads=True)

    for name, g, w in zip(names, hvp("triton", torch.float32), hvp("torch", torch.float64)):
        assert_close(g, w, torch.float32, name=f"qk_norm_rope d2/d({name})")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    need(backend)
    inp = make_inputs(0, 4, 2, 8, torch.float32, "norm+rope")
    outs, grads = with_grads(lambda t: call(t, 2, backend), inp, [torch.randn(0, 2, 4, 8, device=DEVICE)] * 3)
    assert all(o.shape == (0, 2, 4, 8) for o in outs)
    assert grads["qkv"].shape == (0, 4, 48) and not grads["q_gain"].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_messages(backend):
    need(backend)
    inp = make_inputs(2, 4, 2, 8, torch.float32, "norm+rope")
    qkv, g, cos, sin = inp["qkv"], inp["q_gain"], inp["cos"], inp["sin"]
    with pytest.raises(ValueError, match=r"qkv's last dim must be 3 \* num_heads \* head_dim.*got 48 for num_heads=5"):
        ops.qk_norm_rope(qkv, 5, backend=backend)
    with pytest.raises(ValueError, match=r"qkv must have shape \[B, L, 3\*D\], got \[8, 48\]"):
        ops.qk_norm_rope(qkv.reshape(8, 48), 2, backend=backend)
    with pytest.raises(ValueError, match="q_gain and k_gain must be given together"):
        ops.qk_norm_rope(qkv, 2, g, None, backend=backend)
    with pytest.raises(ValueError, match=r"k_gain must have shape \[head_dim\] = \[8\], got \[9\]"):
        ops.qk_norm_rope(qkv, 2, g, torch.randn(9, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="cos and sin must be given together"):
        ops.qk_norm_rope(qkv, 2, cos=cos, backend=backend)
    with pytest.raises(ValueError, match=r"sin must have shape \[L, head_dim\] = \[4, 8\], got \[5, 8\]"):
        ops.qk_norm_rope(qkv, 2, cos=cos, sin=torch.randn(5, 8, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="head_dim must be even, got 3"):
        ops.qk_norm_rope(torch.randn(1, 2, 18, device=DEVICE), 2, cos=torch.randn(2, 3), sin=torch.randn(2, 3),
                         backend=backend)
    with pytest.raises(ValueError, match="cos must not require grad"):
        ops.qk_norm_rope(qkv, 2, cos=cos.clone().requires_grad_(), sin=sin, backend=backend)
    with pytest.raises(ValueError, match="eps must be a number >= 0"):
        ops.qk_norm_rope(qkv, 2, g, g, -1.0, backend=backend)
    with pytest.raises(TypeError, match="q_gain must be a floating-point tensor"):
        ops.qk_norm_rope(qkv, 2, g.long(), g, backend=backend)
    with pytest.raises(ValueError, match="norm must be one of \\('rms', 'layer'\\), got 'batch'"):
        ops.qk_norm_rope(qkv, 2, g, g, norm="batch", backend=backend)
    with pytest.raises(ValueError, match="q_bias and k_bias are the QK-norms' biases: they need q_gain and k_gain"):
        ops.qk_norm_rope(qkv, 2, q_bias=g, k_bias=g, backend=backend)
    with pytest.raises(ValueError, match="q_bias and k_bias must be given together"):
        ops.qk_norm_rope(qkv, 2, g, g, q_bias=g, backend=backend)


def test_float64_runs_on_the_torch_backend():
    need("triton")
    inp = make_inputs(1, 4, 2, 8, torch.float64, "norm+rope")
    assert backends.resolve("auto", "qk_norm_rope", inp["qkv"].device.type, True) == "torch"
    assert "no float64 kernels" in backends.why_not("triton", "qk_norm_rope", inp["qkv"].device.type, float64=True)
    assert all(o.dtype == torch.float64 for o in call(inp, 2, "auto"))


# ---- full-size checks, for a GPU -------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("B,L,H,Dh", [(8, 256, 16, 72), (2, 1024, 24, 64)])
def test_lightningdit_shapes_gpu(B, L, H, Dh):
    """LightningDiT-XL/1 (16 heads of 72, 256 tokens) and 1p0B at 512px (24 of 64, 1024 tokens), bfloat16
    under the model's autocast dtypes, outputs poisoned."""
    need("triton")
    from dit_fast.kernels import adaln as kernels

    with kernels.poison_outputs():
        inp = make_inputs(B, L, H, Dh, torch.bfloat16, "norm+rope", torch.float32, torch.float32)
        run_and_check("triton", inp, H)
        run_and_check("triton", make_inputs(B, L, H, Dh, torch.float32, "rope"), H)


@pytest.mark.parametrize("op", ["qk_norm_rope", "swiglu"])
def test_bench_byte_model(op):
    """`dit-fast kernels` rows: the bytes the op must move at LightningDiT-XL/1's shapes (bfloat16, meta
    tensors: no memory). qk_norm_rope reads and writes q and k only (v is a view); swiglu reads [a | b] and
    writes silu(a) * b."""
    from dit_fast.bench.kernels import case_bytes, make_case
    from dit_fast.ops import torch_backend

    B, L, D, bf = 2, 256, 1152, 2
    case = make_case(op, B, L, D, torch.bfloat16, "meta")
    outs = torch_backend.__dict__[op](*case.args)
    got = case_bytes(case, list(outs) if isinstance(outs, tuple) else [outs])
    tokens = B * L
    if op == "qk_norm_rope":
        small = 2 * 72 * 4 + 2 * L * 72 * 4  # gains (float32 parameters), cos and sin tables (float32)
        fwd = tokens * D * bf * 4 + small
        bwd = tokens * D * bf * (3 + 2 + 3) + 2 * 72 * 4 + 2 * 72 * 4  # d(q, k, v), q and k, d(qkv); gains, d(gains)
    else:
        H = 3072
        fwd = tokens * H * bf * 3
        bwd = tokens * H * bf * (1 + 2 + 2)  # d(out); [a | b]; d([a | b])
    assert got == {"fwd": fwd, "fwd+bwd": fwd + bwd}


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_zero_with_padded_heads(backend):
    """eps = 0 (allowed) with a head count that is not a power of two: the kernels' padding rows are zeros,
    whose 1 / sqrt(0) must not leak NaN into the gains' gradients."""
    need(backend)
    inp = make_inputs(2, 3, 3, 8, torch.float32, "norm+rope")
    cot = random_cotangents(call(inp, 3, "reference"))
    outs, grads = with_grads(lambda t: call(t, 3, backend, eps=0.0), inp, cot)
    ref_outs, ref_grads = with_grads(lambda t: call(t, 3, "reference", eps=0.0), as_dtype(inp, torch.float64),
                                     [c.double() for c in cot])
    for k in grads:
        assert_close(grads[k], ref_grads[k], torch.float32, name=f"grad of {k}")
