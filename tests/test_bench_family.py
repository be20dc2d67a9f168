"""The benchmarks for the DiT family (SiT, LightningDiT): shapes and FLOPs, the contenders (LightningDiT's
reference+compile-blocks), training rounds on ONE shared set of weights and optimizer (the same losses as
separate runs), the per-op rows of LightningDiT's modes, the flow samplers. Tiny models on the CPU; torch.compile
runs with the "eager" backend here (Dynamo traces the contender; no code generation on 2 cores)."""
import functools
from dataclasses import replace

import numpy as np
import pytest
import torch

from dit_fast.bench.contenders import build_reference, contender_list, instantiate, make_inputs, make_step
from dit_fast.bench.flops import flops_per_step, parse_lightning_options, shape_for
from dit_fast.bench.rounds import rotated
from dit_fast.bench.throughput import pristine_reference, run_throughput

CPU = torch.device("cpu")
SIT = replace(shape_for("SiT-S/2", 256, depth=2), input_size=4, hidden_size=64, num_heads=4)
LIGHTNING = replace(shape_for("LightningDiT-B/1", 256, depth=2), input_size=4, hidden_size=64, num_heads=4)
LIGHTNING_QK = replace(LIGHTNING, options=parse_lightning_options("qknorm,wo_shift,rmsnorm"))
SHAPES = {"SiT": SIT, "LightningDiT": LIGHTNING, "LightningDiT-qknorm-wo_shift": LIGHTNING_QK}


@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile (and so nn.Module.compile) with Dynamo's eager backend: the graphs are traced, not built."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))


def test_family_shapes():
    xl1 = shape_for("LightningDiT-XL/1")
    assert (xl1.input_size, xl1.in_channels, xl1.learn_sigma, xl1.tokens) == (16, 32, False, 256)
    assert xl1.options == ("swiglu", "rope", "rmsnorm") and xl1.mlp_hidden == 3072 and xl1.returned_channels == 32
    sit = shape_for("SiT-XL/2")
    assert sit.flow and sit.returned_channels == 4 and sit.out_channels == 8
    assert flops_per_step(sit, "fwd", 1) == flops_per_step(shape_for("DiT-XL/2"), "fwd", 1)  # the same network
    assert parse_lightning_options("none") == () and parse_lightning_options("recipe,qknorm")[0] == "qknorm"
    with pytest.raises(ValueError, match="'qk_norm'"):
        parse_lightning_options("qk_norm")
    with pytest.raises(ValueError, match="model must be one of"):
        shape_for("SiT-XXL/2")


@pytest.mark.parametrize("options", ["swiglu,rope,rmsnorm", "qknorm,wo_shift", "none"])
def test_lightning_flops_match_torch_flop_counter(options):
    """An independent count of LightningDiT's GEMMs (SwiGLU's w12/w3, a 4-chunk adaLN with wo_shift)."""
    from torch.utils.flop_counter import FlopCounterMode

    from dit_fast.bench.contenders import set_reference_attention

    s = replace(LIGHTNING, options=parse_lightning_options(options), depth=1)
    model = set_reference_attention(build_reference(s, CPU), math=True)  # FlopCounterMode counts the math bmm
    n = 3
    inputs = make_inputs(s, n, CPU)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(inputs.x, inputs.t, inputs.y)
    assert counter.get_total_flops() == flops_per_step(s, "fwd", n)


def test_contenders_per_family():
    names = [c.name for c in contender_list("cpu", ["torch"], True, False, "auto", family="LightningDiT")]
    assert names == ["reference", "reference-math", "dit_fast[torch]", "reference+compile-blocks",
                     "reference+compile", "reference-math+compile"]
    assert "reference+compile-blocks" not in [c.name for c in contender_list("cpu", ["torch"], True, False, "auto")]


def test_compile_blocks_compiles_each_block_embedders_and_final_layer(eager_compile):
    ref = pristine_reference(LIGHTNING, CPU)
    (c,) = [c for c in contender_list("cpu", ["torch"], True, False, "auto", family="LightningDiT")
            if c.name == "reference+compile-blocks"]
    model = instantiate(c, ref, share_weights=True)
    compiled = [m for m in (*model.blocks, model.t_embedder, model.y_embedder, model.final_layer)]
    assert all(m._compiled_call_impl is not None for m in compiled)
    assert model._compiled_call_impl is None and "forward" not in vars(model)  # the top level stays eager
    assert all(p is q for p, q in zip(model.parameters(), ref.parameters()))  # shared, not copied
    inputs = make_inputs(LIGHTNING, 2, CPU)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(inputs.x, inputs.t, inputs.y), ref.eval()(inputs.x, inputs.t, inputs.y))


