"""The benchmark CLI on the CPU with a tiny DiT: every subcommand runs and writes valid results.

Figures are not asserted (they are timings); what is checked is that the files exist, parse, carry
the environment record, and that the parity report can fail.
"""
import json
import os
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
    assert set(rows) == {(c, m) for c in ("reference", "reference-math", "dit_fast[torch]") for m in ("fwd", "train")}
    for r in rows.values():
        assert "error" not in r, r
        assert r["ms_per_iter"] > 0 and r["images_per_s"] > 0 and r["flops_per_iter"] > 0
    assert (rows[("dit_fast[torch]", "train")]["flops_per_iter"]
            == 3 * rows[("dit_fast[torch]", "fwd")]["flops_per_iter"])
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


@pytest.mark.parametrize("command, extra, flag", [
    ("bench", ["--mode", "bogus"], "--mode"),
    ("bench", ["--dtype", "int8"], "--dtype"),
    ("throughput", ["--iters", "0"], "--iters"),
    ("throughput", ["--iters", "-2"], "--iters"),
    ("throughput", ["--batch", "0"], "--batch"),
    ("throughput", ["--batch", "-4"], "--batch"),
    ("throughput", ["--input-size", "0"], "--input-size"),
    ("throughput", ["--input-size", "7"], "--input-size"),  # not a multiple of the patch size
    ("throughput", ["--model", ""], "--model"),
    ("throughput", ["--model", "SiT-XXL/2"], "--model"),
    ("throughput", ["--lightning-options", "qknorm,bogus"], "--lightning-options"),
    ("throughput", ["--lightning-options", "qknorm"], "--lightning-options"),  # a DiT model has none
    ("throughput", ["--depth", "0"], "--depth"),
    ("throughput", ["--warmup", "-1"], "--warmup"),
    ("throughput", ["--backend", "cuda"], "--backend"),
    ("throughput", ["--attn", "bogus"], "--attn"),
    ("throughput", ["--dtype", "fp32,bf16"], "--dtype"),  # one dtype only outside kernels
    ("kernels", ["--op", "softmax"], "--op"),
    ("kernels", ["--op", "gated_residual:rms"], "--op"),  # gated_residual has no norm
    ("kernels", ["--rounds", "0"], "--rounds"),
    ("profile", ["--target", "bogus"], "--target"),
])
def test_bad_arguments_are_usage_errors(command, extra, flag, tmp_path, capsys):
    argv = [command, *TINY, "--out", str(tmp_path)]
    if "--model" in extra:
        argv = [a for a in argv if a != "DiT-S/2" and a != "--model"]
    with pytest.raises(SystemExit) as e:
        cli.main(argv + extra)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert f"argument {flag}" in err and "expected" in err and "Traceback" not in err, err
    if flag == "--target":
        assert "block, model" in err
    assert os.listdir(tmp_path) == []  # nothing measured, nothing written


