"""The benchmark CLI on the CPU with a tiny DiT: every subcommand runs and writes valid results.

Figures are not asserted (they are timings); what is checked is that the files exist, parse, carry
the environment record, and that the parity report can fail.
"""
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from dit_fast import cli
from dit_fast.bench.flops import shape_for
from dit_fast.bench.parity import all_pass, run_parity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--device", "cpu", "--model", "DiT-S/2", "--input-size", "8", "--depth", "1", "--warmup", "0",
        "--iters", "1", "--no-progress"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ENV_KEYS = {"device_name", "torch", "triton", "cuda", "flash_attn", "git_commit", "git_dirty", "date", "sm_count"}


def _check_files(base: str, sections: set) -> dict:
    with open(base + ".json") as f:
        record = json.load(f)
    assert ENV_KEYS <= set(record["env"]), set(record["env"])
    assert "hostname" not in json.dumps(record["env"]).lower()
    assert sections <= {k for k in record if record[k]}, sections
    with open(base + ".md") as f:
        md = f.read()
    assert md.startswith("# dit_fast") and "| " in md
    with open(base + ".png", "rb") as f:
        assert f.read(8) == PNG_MAGIC
    return record


def test_bench_writes_parity_and_throughput(tmp_path):
    rc = cli.main(["bench", *TINY, "--mode", "fwd,train", "--backend", "torch", "--out", str(tmp_path)])
    assert rc == 0
    (json_path,) = [p for p in os.listdir(tmp_path) if p.endswith(".json")]
    assert json_path.endswith("-cpu.json")
    record = _check_files(str(tmp_path / json_path[:-5]), {"parity", "throughput", "flops", "ceilings"})
    rows = {(r["contender"], r["mode"]): r for r in record["throughput"]}
    assert set(rows) == {(c, m) for c in ("reference", "dit_fast[torch]") for m in ("fwd", "train")}
    for r in rows.values():
        assert "error" not in r, r
        assert r["ms_per_iter"] > 0 and r["images_per_s"] > 0 and r["flops_per_iter"] > 0
    assert rows[("dit_fast[torch]", "train")]["flops_per_iter"] == 3 * rows[("dit_fast[torch]", "fwd")]["flops_per_iter"]
    assert {r["dtype"] for r in record["parity"]} == {"float32", "bfloat16"}
    assert all_pass(record["parity"])


def test_parity_flags_a_broken_model():
    shape = replace(shape_for("DiT-S/2", 256, depth=1), input_size=8)
    dev = torch.device("cpu")
    good = run_parity(shape, device=dev, dtypes=(torch.float32,), backends=["torch"])
    assert all_pass(good), good

    def break_one_weight(model):
        with torch.no_grad():
            model.blocks[0].mlp.fc2.weight[3, 5] += 0.05

    bad = run_parity(shape, device=dev, dtypes=(torch.float32,), backends=["torch"], tamper=break_one_weight)
    assert not all_pass(bad)
    by_q = {r["quantity"]: r for r in bad}
    assert not by_q["output"]["pass"] and by_q["output"]["rel_err_vs_fp64"] > by_q["output"]["bound"]
    from dit_fast.bench.report import PARITY_COLS, md_table

    assert "FAIL" in md_table(bad, PARITY_COLS)


def test_info_runs(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "adaln_modulate" in out and "Attention on cpu" in out


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit):
        cli.main(["bench", *TINY, "--mode", "sample"])
    with pytest.raises(ValueError, match="dtype"):
        cli.main(["bench", *TINY, "--dtype", "int8"])


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """The one-shot GPU script, every stage on the CPU with a tiny model: summary, merged results, details."""
    env = dict(os.environ, PYTHON=sys.executable, DIT_FAST_DRY_RUN="1")
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    summary = (tmp_path / "summary.md").read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    for stage in ("install", "info", "gpu_tests", "parity", "throughput", "kernels", "profile", "report"):
        assert f"| {stage} | ok |" in summary, summary
    (json_name,) = [p for p in os.listdir(tmp_path) if p.endswith(".json")]
    record = _check_files(str(tmp_path / json_name[:-5]), {"parity", "throughput", "kernels", "profile"})
    assert record["kernels"][0]["fwd_bytes"] > 0
    assert any(p["ranges"] for p in record["profile"]), "no block ranges recorded"
    # A stage catches a contender's exception and records it as a row: such rows must not pass silently.
    for section in ("throughput", "kernels", "profile"):
        errors = [row["error"] for row in record[section] if row.get("error")]
        assert not errors, f"{section}: {errors}"
    assert (tmp_path / "details.tar.gz").stat().st_size > 0
    assert not (tmp_path / "details").exists()