def _round_order(rows: list[dict], rounds: int) -> list[tuple[str, float]]:
    """(contender, loss) of every training step in the order the rounds ran them."""
    losses = {r["contender"]: r["losses"] for r in rows}
    return [(name, losses[name][r]) for r in range(rounds) for name in rotated(list(losses), r)]


def _shared_run(shape, contenders, rounds, lr, **kwargs):
    np.random.seed(1)  # LightningDiT's logit-normal t comes from NumPy's global generator
    rows = run_throughput(shape, device=CPU, dtype=torch.float32, batch={"train": [2]}, modes=["train"],
                          backends=["torch", "ext"], warmup=0, iters=rounds, progress=False, contenders=contenders,
                          lr=lr, **kwargs)
    assert all("error" not in r and r["shared_weights"] for r in rows), rows
    return rows


@pytest.mark.parametrize("family", sorted(SHAPES))
def test_shared_weight_rounds_first_step_losses_equal_separate_runs(family):
    """With lr 0 the shared weights stay pristine: every contender's first step must compute the loss a separate
    copy of it computes (the same random draws: the transport's t and x0, label dropout, in the same order)."""
    shape = SHAPES[family]
    names = ["reference", "dit_fast[torch]", "reference-math", "dit_fast[ext]"]
    rows = _shared_run(shape, names, 1, lr=0.0)
    shared = _round_order(rows, 1)
    pristine = pristine_reference(shape, CPU)  # the same global draws as run_throughput's, in the same order
    np.random.seed(1)
    inputs = make_inputs(shape, 2, CPU)
    by_name = {c.name: c for c in contender_list("cpu", ["torch", "ext"], False, False, "auto")}
    for name, loss in shared:
        step = make_step(instantiate(by_name[name], pristine), "train", inputs, CPU, torch.float32, 0.0, shape=shape)
        step()
        assert loss == pytest.approx(float(step.last_loss), rel=1e-5, abs=1e-7), name
    assert len({round(loss, 4) for _, loss in shared}) > 1  # the draws differ per step: the check can fail


@pytest.mark.parametrize("family", ["SiT", "LightningDiT"])
def test_shared_weight_rounds_are_one_training_run(family):
    """With lr > 0 every step trains the weights the next contender uses, through one optimizer: the losses of
    the interleaved rounds equal one model trained alone for as many steps. Separate optimizers (each
    contender's Adam moments starting at zero) or copied weights would not."""
    shape = SHAPES[family]
    rounds, lr = 3, 3e-3
    rows = _shared_run(shape, ["reference", "dit_fast[torch]"], rounds, lr=lr)
    shared = [loss for _, loss in _round_order(rows, rounds)]
    pristine = pristine_reference(shape, CPU)
    np.random.seed(1)
    (ref,) = [c for c in contender_list("cpu", ["torch"], False, False, "auto") if c.name == "reference"]
    step = make_step(instantiate(ref, pristine), "train", make_inputs(shape, 2, CPU), CPU, torch.float32, lr,
                     shape=shape)
    alone = []
    for _ in shared:
        step()
        alone.append(float(step.last_loss))
    np.testing.assert_allclose(shared, alone, rtol=1e-4)
    assert abs(alone[-1] - alone[0]) > 1e-3 * abs(alone[0])  # the weights did move


def test_family_rows_run_with_every_contender(eager_compile):
    """fwd, cfg and train rows of LightningDiT (qknorm + wo_shift) with every contender, compiled ones included;
    speedups against the blocks-compiled baseline."""
    rows = run_throughput(LIGHTNING_QK, device=CPU, dtype=torch.float32, batch=2, modes=["fwd", "cfg", "train"],
                          backends=["torch"], compile_ref=True, compile_fast=True, warmup=0, iters=1,
                          progress=False)
    errors = [(r["contender"], r["mode"], r["error"]) for r in rows if r.get("error")]
    assert not errors, errors
    names = {r["contender"] for r in rows}
    assert {"reference+compile-blocks", "reference+compile", "dit_fast[torch]+compile"} <= names
    train = [r for r in rows if r["mode"] == "train"]
    assert len(train) == 7 and all(r["shared_weights"] and np.isfinite(r["losses"]).all() for r in train)
    assert all(r.get("speedup_vs_compile_blocks") for r in rows)


