"""Model-benchmark contenders and rows: the SDPA reference and reference-math, training rows per batch
timed one contender at a time, the largest-batch search, merged reports, kernel families by --backend."""
import json
import os
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from dit_fast import cli
from dit_fast.bench.contenders import build_reference, contender_list, instantiate, make_inputs, ran_label
from dit_fast.bench.flops import shape_for
from dit_fast.bench.throughput import add_speedups, largest_fitting, run_throughput

SHAPE = replace(shape_for("DiT-S/2", 256, depth=2), input_size=8)
CPU = torch.device("cpu")


def test_reference_runs_sdpa_and_reference_math_the_explicit_softmax(monkeypatch):
    ref = build_reference(SHAPE, CPU)
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    softmaxes = []
    real_softmax = torch.Tensor.softmax
    monkeypatch.setattr(torch.Tensor, "softmax",
                        lambda self, *a, **k: softmaxes.append(1) or real_softmax(self, *a, **k))
    by_name = {c.name: c for c in contender_list("cpu", ["torch"], compile_ref=True, compile_fast=False, attn="auto")}
    assert list(by_name) == ["reference", "reference-math", "dit_fast[torch]", "reference+compile",
                             "reference-math+compile"]
    x = make_inputs(SHAPE, 2, CPU)
    outs = {}
    for name in ("reference", "reference-math"):
        model = instantiate(by_name[name], ref).eval()
        assert all(b.attn.fused_attn is (name == "reference") for b in model.blocks)
        calls.clear()
        softmaxes.clear()
        with torch.no_grad():
            outs[name] = model(x.x, x.t, x.y)
        if name == "reference":
            assert len(calls) == SHAPE.depth and not softmaxes
        else:
            assert not calls and len(softmaxes) == SHAPE.depth
    torch.testing.assert_close(outs["reference"], outs["reference-math"], rtol=1e-4, atol=1e-5)
    assert all(b.attn.fused_attn for b in ref.blocks)  # the pristine copy is left as built


def test_contender_filter_names_what_exists():
    names = [c.name for c in contender_list("cpu", ["torch"], True, False, "auto",
                                            only=["reference+compile", "dit_fast[torch]", "reference"])]
    assert names == ["reference", "dit_fast[torch]", "reference+compile"]  # eager first, compiled last
    with pytest.raises(ValueError, match="'dit_fast\\[triton\\]'"):
        contender_list("cpu", ["torch"], False, False, "auto", only=["dit_fast[triton]"])


def test_training_rows_per_batch_one_contender_at_a_time():
    updates = []
    rows = run_throughput(SHAPE, device=CPU, dtype=torch.float32, batch={"train": [2, 4]}, modes=["train"],
                          backends=["torch"], warmup=0, iters=2, progress=False, isolate_train=True,
                          contenders=["reference", "dit_fast[torch]"], on_update=lambda r: updates.append(len(r)))
    assert [(r["contender"], r["batch"]) for r in rows] == [("reference", 2), ("dit_fast[torch]", 2),
                                                            ("reference", 4), ("dit_fast[torch]", 4)]
    assert updates == [1, 2, 3, 4]  # every row saved the moment it is measured
    for r in rows:
        assert r["isolated"] and "error" not in r, r
        assert len(r["ms_rounds"]) == 2 and r["ms_per_iter"] > 0 and r["images_per_s"] > 0
        ref = next(x for x in rows if x["contender"] == "reference" and x["batch"] == r["batch"])
        # no paired rounds between isolated rows: the ratio of the medians, without a spread
        assert r["speedup_vs_eager"] == pytest.approx(ref["ms_per_iter"] / r["ms_per_iter"])
        assert "speedup_vs_eager_spread_pct" not in r
    with pytest.raises(ValueError, match="max_batch needs a CUDA device"):
        run_throughput(SHAPE, device=CPU, dtype=torch.float32, batch=2, modes=["train"], max_batch=True)


def test_speedups_pair_rows_of_the_same_batch():
    rows = [{"contender": "reference", "mode": "train", "batch": 32, "ms_per_iter": 10.0},
            {"contender": "reference", "mode": "train", "batch": 64, "ms_per_iter": 20.0},
            {"contender": "dit_fast[ext]", "mode": "train", "batch": 32, "ms_per_iter": 5.0},
            {"contender": "dit_fast[ext]", "mode": "train", "batch": 64, "ms_per_iter": 8.0}]
    add_speedups(rows)
    assert rows[2]["speedup_vs_eager"] == 2.0 and rows[3]["speedup_vs_eager"] == 2.5


@pytest.mark.parametrize("limit_fit, start, expect", [
    (200, 64, (192, 224)),   # 64, 128 fit, 256 not; bisect: 192 fits, 224 not
    (64, 64, (64, 96)),      # 128 does not fit, nor 96
    (1000, 64, (512, None)),  # everything up to the limit fits
    (10, 64, (None, 64)),    # not even the start
])
def test_largest_fitting_batch_search(limit_fit, start, expect):
    tried = []

    def fits(b):
        tried.append(b)
        return b <= limit_fit

    assert largest_fitting(fits, start, limit=512) == expect, tried
    assert len(tried) == len(set(tried)) <= 8


