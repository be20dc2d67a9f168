#!/usr/bin/env python
"""Compile every Triton kernel in kernels/*.py ahead of time for CUDA sm_80 and sm_90, without a GPU.

The tests run the kernels in Triton's CPU interpreter, which accepts code that real compilation rejects
and never runs ptxas. This script compiles each kernel down to a cubin (with the ptxas shipped inside the
triton wheel) with the argument types, constexprs and num_warps its launcher really passes on a GPU.
Those are recorded, not written by hand: every launcher runs at DiT shapes on fake CUDA tensors
(torch FakeTensorMode: dtypes, shapes and strides, no memory), with JITFunction.run replaced by a
recorder and the CUDA device queries stubbed (H100: 132 SMs). A launcher change (new argument, other
tile sizes) is therefore picked up without touching this file; a new kernel (a @triton.jit function
whose name ends in `_kernel`) that no scenario below launches is an error.

Scenarios: the 12 published configs (dit_fast.reference.CONFIGS) x 256/512 px x fp32/autocast(bf16) x
batch 1 and a training batch, plus a bf16 model at the /2 configs, an fp16 one at DiT-XL/2 and an odd width
(D=72). Launches with identical compile keys are compiled once (each line names the first scenario and how
many more).

Prints one line per (kernel, variant, target): registers and stack frame bytes per thread (non-zero
means register spills: flagged SPILL) from the wheel's cuobjdump, and shared memory (dynamic, as
launched) from the compiled metadata. A variant FAILs when its shared memory exceeds the target's
limit (sm_80 166,912 B, sm_90 232,448 B: the launch would crash) or when it spills on a hot path
(the /2 configs with bf16 activations, autocast or bf16 model, forward and backward); spills elsewhere
are printed as notes.

  python scripts/check_triton_compile.py [--jobs 2] [--quick] [--json FILE] [--triton-venv VENV]
(--triton-venv: compile with the triton of another venv, e.g. the GPU machine's 3.6; see
scripts/compare_triton_versions.py, which runs both and writes the comparison to benchmarks/results/.)
Exit status: 0 all compiled within limits, 1 a kernel failed to compile or exceeded a limit, 2 setup
error (unsupported triton, a kernel never launched, a launcher that failed).
"""
# ruff: noqa: E402  (which triton to import, --triton-venv, is settled before importing it)
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: real JITFunctions, GPU code paths


def _triton_site(venv: Path) -> Path:
    """The site-packages of `venv` that holds a triton for this Python version (a clear error otherwise)."""
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    if not (site / "triton" / "__init__.py").exists():
        found = sorted(str(p.parent) for p in venv.glob("lib/python*/site-packages/triton/__init__.py"))
        raise SystemExit(f"check_triton_compile: --triton-venv {venv}: no triton in {site} (this is Python "
                         f"{sys.version_info.major}.{sys.version_info.minor}; found: {found or 'none'}). Create it "
                         f"with this Python: python -m venv {venv} && {venv}/bin/pip install triton==X.Y.Z")
    return site


def _reexec_with_other_triton(argv: list) -> None:
    """--triton-venv VENV: run this script again with VENV's site-packages first on sys.path, so `import triton`
    finds that triton (torch and the rest still come from this interpreter; the venv needs triton only).
    Done before triton is imported here; the child sees DIT_FAST_TRITON_SITE and does not re-exec."""
    for i, arg in enumerate(argv):
        if arg == "--triton-venv" or arg.startswith("--triton-venv="):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            if not value:
                raise SystemExit("check_triton_compile: --triton-venv needs a directory")
            rest = argv[:i] + argv[i + (1 if "=" in arg else 2):]
            break
    else:
        return
    if os.environ.get("DIT_FAST_TRITON_SITE"):
        return
    site = _triton_site(Path(value).resolve())
    env = dict(os.environ, DIT_FAST_TRITON_SITE=str(site),
               PYTHONPATH=os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *rest], env)


if __name__ == "__main__":
    _reexec_with_other_triton(sys.argv[1:])

import argparse
import concurrent.futures
import contextlib
import dataclasses
import importlib.util
import inspect
import multiprocessing
import re
import shutil
import subprocess
import tempfile
import time
import traceback
import types
import warnings
from unittest import mock

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensorMode

ROOT = Path(__file__).resolve().parent.parent
TARGETS = (80, 90)
# Largest dynamic shared memory one CTA may use (opt-in maximum): A100 163 KB, H100 227 KB.
SHARED_LIMIT = {80: 166_912, 90: 232_448}
SM_COUNT = 132  # H100 SXM: sizes the backward kernels' row chunks (runtime values: adaln.BWD_RUNTIME_ARGS)
EPS = 1e-6
C_IN, C_OUT, MLP_RATIO = 4, 8, 4  # VAE latents: 4 channels in, 8 out (learned sigma); MLP 4 x D
TRAIN_BATCH = 64  # per GPU; with 512 px it gives the largest row counts (final layer's training tile)
LIGHTNING_HEAD_WIDTHS, LIGHTNING_C_OUT = (768, 1152), 32  # LightningDiT-B/1, XL/1: 32-channel VA-VAE latents

bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
# Dtype families the model runs in: residual stream x, modulation (shift/scale/gate) and branch outputs y,
# h, activations of the GEMM-fused kernels (patch_embed input/weight, fc1 output, final-layer weight), pos_embed.
FAMILIES = {
    "fp32": dict(x=fp32, mod=fp32, y=fp32, h=fp32, act=fp32, pos=fp32),
    "bf16": dict(x=bf16, mod=bf16, y=bf16, h=bf16, act=bf16, pos=bf16),
    "fp16": dict(x=fp16, mod=fp16, y=fp16, h=fp16, act=fp16, pos=fp16),
    # autocast(bf16) on an fp32 model: fp32 residual stream and pos_embed, bf16 GEMM outputs and h.
    "amp": dict(x=fp32, mod=bf16, y=bf16, h=bf16, act=bf16, pos=fp32),
}


def _published_configs() -> dict:
    """{name: (hidden D, patch)} of the 12 published configs (dit_fast.configs.CONFIGS), read from the
    source file so that the package (and its extension) need not import here."""
    spec = importlib.util.spec_from_file_location("dit_fast_configs_aot", ROOT / "dit_fast" / "configs.py")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    return {name: (hidden, patch) for name, (_, hidden, patch, _) in ref.CONFIGS.items()}


@dataclasses.dataclass(frozen=True)
class Scenario:
    config: str  # a published config name, or "D=72" for an odd width
    family: str
    batch: int
    latent: int  # latent side: 32 (256 px) or 64 (512 px)
    D: int
    patch: int
    hot: bool  # a spill here fails the check (main configs at bf16 activations)
    prefetch: bool = True  # kernels/adaln.py's PREFETCH switch

    @property
    def label(self) -> str:
        tag = "" if self.prefetch else " no-prefetch"
        return f"{self.config} {self.latent * 8}px {self.family} B={self.batch}{tag}"


# Hot paths: the /2 configs (the ones trained and sampled in practice: XL/2 is the paper's model), forward
# and backward, with bf16 activations (autocast or a bf16 model), at both batch sizes and resolutions.
HOT_PATCH = 2
HOT_FAMILIES = ("amp", "bf16")


def scenarios(quick: bool) -> list[Scenario]:
    """12 published configs x 256/512 px x fp32/autocast x batch 1 and a training batch, plus a bf16
    model at the /2 configs, an fp16 model at DiT-XL/2 and an odd width (D=72, not a multiple of 16)."""
    out = []
    configs = _published_configs()
    for name, (D, p) in configs.items():
        if quick and name != "DiT-XL/2":
            continue
        families = ("fp32", "amp") + (("bf16",) if p == HOT_PATCH else ())
        for latent in (32, 64):
            for family in families:
                for batch in (1, TRAIN_BATCH):
                    out.append(Scenario(name, family, batch, latent, D, p, p == HOT_PATCH and family in HOT_FAMILIES))
    # the adaLN kernels' PREFETCH=False alternative (an A/B switch for the GPU) at DiT-XL/2's hot shapes
    out += [Scenario("DiT-XL/2", "amp", b, 32, 1152, 2, True, prefetch=False) for b in (1, TRAIN_BATCH)]
    if not quick:  # an fp16 model (same code as bf16 but for the conversions) and an odd width
        out += [Scenario("DiT-XL/2", "fp16", 2, 32, 1152, 2, False)]
        out += [Scenario("D=72", f, 2, 32, 72, 2, False) for f in ("bf16", "fp32")]
    return out