def test_unwritable_out_is_a_usage_error_before_measuring(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", *TINY, "--out", str(blocker / "results")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --out" in err and "results" in err


@pytest.mark.parametrize("content, expected", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "got a JSON list"),
    ('{"kind": "bench", "throughput": []}', "'env'"),
    ('{"env": {"date": "2026-12-03"}, "kernels": {"op": 1}}', "'kernels' to be a list"),
    ('{"env": {"date": "2026-12-03"}}', "at least one non-empty section"),
])
def test_report_names_a_malformed_input(tmp_path, capsys, content, expected):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(SystemExit) as e:
        cli.main(["report", str(bad), "--no-png"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and str(bad) in err and expected in err, err
    with pytest.raises(SystemExit):
        cli.main(["report", str(tmp_path / "missing.json")])
    assert "cannot be read" in capsys.readouterr().err


def _fake_throughput(monkeypatch, *, interrupt: bool, check=None):
    """run_throughput that reports one row, then is interrupted (Ctrl-C) or finishes."""
    import dit_fast.bench.throughput as tp

    def fake(shape, *, on_update=None, **kwargs):
        row = {"contender": "reference", "mode": "fwd", "batch": 2, "ms_per_iter": 5.0, "ms_rounds": [5.0]}
        on_update([row])
        if check:
            check()
        if interrupt:
            raise KeyboardInterrupt
        return [row]

    monkeypatch.setattr(tp, "run_throughput", fake)


def _earlier_complete(tmp_path) -> tuple:
    import datetime

    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    final = tmp_path / f"{today}-cpu-throughput.json"
    final.write_text(json.dumps({"status": "complete", "marker": "earlier run"}))
    return final, tmp_path / f"{today}-cpu-throughput-partial.json"


def test_ctrl_c_writes_incomplete_markdown_and_keeps_the_earlier_result(tmp_path, monkeypatch):
    final, partial = _earlier_complete(tmp_path)
    before = final.read_bytes()
    _fake_throughput(monkeypatch, interrupt=True)
    rc = cli.main(["throughput", *TINY, "--mode", "fwd", "--no-ceilings", "--out", str(tmp_path)])
    assert rc == 130
    assert final.read_bytes() == before  # the complete result of the earlier run is intact
    record = json.loads(partial.read_text())
    assert record["status"].startswith("incomplete") and record["throughput"][0]["ms_per_iter"] == 5.0
    md = partial.with_suffix(".md").read_text()
    assert "INCOMPLETE" in md and "| fwd | reference |" in md
    assert not final.with_suffix(".md").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_checkpoints_go_to_a_partial_file_and_the_final_name_only_at_the_end(tmp_path, monkeypatch):
    final, partial = _earlier_complete(tmp_path)

    def while_running():
        assert json.loads(final.read_text())["marker"] == "earlier run"
        assert json.loads(partial.read_text())["status"] == "partial"

    _fake_throughput(monkeypatch, interrupt=False, check=while_running)
    assert cli.main(["throughput", *TINY, "--mode", "fwd", "--no-ceilings", "--no-png", "--out", str(tmp_path)]) == 0
    record = json.loads(final.read_text())
    assert record["status"] == "complete" and record["throughput"][0]["contender"] == "reference"
    assert not partial.exists() and final.with_suffix(".md").exists()


def test_bench_mode_sample_and_sample_command(tmp_path):
    """`bench --mode sample` writes the sampling table; `sample` is reachable from the dit-fast entry point."""
    rc = cli.main(["bench", "--no-parity", "--mode", "sample", "--model", "DiT-S/4", "--depth", "1",
                   "--input-size", "8",
                   "--batch", "1", "--sample-steps", "2", "--iters", "1", "--no-ceilings", "--no-png",
                   "--backend", "torch", "--out", str(tmp_path / "b")])
    assert rc == 0
    (path,) = [p for p in (tmp_path / "b").iterdir() if p.suffix == ".json"]
    rows = json.loads(path.read_text())["sampling"]
    assert {r["contender"] for r in rows} >= {"reference", "dit_fast"}
    assert all(r["error"] is None and r["median_ms"] > 0 for r in rows), rows
    rc = cli.main(["sample", "--model", "DiT-S/4", "--random-init", "--image-size", "64", "--num-steps", "2",
                   "--num-samples", "2", "--vae", "none", "--out", str(tmp_path / "s")])
    assert rc == 0
    assert any(p.suffix == ".npz" for p in (tmp_path / "s").iterdir())


FAMILY = ["--device", "cpu", "--depth", "1", "--warmup", "0", "--iters", "1", "--no-progress", "--no-ceilings",
          "--no-png", "--backend", "torch"]


def test_family_models_throughput_parity_kernels(tmp_path):
    """SiT and LightningDiT through the CLI: throughput rows (training on shared weights, the model named in
    every row), parity against the family's reference, the LightningDiT op table by default."""
    light = ["--model", "LightningDiT-B/1", "--lightning-options", "qknorm,wo_shift,rmsnorm", "--input-size", "4"]
    assert cli.main(["throughput", *FAMILY, *light, "--mode", "fwd,train", "--out", str(tmp_path / "t")]) == 0
    (path,) = [p for p in (tmp_path / "t").iterdir() if p.suffix == ".json"]
    record = json.loads(path.read_text())
    assert record["config"]["options"] == ["qknorm", "rmsnorm", "wo_shift"] and record["config"]["in_channels"] == 32
    assert "cosine" in record["config"]["objective"]
    rows = record["throughput"]
    assert {r["model"] for r in rows} == {"LightningDiT-B/1"} and not [r for r in rows if r.get("error")]
    assert all(r["shared_weights"] and len(r["losses"]) == 1 for r in rows if r["mode"] == "train")
    for model in ("SiT-S/2", "LightningDiT-B/1"):
        size = "4" if model.startswith("Lightning") else "8"
        assert cli.main(["parity", *FAMILY, "--model", model, "--input-size", size, "--parity-dtypes", "fp32",
                         "--out", str(tmp_path / model.replace("/", "-"))]) == 0
    assert cli.main(["kernels", *FAMILY, *light, "--batch", "1", "--rounds", "1", "--no-backward",
                     "--out", str(tmp_path / "k")]) == 0
    (path,) = [p for p in (tmp_path / "k").iterdir() if p.suffix == ".json"]
    ops = {r["op"] for r in json.loads(path.read_text())["kernels"]}
    assert {"adaln_modulate:rms-noshift", "gated_residual_adaln:rms", "swiglu", "qk_norm_rope"} <= ops
