"""A predicted budget: per-op bytes and FLOPs of a DiT step and the time a device's ceilings allow.

For every op of a forward (or training step) and three ways of running it:
  eager     the reference as users run it: each norm / modulate / gate / residual its own kernel, dtype
            casts under autocast, GELU separate, attention through F.scaled_dot_product_attention (the
            official DiT with a current timm: fused_attn on; a flash kernel, no [B, H, L, L] scores);
            eager_attention="math" models the explicit (q * scale) @ k^T, softmax, @ v path instead
            (the "reference-math" contender of the benchmarks);
  inductor  torch.compile of that reference as an Inductor-like compiler reaches it: elementwise chains
            (casts included) fused into one kernel each, the residual add fused with the next LayerNorm,
            GEMMs on cuBLAS, GELU its own kernel (cuBLAS has no tanh-GELU epilogue here), attention the
            reference's own SDPA call (one flash kernel each way, no materialized scores; Inductor does
            not rewrite the explicit math form into SDPA, so this plan is the compiled SDPA reference),
            its backward's dq/dk/dv stacked by a copy;
  dit_fast  the fusion map of docs/DESIGN.md section 2: one GEMM for all adaLN projections, fused
            patch_embed, gated_residual_adaln per half-block, GELU in fc1's epilogue (training also
            stores the pre-activation; GELU's backward stays a pass of its own), flash attention
            writing the packed QKV gradient once, linear + unpatchify in one pass.
each kernel is predicted at max(FLOPs / GEMM rate, bytes / copy bandwidth) and the op's kernels are
added up. Launch gaps, wave quantization and GEMM shape efficiency are not modelled: the times are a
floor. FLOPs are flops.py's exact counts (the paper's convention: GEMMs and attention); attention's
head dim is padded to a multiple of 32 (72 -> 96) by flash kernels; the flash backward recomputes QK^T
(2.5x the forward's work), the math backward does not (2x). MFU = the paper's FLOPs of the step (x3 for
training) / predicted time / the GEMM rate used. Bytes of the fused ops are the exact per-op byte model
of dit_fast/bench/kernels.py (make_case + case_bytes on meta tensors); the rest is modelled here, op by op.

Precision "autocast" (the benchmarked policy): fp32 weights and residual stream, bf16 GEMM outputs,
weights cast to bf16 once per forward, LayerNorm and softmax in fp32; "bf16": everything bf16.
"""
from __future__ import annotations

from dataclasses import dataclass

from .flops import DiTShape, flops_per_step, forward_macs_per_image

PLANS = ("eager", "inductor", "dit_fast")
# Spec sheet and what is realistically achieved (docs/DESIGN.md: ~3.0 TB/s copy, ~800 TFLOP/s bf16 on an H100).
DEVICE_SPECS = {
    "h100": {"name": "H100 SXM 80GB", "hbm_gb_per_s": 3350, "bf16_dense_peak_tflops": 989,
             "copy_gb_per_s": 3000, "gemm_tflops": 800},
    "a100": {"name": "A100 SXM 80GB", "hbm_gb_per_s": 2039, "bf16_dense_peak_tflops": 312,
             "copy_gb_per_s": 1700, "gemm_tflops": 280},
}
PRECISIONS = ("autocast", "bf16")
MODES = ("forward", "train")
OPTIMIZER_BYTES_PER_PARAM = 28  # fused AdamW, fp32: read param, grad, exp_avg, exp_avg_sq; write param, both moments


@dataclass
class K:
    """Kernels of one op in one plan: total FLOPs, total bytes, launches (all of the same shape)."""

    flops: float
    bytes: float
    launches: int = 1

    def seconds(self, gemm_flops_per_s: float, copy_bytes_per_s: float) -> float:
        return max(self.flops / gemm_flops_per_s, self.bytes / copy_bytes_per_s)


def fused_op_bytes(op: str, B: int, L: int, D: int, precision: str, patch: int = 2,
                   channels: int = 4) -> dict[str, int]:
    """{"fwd", "bwd"} bytes of a dit_fast fused op by the kernel benchmarks' exact byte model."""
    import torch

    from ..ops import torch_backend
    from .kernels import _outputs, case_bytes, make_case

    res = torch.float32 if precision == "autocast" else torch.bfloat16
    case = make_case(op, B, L, D, torch.bfloat16, "meta", patch=patch, channels=channels, residual_dtype=res)
    with torch.no_grad():
        outs = _outputs(getattr(torch_backend, op)(*case.args))
    b = case_bytes(case, outs)
    return {"fwd": b["fwd"], "bwd": b["fwd+bwd"] - b["fwd"]}