def load_kernel_modules():
    """kernels/ as a package of its own (not via dit_fast, so the rest of the library plays no part)."""
    spec = importlib.util.spec_from_file_location(
        "dit_fast_kernels_aot", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pkg
    spec.loader.exec_module(pkg)
    mods = {}
    for path in sorted((ROOT / "kernels").glob("*.py")):
        if path.stem != "__init__":
            mods[path.stem] = importlib.import_module(f"{spec.name}.{path.stem}")
    return mods


def run_launchers(mods, sc: Scenario) -> None:
    """Every launcher of kernels/*.py, forward and backward, at one scenario's shapes and dtypes."""
    dt = FAMILIES[sc.family]
    mods["adaln"].PREFETCH = sc.prefetch
    B, D, PATCH, LATENT = sc.batch, sc.D, sc.patch, sc.latent
    L, N_F, K_MLP = (LATENT // PATCH) ** 2, PATCH * PATCH * C_OUT, MLP_RATIO * D
    dev = "cuda"

    def t(*shape, dtype):
        return torch.empty(shape, dtype=dtype, device=dev)

    A, FL, PE, G = mods["adaln"], mods["final_layer"], mods["patch_embed"], mods["gelu"]
    x, y = t(B, L, D, dtype=dt["x"]), t(B, L, D, dtype=dt["y"])
    mod = t(B, 6 * D, dtype=dt["mod"])  # chunks of the adaLN modulation, as the model slices them
    shift, scale, gate = (mod.narrow(1, i * D, D) for i in range(3))
    h, mean, rstd = A.adaln_modulate_fwd(x, shift, scale, EPS, dt["h"])
    A.adaln_modulate_bwd(torch.empty_like(h), x, scale, mean, rstd, shift.dtype)
    # the model passes attn.proj's / mlp.fc2's bias (a parameter: dt["pos"]) to the gated ops; direct calls may not
    for bias in (t(D, dtype=dt["pos"]), None):
        A.gated_residual_fwd(x, y, gate, bias)
        A.gated_residual_bwd(torch.empty_like(x), y, gate, bias)
        xo, h, mean, rstd = A.gated_residual_adaln_fwd(x, y, gate, shift, scale, EPS, dt["h"], bias)
        dxo, dh = torch.empty_like(xo), torch.empty_like(h)
        for grads in ((dxo, dh), (dxo, None), (None, dh)):
            A.gated_residual_adaln_bwd(*grads, xo, y, gate, scale, mean, rstd, shift.dtype, bias)

    if sc.hot:  # LightningDiT's norm modes (RMSNorm with its gain; scale-only and with a shift) at the hot shapes
        gain = t(D, dtype=dt["pos"])
        for sh in (None, shift):
            sh_dt = None if sh is None else sh.dtype
            h, mean, rstd = A.adaln_modulate_fwd(x, sh, scale, EPS, dt["h"], True, gain)
            A.adaln_modulate_bwd(torch.empty_like(h), x, scale, mean, rstd, sh_dt, True, gain)
            xo, h, mean, rstd = A.gated_residual_adaln_fwd(x, y, gate, sh, scale, EPS, dt["h"], None, True, gain)
            A.gated_residual_adaln_bwd(torch.empty_like(xo), torch.empty_like(h), xo, y, gate, scale, mean, rstd,
                                       sh_dt, None, True, gain)

    img = t(B, C_IN, LATENT, LATENT, dtype=dt["act"])
    PE.patch_embed_fwd(img, t(D, C_IN, PATCH, PATCH, dtype=dt["act"]), t(D, dtype=dt["act"]),
                       t(1, L, D, dtype=dt["pos"]), PATCH)
    w_fl = t(N_F, D, dtype=dt["act"])
    out = FL.final_layer_fwd(x, shift, scale, w_fl, t(N_F, dtype=dt["act"]), PATCH, C_OUT, EPS)
    for need_weight in (True, False):
        FL.final_layer_bwd(torch.empty_like(out), x, shift, scale, w_fl, PATCH, C_OUT, EPS, need_weight=need_weight)
    if sc.hot and D in LIGHTNING_HEAD_WIDTHS:  # LightningDiT-B/1 and XL/1's final layer: RMSNorm + gain, patch 1
        x_l = t(B, (LATENT // 2) ** 2, D, dtype=dt["x"])  # the f16 VA-VAE: half the f8 latent side at equal pixels
        w_l, gain = t(LIGHTNING_C_OUT, D, dtype=dt["act"]), t(D, dtype=dt["pos"])
        for sh in (shift, None):  # with a shift, and scale-only (wo_shift)
            out = FL.final_layer_fwd(x_l, sh, scale, w_l, t(LIGHTNING_C_OUT, dtype=dt["act"]), 1, LIGHTNING_C_OUT, EPS,
                                     rms=True, norm_weight=gain)
            for need_weight in (True, False):
                FL.final_layer_bwd(torch.empty_like(out), x_l, sh, scale, w_l, 1, LIGHTNING_C_OUT, EPS,
                                   need_weight=need_weight, rms=True, norm_weight=gain)
    pre = t(B, L, K_MLP, dtype=dt["act"])
    b_mlp = t(K_MLP, dtype=dt["pos"])  # fc1's bias is a parameter: fp32 under autocast, read as stored
    for bias in (b_mlp, None):
        G.gelu_tanh_fwd(pre, bias=bias)
        G.gelu_tanh_bwd(torch.empty_like(pre), pre, bias is not None, bias=bias)
    GG = mods.get("gemm_gelu")
    if GG is not None:  # fc1 as one GEMM (DIT_FAST_FC1_GEMM=triton): h in the activation dtype, W and bias parameters
        w_mlp = t(K_MLP, D, dtype=dt["pos"])
        for need_pre in (True, False):  # training stores pre; sampling does not
            GG.linear_bias_gelu_fwd(t(B * L, D, dtype=dt["act"]), w_mlp, b_mlp, need_pre)

    SW = mods.get("swiglu")
    if SW is not None:  # LightningDiT's SwiGLU on w12's packed output, H = int(2/3 * 4 D); w12's bias a parameter
        H_sw = int(2 / 3 * MLP_RATIO * D)
        ab = t(B, L, 2 * H_sw, dtype=dt["act"])
        for bias in (t(2 * H_sw, dtype=dt["pos"]), None):
            SW.swiglu_fwd(ab, bias)
            SW.swiglu_bwd(t(B, L, H_sw, dtype=dt["act"]), ab, bias, bias is not None)
    RQ = mods.get("rope_qknorm")
    if RQ is not None:  # QK-norm + 2D RoPE on the QKV output: heads of 72 at D = 1152 (and 72), else of 64
        Dh = 72 if D % 72 == 0 else 64
        H_rq = D // Dh
        qkv = t(B, L, 3 * D, dtype=dt["act"])
        cos, sin = t(L, Dh, dtype=fp32), t(L, Dh, dtype=fp32)  # the RoPE buffers
        g = t(Dh, dtype=dt["pos"])  # the norms' parameters
        grad = t(B, H_rq, L, Dh, dtype=dt["act"]).transpose(1, 2)  # as SDPA's backward hands it back
        none = (None, None)
        for gains, biases, norm, rope in (((g, g), none, "rms", True), ((g, g), (g, g), "layer", True),
                                          (none, none, "rms", True), ((g, g), none, "rms", False)):
            tables = (cos, sin) if rope else (None, None)
            RQ.qk_norm_rope_fwd(qkv, H_rq, *gains, EPS, *tables, *biases, norm)
            for dv in (grad, None):  # eager (d(v) placed by the kernel) and compiled (zeros there)
                RQ.qk_norm_rope_bwd(grad, grad, dv, qkv, H_rq, *gains, EPS, *tables, *biases, norm, True)

    S = mods.get("sampler_step")
    if S is not None and sc.family == "fp32":  # sampling runs on the fp32 latents whatever the model's dtype
        xs = t(B, C_IN, LATENT, LATENT, dtype=fp32)
        table, step = t(250, S.NUM_COLS, dtype=fp32), t(1, dtype=torch.int64)
        for cfg, ddim in ((True, False), (False, True)):
            out_s = t(2 * B if cfg else B, C_OUT, LATENT, LATENT, dtype=dt["act"])
            S.sampler_step_(xs, out_s, t(2 * B, C_IN, LATENT, LATENT, dtype=fp32), table, step,
                            4.0, 3, cfg, True, False, ddim)

    FS = mods.get("flow_step")
    if FS is not None and sc.family == "fp32":  # dit_fast.flow_sampling: the stage variants its samplers launch
        xs, ks = t(B, C_IN, LATENT, LATENT, dtype=fp32), t(B, C_IN, LATENT, LATENT, dtype=fp32)
        xin, noise = t(2 * B, C_IN, LATENT, LATENT, dtype=fp32), t(2 * B, C_IN, LATENT, LATENT, dtype=fp32)
        out_f = t(2 * B, C_OUT, LATENT, LATENT, dtype=dt["act"])
        table, step = t(500, FS.NUM_COLS, dtype=fp32), t(1, dtype=torch.int64)
        E, H1, H2 = FS.STAGE_EULER, FS.STAGE_HEUN1, FS.STAGE_HEUN2
        variants = [(E, 0, False, False), (H1, 0, False, False), (H2, 0, False, False), (E, 0, True, True),
                    (E, 0, True, False), (FS.STAGE_TWEEDIE, 0, False, False), (FS.STAGE_NOISE, 0, False, False),
                    (H1, 0, True, False), (H2, 0, True, True), (E, FS.PRED_NOISE, False, False)]
        for stage, pred, use_score, sde in variants:
            FS.flow_step_(xs, xin, xin if stage == FS.STAGE_NOISE else out_f, ks, noise, table, step, 2, 1, 4.0, 3,
                          True, stage, pred, use_score, sde)


# ----------------------------------------------------------------------------------------------
# Recording launches
# ----------------------------------------------------------------------------------------------

_TORCH_TO_TRITON = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                    torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


def arg_spec(param, value):
    """(type, value, divisible_by_16) of one kernel argument as Triton's launcher specializes it (3.x rules:
    an int equal to 1 becomes a constant, ints and pointers divisible by 16 get the divisibility hint;
    fake tensors have no address, so pointers are taken as 16-byte aligned, as fresh allocations and the
    launchers' D-wide chunks at these shapes are)."""
    if param.is_constexpr or value is None:
        return ("constexpr", value, False)
    if isinstance(value, torch.Tensor):
        return ("*" + _TORCH_TO_TRITON[value.dtype], None, not param.do_not_specialize)
    if isinstance(value, bool):
        raise TypeError(f"non-constexpr bool argument {param.name} is not handled by this script")
    if isinstance(value, int):
        if value == 1 and not param.do_not_specialize:
            return ("int1", 1, False)
        ty = "i32" if -2**31 <= value < 2**31 else "i64"
        return (ty, None, value % 16 == 0 and not param.do_not_specialize)
    if isinstance(value, float):
        return ("fp32", None, False)
    raise TypeError(f"argument {param.name}: unsupported type {type(value).__name__}")


_STRIDE = re.compile(r"^(D|s[a-z]+|[a-z0-9]+_s[a-z])$")  # D and strides: their divisibility decides vector widths


def _dedupe(name, ty, value, div16):
    """The part of one argument's specialization that decides the compiled code for this check: counts
    (L, chunk sizes, grid-derived ints) compile to the same code whatever their divisibility, so that is
    merged (the first launch recorded is the one compiled), but a count equal to 1 is a constant that
    folds loops away (a batch-1 backward is not the training one) and stays apart; D and strides keep
    their divisibility (vector loads); constexprs and pointer dtypes are kept whole."""
    if ty in ("int1", "i32", "i64") and not _STRIDE.match(name):
        return (name, "one" if ty == "int1" else "int")
    return (name, ty, repr(value), div16)


def record_launches(mods, scenarios):
    """{key: (kernel, [(name, type, value, div16)], options, [scenarios])} of every distinct launch
    (launches with the same compile key, however many scenarios make them, compile once)."""
    specs, failures = {}, []
    scenario = [None]

    def record(self, *args, grid, warmup, **kwargs):
        bound = inspect.signature(self.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in self.arg_names})
        bound.apply_defaults()
        params = [(p.name, *arg_spec(p, bound.arguments[p.name])) for p in self.params]
        # launch options (num_warps: Triton's default is 4; num_stages etc. if a launcher passes them)
        options = {"num_warps": 4, **{k: v for k, v in kwargs.items() if k not in self.arg_names}}
        key = (self.__name__, tuple(_dedupe(n, ty, v, d) for n, ty, v, d in params), tuple(sorted(options.items())))
        specs.setdefault(key, (self, params, options, []))[3].append(scenario[0])

    def contiguous(self, memory_format=torch.contiguous_format):
        # Tensor.contiguous's Python binding takes a CUDA device guard, which a CPU-only torch lacks
        # (as does indexing, which run_launchers avoids); the same op through the dispatcher needs none.
        if self.is_contiguous(memory_format=memory_format):
            return self
        return torch.ops.aten.clone.default(self, memory_format=memory_format)

    props = types.SimpleNamespace(multi_processor_count=SM_COUNT, major=9, minor=0, name="fake H100")
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(triton.runtime.jit.JITFunction, "run", record))
        stack.enter_context(mock.patch.object(torch.cuda, "get_device_properties", lambda *a, **k: props))
        stack.enter_context(mock.patch.object(torch.cuda, "current_device", lambda: 0))
        stack.enter_context(mock.patch.object(torch.Tensor, "contiguous", contiguous))
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        for sc in scenarios:
            scenario[0] = sc
            try:
                run_launchers(mods, sc)
            except Exception:
                failures.append(f"launchers failed for {sc.label}:\n{traceback.format_exc()}")
    return specs, failures


# ----------------------------------------------------------------------------------------------
# Compiling (one ASTSource flavour per triton API generation)
# ----------------------------------------------------------------------------------------------


def triton_api() -> str:
    from triton.compiler import ASTSource

    version = tuple(int(p) for p in re.findall(r"\d+", triton.__version__)[:2])
    if not (3, 1) <= version <= (3, 9):
        raise RuntimeError(f"triton {triton.__version__} is not supported by {Path(__file__).name} (knows 3.1 .. 3.9): "
                           "check the triton.compile / ASTSource API of this version and extend make_source()")
    params = inspect.signature(ASTSource.__init__).parameters
    if version >= (3, 3) and "constexprs" in params:
        return "constexprs"  # 3.3+: constexprs (and ints == 1) in the signature, attrs as {(i,): [[attr, val]]}
    import triton.backends.compiler as bc
    import triton.compiler.compiler as cc
    if version == (3, 2) and "constants" in params and hasattr(bc, "AttrsDescriptor"):
        return "attrs_descriptor_3.2"
    if version == (3, 1) and "constants" in params and hasattr(cc, "AttrsDescriptor"):
        return "attrs_descriptor_3.1"
    raise RuntimeError(f"triton {triton.__version__}: ASTSource{tuple(params)} is not the API this script expects")


def make_source(api: str, fn, params):
    from triton.compiler import ASTSource

    div16 = [i for i, (_, _, _, d) in enumerate(params) if d]
    ones = [i for i, (_, ty, _, _) in enumerate(params) if ty == "int1"]
    if api == "constexprs":
        sig = {n: "constexpr" if ty == "int1" else ty for n, ty, _, _ in params}
        consts = {n: v for n, ty, v, _ in params if ty in ("constexpr", "int1")}
        return ASTSource(fn, sig, constexprs=consts, attrs={(i,): [["tt.divisibility", 16]] for i in div16})
    if api == "attrs_descriptor_3.2":
        from triton.backends.compiler import AttrsDescriptor

        sig = {n: "i32" if ty == "int1" else ty for n, ty, _, _ in params}
        consts = {n: v for n, ty, v, _ in params if ty in ("constexpr", "int1")}
        attrs = AttrsDescriptor.from_dict({"arg_properties": {"tt.divisibility": div16, "tt.equal_to": ones},
                                           "cls": AttrsDescriptor.__name__})
        return ASTSource(fn, sig, constants=consts, attrs=attrs)
    from triton.compiler.compiler import AttrsDescriptor  # 3.1: keys are argument indices

    sig = {i: "i32" if ty == "int1" else ty for i, (_, ty, _, _) in enumerate(params) if ty != "constexpr"}
    consts = {i: v for i, (_, ty, v, _) in enumerate(params) if ty in ("constexpr", "int1")}
    return ASTSource(fn, sig, constants=consts,
                     attrs=AttrsDescriptor(divisible_by_16=tuple(div16), equal_to_1=tuple(ones)))


def resource_usage(cubin: bytes) -> dict:
    """REG / STACK / LOCAL / SHARED (static only) of the cubin's kernel, from the cuobjdump shipped with triton."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", out.split("Function", 1)[-1])}


_SPECS: list = []  # filled before the pool forks; workers get indices


def compile_one(job):
    index, cap = job
    fn, params, options, _ = _SPECS[index]
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    from triton.backends.compiler import GPUTarget

    start = time.perf_counter()
    try:
        kernel = triton.compile(make_source(triton_api(), fn, params), target=GPUTarget("cuda", cap, 32),
                                options=dict(options))
    except Exception as e:
        return index, cap, None, f"{type(e).__name__}: {e}", time.perf_counter() - start
    usage = resource_usage(kernel.asm["cubin"])
    usage["shared_meta"] = kernel.metadata.shared
    return index, cap, usage, None, time.perf_counter() - start


def describe(params, options) -> str:
    ptrs = sorted({ty[1:] for _, ty, _, _ in params if ty.startswith("*")})
    consts = [f"{n}={v.name if isinstance(v, tl.dtype) else v}" for n, ty, v, _ in params
              if ty == "constexpr" and v is not None and n not in ("INTERPRET", "ROUND_BF16")]
    opts = " ".join(f"{k.replace('num_', '')}={v}" for k, v in options.items())
    return f"ptrs={'/'.join(ptrs)} {' '.join(consts)} {opts}"


def judge(cap: int, usage: dict, scs: list) -> tuple[str, str]:
    """("FAIL"|"note"|"", why) for one compiled variant: shared memory over the target's limit fails
    anywhere (the launch would crash); a spill fails on a hot path and is a note elsewhere."""
    stack = usage.get("STACK", 0) + usage.get("LOCAL", 0)
    if usage["shared_meta"] > SHARED_LIMIT[cap]:
        return "FAIL", f"shared memory {usage['shared_meta']} B > {SHARED_LIMIT[cap]} B of sm_{cap}"
    if stack:
        hot = [sc.label for sc in scs if sc.hot]
        if hot:
            return "FAIL", f"spills ({stack} B stack) on hot path {hot[0]}"
        return "note", f"spills ({stack} B stack), exotic config only"
    return "", ""


def write_json(path: Path, records: list, api: str, quick: bool) -> None:
    """The compiled variants with versions and commit, written atomically (dit_fast/atomic.py, loaded as a
    file like reference.py above, so the package need not import)."""
    import datetime
    import json

    spec = importlib.util.spec_from_file_location("dit_fast_atomic_aot", ROOT / "dit_fast" / "atomic.py")
    atomic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(atomic)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout)
    record = {"what": "check_triton_compile: resources of every compiled variant (compiled, not run)",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "git_commit": commit or None, "git_dirty": dirty, "torch": torch.__version__,
              "triton": triton.__version__, "triton_api": api, "targets": [f"sm_{c}" for c in TARGETS],
              "quick": quick, "variants": records}
    atomic.write_text(path, json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes (default 2)")
    ap.add_argument("--quick", action="store_true", help="DiT-XL/2 only")
    ap.add_argument("--json", type=Path, default=None,
                    help="also write every variant's resources (registers, stack, shared memory) to this file")
    ap.add_argument("--triton-venv", type=Path, default=None,
                    help="compile with the triton of this venv (e.g. python -m venv /tmp/triton36 && "
                         "/tmp/triton36/bin/pip install triton==3.6.0: the GPU machine's); torch and the rest "
                         "come from this interpreter (scripts/compare_triton_versions.py runs both)")
    ap.add_argument("--modules", default=None,
                    help="comma-separated kernels/ modules to hold to the every-kernel-launched rule (default: all)")
    ap.add_argument("--only", default=None,
                    help="comma-separated parts of kernel names: compile only the variants of those kernels (e.g. "
                         "final_layer,sum_partials; default: all)")
    args = ap.parse_args()
    if args.triton_venv is not None and not os.environ.get("DIT_FAST_TRITON_SITE"):
        print("check_triton_compile: --triton-venv must be handled before triton is imported", file=sys.stderr)
        return 2
    if os.environ.get("DIT_FAST_TRITON_SITE") and not triton.__file__.startswith(os.environ["DIT_FAST_TRITON_SITE"]):
        print(f"check_triton_compile: expected triton from {os.environ['DIT_FAST_TRITON_SITE']}, "
              f"imported {triton.__file__}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        api = triton_api()
    except RuntimeError as e:
        print(f"check_triton_compile: {e}", file=sys.stderr)
        return 2
    mods = load_kernel_modules()
    scs = scenarios(args.quick)
    specs, failures = record_launches(mods, scs)
    only = set(args.modules.split(",")) if args.modules else set(mods)
    if only - set(mods):
        print(f"check_triton_compile: --modules {sorted(only - set(mods))} not in kernels/ {sorted(mods)}",
              file=sys.stderr)
        return 2
    kernels = {f"{m}.{name}" for m, mod in mods.items() if m in only for name, obj in vars(mod).items()
               if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel")
               and obj.fn.__module__ == mod.__name__}
    launched = {f"{fn.fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}" for fn, *_ in specs.values()}
    failures += [f"kernel {k} is never launched by the scenarios of this script" for k in sorted(kernels - launched)]
    if failures:
        print("check_triton_compile: setup failed\n" + "\n".join(failures), file=sys.stderr)
        return 2

    _SPECS[:] = sorted(specs.values(), key=lambda s: (s[0].__name__, s[3][0].label, describe(s[1], s[2])))
    if args.only:
        _SPECS[:] = [s for s in _SPECS if any(part in s[0].__name__ for part in args.only.split(","))]
    cache = tempfile.mkdtemp(prefix="dit_fast_triton_aot_")
    os.environ["TRITON_CACHE_DIR"] = cache  # compile for real every time, leave ~/.triton alone
    print(f"triton {triton.__version__} (API {api}), {len(kernels)} kernels, {len(scs)} scenarios -> "
          f"{len(_SPECS)} distinct variants x sm_{'/sm_'.join(map(str, TARGETS))}, {args.jobs} jobs; "
          f"recorded in {time.perf_counter() - t0:.1f} s")
    print(f"hot paths (a spill fails): /{HOT_PATCH} configs with {'/'.join(HOT_FAMILIES)} activations; "
          f"shared memory limits: " + ", ".join(f"sm_{c} {v} B" for c, v in SHARED_LIMIT.items()))
    jobs = [(i, cap) for i in range(len(_SPECS)) for cap in TARGETS]
    errors, verdicts, spills, records = [], [], 0, []
    try:
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            for index, cap, usage, err, secs in pool.map(compile_one, jobs):
                fn, params, options, scs_of = _SPECS[index]
                more = f" (+{len(scs_of) - 1})" if len(scs_of) > 1 else ""
                head = f"{fn.__name__:34s} sm_{cap}  {scs_of[0].label + more:38s} {describe(params, options)}"
                if err:
                    errors.append(f"{fn.__name__} sm_{cap} [{scs_of[0].label}] {describe(params, options)}\n{err}")
                    print(f"FAIL {head}", flush=True)
                    continue
                stack = usage.get("STACK", 0) + usage.get("LOCAL", 0)
                verdict, why = judge(cap, usage, scs_of)
                print(f"{verdict or 'ok':4s} {head}  regs={usage.get('REG', '?')} stack={stack}B "
                      f"shared={usage['shared_meta']}B {'SPILL ' if stack else ''}({secs:.1f} s)", flush=True)
                spills += bool(stack)
                records.append({"kernel": fn.__name__, "arch": f"sm_{cap}", "scenarios": [sc.label for sc in scs_of],
                                "variant": describe(params, options), "regs": usage.get("REG"), "stack_bytes": stack,
                                "shared_bytes": usage["shared_meta"], "verdict": verdict or "ok"})
                if verdict:
                    verdicts.append((verdict, f"{fn.__name__} sm_{cap} [{', '.join(sc.label for sc in scs_of[:3])}"
                                              f"{more}] {describe(params, options)}: {why}"))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    for e in errors:
        print(f"\nFAILED to compile: {e}", file=sys.stderr)
    for verdict, line in verdicts:
        print(f"{'FAILED' if verdict == 'FAIL' else 'note'}: {line}",
              file=sys.stderr if verdict == "FAIL" else sys.stdout)
    n_fail = sum(v == "FAIL" for v, _ in verdicts)
    if args.json is not None:
        write_json(args.json, records, api, quick=args.quick)
    print(f"{len(jobs) - len(errors)}/{len(jobs)} compiled, {len(errors)} failed, {n_fail} over a limit "
          f"(shared memory, or a spill on a hot path), {spills} spill, {time.perf_counter() - t0:.0f} s total")
    return 1 if errors or n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