def test_lightning_kernel_rows():
    """The default op table of a LightningDiT: RMSNorm modes with and without shift, SwiGLU, QK-norm + RoPE."""
    from dit_fast.bench.kernel_variants import default_ops
    from dit_fast.bench.kernels import make_case, make_pass, op_fn, run_kernels

    ops = default_ops(LIGHTNING)
    assert {"adaln_modulate:rms", "adaln_modulate:rms-noshift", "gated_residual_adaln:rms-noshift",
            "final_layer:rms", "swiglu", "qk_norm_rope"} <= set(ops)
    rows = run_kernels(device=CPU, dtype=torch.float32, shapes=[(1, 16, 64)], ops=ops, rounds=1, cpu_iters=1,
                       progress=False, copy_gb_per_s=10.0)
    assert {r["op"] for r in rows} == set(ops)
    for r in rows:
        assert not r.get("error"), r
        if r["backend"] == "eager":
            assert r["fwd_bwd_ms"] > 0 and r["fwd_pct_copy"] > 0, r
    by_op = {r["op"]: r for r in rows if r["backend"] == "eager"}
    # no shift: one [B, D] tensor less read, and its gradient less written (fp32: 4 bytes each)
    assert by_op["adaln_modulate:rms"]["fwd_bytes"] - by_op["adaln_modulate:rms-noshift"]["fwd_bytes"] == 64 * 4
    # the case runs the mode it names: h = rmsnorm(x) * gain * (1 + scale), no shift
    case = make_case("adaln_modulate:rms-noshift", 2, 3, 8, torch.float32, CPU)
    x, shift, scale, gain = case.args[0], case.args[1], case.args[2], case.args[6]
    assert shift is None and case.args[5] == "rms"
    run, _ = make_pass(case, op_fn("eager", case.op), CPU, torch.float32, "fwd")
    expect = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * gain * (1 + scale[:, None])
    torch.testing.assert_close(run(), expect)


@pytest.mark.parametrize("shape", [SIT, LIGHTNING], ids=["SiT", "LightningDiT"])
def test_flow_sampling_bench(shape, eager_compile):
    from dit_fast.bench.sampling import run_sampling_bench

    rows = run_sampling_bench(shape, device=CPU, batches=(1,), num_steps=3, rounds=1, backend="torch",
                              compile_ref=True)
    assert not [r for r in rows if r["error"]], rows
    plans = {r["sampler"] for r in rows}
    if shape.family == "SiT":
        assert plans == {"ode-euler", "sde-Euler"}
    else:
        assert plans == {"ode-euler shift=0.3 cfg t>=0.11"}
        assert "reference+compile-blocks" in {r["contender"] for r in rows}
    assert all(r["median_ms"] > 0 for r in rows)


def test_flow_contenders_sample_the_same_latents():
    """The published Sampler loop and dit_fast.sample_flow, as the bench calls them, return the same samples
    (LightningDiT: shift 0.3 and the CFG interval)."""
    from dit_fast.bench.flow_sampling import FLOW_PLANS, flow_contenders

    ref = pristine_reference(LIGHTNING, CPU)
    fns = flow_contenders(ref, "LightningDiT", FLOW_PLANS["LightningDiT"][0], CPU, backend="torch")
    z = torch.randn(2, LIGHTNING.in_channels, 4, 4)
    y = torch.tensor([1, 2])
    with torch.inference_mode():
        out = {name: fn(z, y, 4, 4.0) for name, fn in fns.items()}
    torch.testing.assert_close(out["dit_fast"], out["reference"], rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [SIT, LIGHTNING], ids=["SiT", "LightningDiT"])
def test_family_benchmarks_run_on_cuda_gpu(shape):
    """On CUDA: the flow sampling bench with the CUDA-graph contender, and the shared-weight training rows with
    each contender's peak memory (one model + AdamW state + activations: at least 4x the parameter bytes)."""
    from dit_fast.bench.sampling import run_sampling_bench

    dev = torch.device("cuda")
    rows = run_sampling_bench(shape, device=dev, batches=(2,), num_steps=3, rounds=1, backend="auto")
    assert not [r for r in rows if r["error"]], rows
    assert "dit_fast+graph" in {r["contender"] for r in rows}
    rows = run_throughput(shape, device=dev, dtype=torch.bfloat16, batch={"train": [4]}, modes=["train"],
                          backends=["auto"], warmup=1, iters=2, progress=False,
                          contenders=["reference", "dit_fast[auto]"])
    model_gib = 4 * sum(p.numel() * 4 for p in build_reference(shape, "cpu").parameters()) / 2**30
    for r in rows:
        assert "error" not in r and r["shared_weights"] and np.isfinite(r["losses"]).all(), r
        assert 0.9 * model_gib <= r["peak_mem_gib"] < model_gib + 0.5, (r["contender"], r["peak_mem_gib"])