def _param_counts(s: DiTShape) -> tuple[int, int, int]:
    """(weights cast by autocast, linear layers, all trainable parameters)."""
    D, H, p, n = s.hidden_size, int(s.hidden_size * s.mlp_ratio), s.patch_size, s.depth
    block = (3 * D * D + 3 * D) + (D * D + D) + (H * D + H) + (D * H + D) + (6 * D * D + 6 * D)
    final = p * p * s.out_channels * D + p * p * s.out_channels + 2 * D * D + 2 * D
    patch = s.in_channels * p * p * D + D
    t_emb = 256 * D + D + D * D + D
    cast = n * block + final + patch + t_emb
    return cast, 5 * n + 4, cast + 1001 * D  # + the label embedding table (not cast: a lookup)


def step_ops(s: DiTShape, batch: int, mode: str = "forward", precision: str = "autocast",
             eager_attention: str = "sdpa") -> list[dict]:
    """[{"op", "kind", "gflop", "kernels": {plan: [K, ...]}}] for one step of `mode` on `batch` images."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if eager_attention not in ("math", "sdpa"):
        raise ValueError(f"eager_attention must be 'math' or 'sdpa', got {eager_attention!r}")
    train = mode == "train"
    autocast = precision == "autocast"
    B, L, D, n = batch, s.tokens, s.hidden_size, s.depth
    H, heads, p = int(D * s.mlp_ratio), s.num_heads, s.patch_size
    head_dim = D // heads
    N = B * L
    res, lp = (4 if autocast else 2), 2
    Ar, Al, Hl = N * D * res, N * D * lp, N * H * lp
    S = B * heads * L * L
    m = B * D * lp  # one modulation vector [B, D]
    out_c = p * p * s.out_channels
    image = B * s.in_channels * s.input_size**2
    F = {k: 2 * v * B for k, v in forward_macs_per_image(s).items()}  # forward FLOPs of the step, per kind
    n_cast, n_linear, n_params = _param_counts(s)

    def gemm(flops, x_bytes, w_elems, out_bytes, calls, dgrad=True):  # flops and bytes: totals over the calls
        ks = [K(flops, x_bytes + w_elems * lp + out_bytes, calls)]
        if train:
            if dgrad:
                ks.append(K(flops, out_bytes + w_elems * lp + x_bytes, calls))
            ks.append(K(flops, out_bytes + x_bytes + w_elems * lp, calls))
        return ks

    def cast(nbytes_from, nbytes_to, calls):  # dtype casts (bytes: totals), and the backward's casts of the gradient
        if not autocast:
            return []
        return [K(0, nbytes_from + nbytes_to, calls)] + ([K(0, nbytes_to + nbytes_from, calls)] if train else [])

    def blk(flops, block_bytes):  # one kernel per block: total flops, bytes of one block's call
        return K(flops, n * block_bytes, n)

    def mem(fwd_bytes, fwd_launches, bwd_bytes=0, bwd_launches=0):
        return [K(0, fwd_bytes, fwd_launches)] + ([K(0, bwd_bytes, bwd_launches)] if train and bwd_bytes else [])

    def fused(op, calls):
        b = fused_op_bytes(op, B, L, D, precision, p, s.in_channels)
        return [K(0, calls * b["fwd"], calls)] + ([K(0, calls * b["bwd"], calls)] if train else [])

    # eager LayerNorm + modulate (x*(1+scale), + shift): forward 6 activations in 3 kernels; backward:
    # LayerNorm's (dy, x -> dx), modulate's dx, dscale and dshift reductions: 8 activations in 4
    eager_norm_mod = mem(6 * Ar + 2 * m, 3, 8 * Ar, 4)
    # eager gate*y + residual: forward 2 kernels; backward: the gradient cast to y's dtype, dy, dgate, and
    # the residual stream's gradient accumulation (x feeds the residual and the next norm)
    eager_gate_res = mem(2 * Al + m + 2 * Ar + Al, 2, (Ar + Al) + (2 * Al + m) + 2 * Al + 3 * Ar, 4)

    ops = []

    def add(name, kind, gflop, kernels):
        ops.append({"op": name, "kind": kind, "gflop": gflop / 1e9, "kernels": kernels})

    mult = 3 if train else 1
    cond_flops = F["t_embedder"] + F["adaLN"]
    cond_w = 256 * D + D * D + n * 6 * D * D + 2 * D * D
    cond_x, cond_out = B * D * lp * (n + 3), B * D * lp * (6 * n + 2)
    add("conditioning: t-embedder + adaLN projections", "gemm", mult * cond_flops, {
        "eager": gemm(cond_flops, cond_x, cond_w, cond_out, n + 3),
        "inductor": gemm(cond_flops, cond_x, cond_w, cond_out, n + 3),
        # training: every adaLN projection is one GEMM each way (ops.adaln_projections), plus the
        # t-embedder's two; inference: per layer (batch_adaln=True, one GEMM, is off by default)
        # (without autocast's casts to write into, the weights are concatenated: forward, and again for dx)
        "dit_fast": gemm(cond_flops, cond_x, cond_w, cond_out, 3 if train else n + 3)
        + ([K(0, 2 * 2 * (n * 6 + 2) * D * D * lp, 2)] if train and not autocast else []),
    })
    if autocast:
        w = [K(0, n_cast * (4 + 2), n_linear)] + ([K(0, n_cast * (2 + 4), n_linear)] if train else [])
        add("weight casts fp32->bf16 (+ grad casts back)", "memory", 0, {plan: w for plan in PLANS})
    pe_gemm = gemm(F["patch_embed"], image * lp, s.in_channels * p * p * D, Al, 1, dgrad=False)
    pe_eager = cast(image * 4, image * 2, 1)[:1] + pe_gemm + mem(Al + L * D * 4 + Ar, 1, Ar + Al, 1)
    pe_fused = [K(F["patch_embed"], k.bytes, k.launches) for k in fused("patch_embed", 1)]  # fwd GEMM; bwd: dweight
    add("patch_embed + pos_embed", "gemm", F["patch_embed"] * (2 if train else 1), {  # the image gets no gradient
        "eager": pe_eager, "inductor": pe_eager, "dit_fast": pe_fused,
    })
    add("norm1 + modulate", "memory", 0, {
        "eager": [K(k.flops, k.bytes * n, k.launches * n) for k in eager_norm_mod],
        "inductor": fused("adaln_modulate", 1),  # first block; later ones ride on the residual kernels
        "dit_fast": fused("adaln_modulate", 1),
    })
    qkv = gemm(F["qkv"], n * Al, n * 3 * D * D, n * 3 * Al, n)
    add("qkv GEMM", "gemm", mult * F["qkv"], {"eager": cast(n * Ar, n * Al, n) + qkv, "inductor": qkv, "dit_fast": qkv})
    fa = F["attention_qk"] + F["attention_pv"]
    pad = -(-head_dim // 32) * 32 / head_dim
    sm = 4 if autocast else lp  # softmax output dtype (autocast runs softmax in fp32)
    math_attn = [blk(0, 2 * Al), blk(fa / 2, 2 * Al + S * lp), blk(0, S * lp + S * sm)]
    math_attn += [blk(0, S * sm + S * lp)] if autocast else []
    math_attn += [blk(fa / 2, S * lp + 2 * Al), blk(0, 2 * Al)]
    if train:
        math_attn += [blk(0, 2 * Al), blk(fa / 2, 2 * Al + S * lp), blk(fa / 2, S * lp + 2 * Al)]
        math_attn += [blk(0, S * lp + S * 4), blk(0, S * 4 + S * lp)] if autocast else []
        math_attn += [blk(0, 3 * S * sm), blk(fa / 2, S * lp + 2 * Al), blk(fa / 2, S * lp + 2 * Al),
                      blk(0, 2 * Al), blk(0, 6 * Al)]  # q*scale backward, dq/dk/dv stacked into dqkv
    flash = [blk(fa * pad, 4 * Al)] + ([blk(2.5 * fa * pad, 8 * Al)] if train else [])
    stack = [blk(0, 6 * Al)] if train else []  # dq, dk, dv written once into the packed dqkv
    # the published permute + unbind(0) of qkv: its stacked gradient is copied again to be contiguous
    clone = [blk(0, 6 * Al)] if train else []
    add("attention", "attention", fa * (3 if train else 1), {
        "eager": (math_attn if eager_attention == "math" else flash + stack) + clone,
        "inductor": flash + stack,
        # SDPA (the stack is free where the kernel allocates dq/dk/dv packed, as memory-efficient SDPA
        # does: attention.packed_grad); flash-attn 2's packed kernel writes dqkv itself
        "dit_fast": flash + stack,
    })
    proj = gemm(F["proj"], n * Al, n * D * D, n * Al, n)
    add("proj GEMM", "gemm", mult * F["proj"], {plan: proj for plan in PLANS})
    eager_res_norm = [K(a.flops + b.flops, (a.bytes + b.bytes) * n, (a.launches + b.launches) * n)
                      for a, b in zip(eager_gate_res, eager_norm_mod)]
    add("gate*attn + residual + norm2 + modulate", "memory", 0, {
        "eager": eager_res_norm, "inductor": fused("gated_residual_adaln", n),
        "dit_fast": fused("gated_residual_adaln", n),
    })
    fc1 = gemm(F["fc1"], n * Al, n * H * D, n * Hl, n)
    # dit_fast as built: fc1's GEMM without its bias, then one pass adds the bias and applies GELU. Only
    # inference of a bf16 model (weights already in the GEMM's dtype) takes cuBLASLt's GELU epilogue, and
    # only once gelu_epilogue.py's check passed on the device; under autocast the separate pass stays.
    gelu_in_epilogue = not train and precision == "bf16"
    add("fc1 GEMM (dit_fast: GELU epilogue for a bf16 model's inference)", "gemm", mult * F["fc1"],
        {"eager": cast(n * Ar, n * Al, n) + fc1, "inductor": fc1, "dit_fast": fc1})
    gelu_fwd = [blk(0, 2 * Hl)]
    gelu_bwd = [blk(0, 3 * Hl)] if train else []
    add("GELU (tanh)", "memory", 0, {"eager": gelu_fwd + gelu_bwd, "inductor": gelu_fwd + gelu_bwd,
                                     "dit_fast": ([] if gelu_in_epilogue else gelu_fwd) + gelu_bwd})
    fc2 = gemm(F["fc2"], n * Hl, n * D * H, n * Al, n)
    add("fc2 GEMM", "gemm", mult * F["fc2"], {plan: fc2 for plan in PLANS})
    add("gate*mlp + residual (+ next norm1 + modulate)", "memory", 0, {
        "eager": [K(k.flops, k.bytes * n, k.launches * n) for k in eager_gate_res],
        "inductor": fused("gated_residual_adaln", n), "dit_fast": fused("gated_residual_adaln", n),
    })
    out_bytes = N * out_c * lp
    fl = gemm(F["final_linear"], Al, out_c * D, out_bytes, 1)
    unpatchify = mem(2 * out_bytes, 1, 2 * out_bytes, 1)
    add("final layer: norm + modulate + linear + unpatchify", "gemm", mult * F["final_linear"], {
        "eager": eager_norm_mod + cast(Ar, Al, 1) + fl + unpatchify,
        "inductor": fl + unpatchify,  # its norm + modulate rode on the last residual kernel
        "dit_fast": fl,  # the linear writes the unpatchified layout
    })
    if train:
        # bias gradients = sums of the linear layers' output gradients over the tokens (adaLN's are tiny):
        # eager reduces each one separately; an Inductor-like fusion rides fc1's on GELU's backward;
        # dit_fast also rides proj's and fc2's on the gated residual's backward (Capability.fused_bias)
        add("bias gradients of qkv, proj, fc1, fc2", "memory", 0, {
            "eager": [K(0, n * (3 * Al + Al + Hl + Al), 4 * n)],
            "inductor": [K(0, n * (3 * Al + Al + Al), 3 * n)],
            "dit_fast": [blk(0, 3 * Al)],
        })
        add("optimizer: AdamW (fused, fp32)", "memory", 0,
            {plan: [K(0, OPTIMIZER_BYTES_PER_PARAM * n_params, 1)] for plan in PLANS})
    return ops


def predict(s: DiTShape, batch: int, mode: str, copy_gb_per_s: float, gemm_tflops: float,
            precision: str = "autocast", eager_attention: str = "sdpa") -> tuple[list[dict], list[dict]]:
    """(per-op rows, per-plan summary rows) with GB, ms and launches for each plan."""
    if not copy_gb_per_s > 0 or not gemm_tflops > 0:
        raise ValueError(f"copy_gb_per_s and gemm_tflops must be > 0, got {copy_gb_per_s} and {gemm_tflops}")
    rate, bw = gemm_tflops * 1e12, copy_gb_per_s * 1e9
    ops = step_ops(s, batch, mode, precision, eager_attention)
    rows, totals = [], {plan: {"ms": 0.0, "gb": 0.0, "launches": 0, "gemm_ms": 0.0, "memory_ms": 0.0} for plan in PLANS}
    for o in ops:
        row = {"mode": mode, "op": o["op"], "kind": o["kind"], "gflop": o["gflop"]}
        for plan in PLANS:
            ks = o["kernels"][plan]
            ms = sum(k.seconds(rate, bw) for k in ks) * 1e3
            gb = sum(k.bytes for k in ks) / 1e9
            row[f"{plan}_gb"], row[f"{plan}_ms"] = gb, ms
            row[f"{plan}_launches"] = sum(k.launches for k in ks)
            t = totals[plan]
            t["ms"] += ms
            t["gb"] += gb
            t["launches"] += row[f"{plan}_launches"]
            for k in ks:
                bound = "gemm_ms" if k.flops / rate >= k.bytes / bw else "memory_ms"
                t[bound] += k.seconds(rate, bw) * 1e3
        rows.append(row)
    model_flops = flops_per_step(s, "train" if mode == "train" else "fwd", batch)
    summary = []
    for plan in PLANS:
        t = totals[plan]
        summary.append({
            "mode": mode, "plan": plan, "step_ms": t["ms"], "images_per_s": batch / (t["ms"] * 1e-3),
            "tflops": model_flops / (t["ms"] * 1e-3) / 1e12, "mfu": model_flops / (t["ms"] * 1e-3) / rate,
            "gb": t["gb"], "gemm_bound_ms": t["gemm_ms"], "memory_bound_ms": t["memory_ms"], "launches": t["launches"],
        })
    base = {r["plan"]: r["step_ms"] for r in summary}
    for r in summary:
        r["speedup_vs_eager"] = base["eager"] / r["step_ms"]
        r["speedup_vs_inductor"] = base["inductor"] / r["step_ms"]
    return rows, summary


OP_COLS = [("mode", "mode"), ("op", "op"), ("kind", "kind"), ("gflop", "GFLOP"),
           ("eager_gb", "eager GB"), ("eager_ms", "eager ms"),
           ("inductor_gb", "inductor GB"), ("inductor_ms", "inductor ms"),
           ("dit_fast_gb", "dit_fast GB"), ("dit_fast_ms", "dit_fast ms")]
SUMMARY_COLS = [("mode", "mode"), ("plan", "plan"), ("step_ms", "step ms"), ("images_per_s", "img/s"),
                ("tflops", "TFLOP/s"), ("mfu", "MFU"), ("gb", "GB moved"), ("gemm_bound_ms", "GEMM-bound ms"),
                ("memory_bound_ms", "memory-bound ms"), ("launches", "kernels"), ("speedup_vs_eager", "x eager"),
                ("speedup_vs_inductor", "x inductor")]


def markdown_section(record: dict) -> list[str]:
    from .report import md_table

    c = record.get("ceilings") or {}
    lines = ["## Roofline (PREDICTED, not measured)", "",
             f"Ceilings used: copy {c.get('copy_gb_per_s')} GB/s, bf16 GEMM {c.get('gemm_tflops')} TFLOP/s "
             f"({c.get('source', '')}).", "",
             "Predicted step per plan (a floor: launch gaps, wave quantization and GEMM shape efficiency "
             "are not modelled):", "",
             md_table(record.get("roofline_summary", []), SUMMARY_COLS), "",
             "Per op, whole step (all blocks):", "", md_table(record["roofline"], OP_COLS), ""]
    return lines
