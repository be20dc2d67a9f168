"""The predicted roofline: exact FLOPs, the byte model of the fused ops, the time arithmetic and the CLI."""
import json
import os

import pytest

from dit_fast import cli
from dit_fast.bench.flops import forward_flops_per_image, shape_for
from dit_fast.bench.roofline import DEVICE_SPECS, PLANS, predict, step_ops

XL = shape_for("DiT-XL/2", 256)
B = 256
N, D = B * XL.tokens, XL.hidden_size


def _rows(mode="forward", precision="autocast", copy=3000, gemm=800):
    rows, summary = predict(XL, B, mode, copy, gemm, precision)
    return {r["op"]: r for r in rows}, {r["plan"]: r for r in summary}


def test_forward_flops_are_the_papers_237_gflop_per_image():
    ops = step_ops(XL, B, "forward")
    total = sum(o["gflop"] for o in ops) * 1e9
    assert total == pytest.approx(forward_flops_per_image(XL) * B, rel=1e-12)
    assert total / B / 1e9 == pytest.approx(237.2, abs=0.1)
    train = sum(o["gflop"] for o in step_ops(XL, B, "train")) * 1e9
    # 3x forward, except that nothing differentiates the input image (patch_embed has no dgrad)
    assert train == pytest.approx(3 * total - 2 * XL.in_channels * 4 * D * XL.tokens * B, rel=1e-12)


def test_norm1_modulate_moves_two_activations():
    rows, _ = _rows(precision="bf16")
    act = N * D * 2  # one [N, D] bf16 activation: 151 MB
    assert act == pytest.approx(151e6, rel=0.01)
    mods = 2 * B * D * 2  # shift and scale
    for plan in ("inductor", "dit_fast"):
        assert rows["norm1 + modulate"][f"{plan}_gb"] * 1e9 == 2 * act + mods
    # under autocast the residual stream is fp32: read 4 bytes, write 2
    rows, _ = _rows()
    assert rows["norm1 + modulate"]["dit_fast_gb"] * 1e9 == N * D * (4 + 2) + mods
    # gate*y + residual + norm2 + modulate: read x (fp32), y; write x_out (fp32), h; three [B, D] vectors
    per_block = rows["gate*attn + residual + norm2 + modulate"]["dit_fast_gb"] * 1e9 / XL.depth
    assert per_block == N * D * (4 + 2 + 4 + 2) + 3 * B * D * 2


def test_times_follow_the_ceilings():
    rows, summary = _rows()
    qkv_flops = 2 * N * D * 3 * D * XL.depth
    assert rows["qkv GEMM"]["dit_fast_ms"] == pytest.approx(qkv_flops / 800e12 * 1e3)  # GEMM-bound
    norm = rows["norm1 + modulate"]
    assert norm["dit_fast_ms"] == pytest.approx(norm["dit_fast_gb"] / 3000 * 1e3)  # memory-bound
    # GELU: a pass of its own (bias fused into it) except a bf16 model's inference (cuBLASLt epilogue)
    gelu = rows["GELU (tanh)"]
    assert gelu["dit_fast_gb"] == gelu["inductor_gb"] > 0
    assert _rows(precision="bf16")[0]["GELU (tanh)"]["dit_fast_gb"] == 0
    assert summary["eager"]["step_ms"] > summary["inductor"]["step_ms"] >= summary["dit_fast"]["step_ms"]
    for plan in PLANS:
        s = summary[plan]
        assert s["step_ms"] == pytest.approx(sum(r[f"{plan}_ms"] for r in rows.values()))
        assert s["mfu"] == pytest.approx(forward_flops_per_image(XL) * B / (s["step_ms"] * 1e-3) / 800e12)
        assert 0 < s["mfu"] < 1
    # half the bandwidth: memory-bound ops take twice as long, GEMM-bound ones no longer
    slow, _ = _rows(copy=1500)
    assert slow["norm1 + modulate"]["dit_fast_ms"] == pytest.approx(2 * norm["dit_fast_ms"])
    assert slow["qkv GEMM"]["dit_fast_ms"] == pytest.approx(rows["qkv GEMM"]["dit_fast_ms"])
    train_rows, train = _rows("train")
    assert train["dit_fast"]["step_ms"] > 2.5 * summary["dit_fast"]["step_ms"]
    assert "optimizer: AdamW (fused, fp32)" in train_rows
    bias = train_rows["bias gradients of qkv, proj, fc1, fc2"]
    assert bias["dit_fast_gb"] * 1e9 == pytest.approx(3 * N * D * 2 * XL.depth)  # qkv's only
    assert bias["eager_gb"] > bias["inductor_gb"] > bias["dit_fast_gb"]
    with pytest.raises(ValueError, match="mode"):
        step_ops(XL, B, "sample")


def test_roofline_cli_prints_and_writes_predicted_tables(tmp_path, capsys):
    assert cli.main(["roofline", "--device", "a100", "--mode", "train", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "PREDICTED" in out and "280 TFLOP/s" in out and "1700 GB/s" in out
    (json_name,) = [p for p in os.listdir(tmp_path) if p.endswith(".json")]
    assert json_name.endswith("-a100-predicted-roofline.json")
    record = json.loads((tmp_path / json_name).read_text())
    assert record["predicted"] is True and record["ceilings"]["gemm_tflops"] == DEVICE_SPECS["a100"]["gemm_tflops"]
    assert {r["plan"] for r in record["roofline_summary"]} == set(PLANS)
    assert "PREDICTED" in (tmp_path / json_name.replace(".json", ".md")).read_text()
    assert cli.main(["roofline", "--gemm-tflops", "400", "--mode", "forward"]) == 0
    assert "400.0 TFLOP/s" in capsys.readouterr().out


@pytest.mark.parametrize("argv, flag", [
    (["--batch", "0"], "--batch"), (["--copy-gbps", "-1"], "--copy-gbps"), (["--device", "v100"], "--device"),
    (["--model", ""], "--model"), (["--mode", "sample"], "--mode"),
])
def test_roofline_usage_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["roofline", *argv])
    assert e.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["forward", "train"])
def test_the_reference_baselines_run_sdpa_attention(mode):
    """The eager and Inductor plans model the reference as built (SDPA: a fused kernel, no [B, H, L, L]
    scores); eager_attention="math" (reference-math) materializes the scores and moves far more bytes."""
    scores = B * XL.num_heads * XL.tokens**2 * 2 * XL.depth  # one bf16 [B, H, L, L] tensor, all blocks
    by_plan = {}
    for attention in ("sdpa", "math"):
        rows, _ = predict(XL, B, mode, 3000, 800, eager_attention=attention)
        by_plan[attention] = next(r for r in rows if r["op"] == "attention")
    default = next(r for r in predict(XL, B, mode, 3000, 800)[0] if r["op"] == "attention")
    assert default == by_plan["sdpa"]
    sdpa, math = by_plan["sdpa"], by_plan["math"]
    q_k_v_out = 4 * B * XL.tokens * XL.hidden_size * 2 * XL.depth  # what a flash forward reads and writes
    assert sdpa["eager_gb"] * 1e9 <= (6 if mode == "train" else 1) * q_k_v_out * 1.001  # no score tensor anywhere
    assert sdpa["inductor_gb"] == math["inductor_gb"] <= sdpa["eager_gb"]
    # the scores: written, read by softmax, written again, read by @ v (and more in the backward)
    assert (math["eager_gb"] - sdpa["eager_gb"]) * 1e9 > 3 * scores
    assert math["eager_ms"] > 2 * sdpa["eager_ms"]