def test_merged_report_keeps_the_rows_of_every_file(tmp_path, capsys):
    env = {"date": "2026-12-05T00:00:00", "device_slug": "cpu"}
    files = []
    for i, (section, rows) in enumerate([
        ("throughput", [{"contender": "reference", "mode": "train", "batch": 32, "ms_per_iter": 1.0}]),
        ("throughput", [{"contender": "reference", "mode": "fwd", "batch": 256, "ms_per_iter": 2.0}]),
        ("sampling", [{"contender": "dit_fast", "batch": 1, "num_steps": 2, "median_ms": 3.0}]),
    ]):
        path = tmp_path / f"{i}.json"
        path.write_text(json.dumps({"env": env, "status": "complete" if i else "incomplete: terminated",
                                    section: rows}))
        files.append(str(path))
    assert cli.main(["report", *files, "--merge", str(tmp_path / "m"), "--no-png"]) == 0
    (merged,) = [p for p in os.listdir(tmp_path / "m") if p.endswith(".json")]
    record = json.loads((tmp_path / "m" / merged).read_text())
    assert [r["mode"] for r in record["throughput"]] == ["train", "fwd"]
    assert record["sampling"][0]["median_ms"] == 3.0 and record["status"] == "incomplete"


def test_kernel_families_follow_backend():
    from dit_fast.bench.kernels import kernel_contenders, run_kernels

    assert set(kernel_contenders("cpu", False, ["ext"])) == {"eager", "ext"}
    assert set(kernel_contenders("cpu", True, ["torch"])) == {"eager", "compile"}
    assert "ext" in kernel_contenders("cpu", False, ["auto"])
    with pytest.raises(ValueError, match="backend 'triton' cannot run on cpu here: triton on the CPU"):
        kernel_contenders("cpu", False, ["triton"])
    rows = run_kernels(device=CPU, dtype=torch.float32, shapes=[(1, 4, 8)], ops=["gated_residual"], rounds=1,
                       cpu_iters=1, progress=False, with_backward=False, backends=["ext"])
    assert {r["backend"] for r in rows} == {"eager", "ext"} and all(r.get("fwd_ms") for r in rows)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_profile_labels_name_the_kernels_that_ran():
    from dit_fast.backends import OPS, resolve

    ran = {op: resolve("ext", op, "cpu", False, 384) for op in OPS}
    label = ran_label("ext", "cpu", 384)
    on_torch = [op for op, b in ran.items() if b == "torch"]
    if on_torch:
        assert label == f"dit_fast[ext; torch for {','.join(on_torch)}]"
    else:
        assert label == "dit_fast[ext]"
    assert ran_label("torch", "cpu", 384) == "dit_fast[torch]"
    assert ran_label("auto", "cpu", 384).startswith("dit_fast[auto: ")


@pytest.mark.gpu
def test_largest_batch_search_survives_out_of_memory_gpu():
    """On a GPU capped at ~2 GiB above what is allocated: the B=8 row, then the search runs into out of
    memory, frees it, goes on, and times the largest batch that fit."""
    dev = torch.device("cuda")
    shape = replace(shape_for("DiT-S/2", 256, depth=2), input_size=32)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(dev).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_allocated(dev) + 2 * 2**30) / total), dev)
    try:
        rows = run_throughput(shape, device=dev, dtype=torch.bfloat16, batch={"train": [8]}, modes=["train"],
                              backends=["torch"], warmup=1, iters=2, progress=False, contenders=["reference"],
                              max_batch=True, max_batch_limit=1 << 16)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
    timed, largest = rows
    assert timed["batch"] == 8 and timed["shared_weights"] and "error" not in timed and 0 < timed["peak_mem_gib"] < 2.5
    assert largest["largest_batch"] and "error" not in largest, largest
    assert largest["oom_batch"] is not None and largest["oom_batch"] > largest["batch"] >= 8
    assert "out of memory" in largest["batches_tried"].values()
    assert largest["ms_per_iter"] > 0 and 0 < largest["peak_mem_gib"] <= 2.5


@pytest.mark.gpu
def test_shared_weight_training_rows_hold_one_model_and_optimizer_gpu():
    """On CUDA, the interleaved training rows of three contenders on shared weights: each contender's peak memory
    holds the one model's weights, gradients and AdamW moments (4x the parameter bytes) plus its own activations,
    never a second model's."""
    dev = torch.device("cuda")
    shape = replace(shape_for("DiT-S/2", 256, depth=4), input_size=32)
    rows = run_throughput(shape, device=dev, dtype=torch.bfloat16, batch={"train": [8]}, modes=["train"],
                          backends=["torch"], warmup=1, iters=3, progress=False,
                          contenders=["reference", "reference-math", "dit_fast[torch]"])
    model_gib = 4 * sum(p.numel() * 4 for p in build_reference(shape, "cpu").parameters()) / 2**30
    for r in rows:
        assert "error" not in r and r["shared_weights"] and len(r["losses"]) == 3, r
        assert model_gib <= r["peak_mem_gib"] < model_gib + 1.0, (r["contender"], r["peak_mem_gib"], model_gib)
