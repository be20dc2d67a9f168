"""benchmarks/gpu_check.sh on the CPU: every stage's real command path (dry run), and stages cut by their
limits keeping every row they measured in summary.md; the summary writer on its own."""
import json
import os
import re
import stat
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
MEASURING = ("train", "train_lightning", "fwd_cfg", "sampling", "kernels", "parity", "profile")


def _run(outdir, timeout, **env):
    full = dict(os.environ, **{"PYTHON": sys.executable, "DIT_FAST_DRY_RUN": "1", **env})
    return subprocess.run(["bash", SCRIPT, str(outdir)], env=full, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """Every stage on the CPU with a tiny model: ok, summary with every section, merged results, details."""
    proc = _run(tmp_path, 600)
    summary = (tmp_path / "summary.md").read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    for stage in ("install", "info", *MEASURING, "roofline", "gpu_tests", "report"):
        assert f"| {stage} | ok |" in summary, summary
    assert "| max_batch | skipped (needs CUDA) |" in summary
    stage_order = [m.group(1) for m in re.finditer(r"^\| (\w+) \|", summary.split("\n\n")[1], re.M)]
    assert stage_order[1:12] == ["install", "info", *MEASURING, "max_batch", "roofline"], stage_order
    for title in ("Throughput", "Sampling", "Kernels", "Parity", "Profile", "Roofline (PREDICTED"):
        assert f"## {title}" in summary, title
    assert "| train | reference | 2 |" in summary and "| train | reference-math | 2 |" in summary
    assert "| train | dit_fast[torch] | 2 | LightningDiT-B/1 |" in summary  # the LightningDiT training stage
    assert "| cfg | dit_fast[torch] | 2 |" in summary and "| train | dit_fast | " in summary  # predicted beside
    (roofline_name,) = [p for p in os.listdir(tmp_path) if p.endswith("-predicted-roofline.json")]
    (json_name,) = [p for p in os.listdir(tmp_path) if p.endswith(".json") and p != roofline_name]
    record = json.loads((tmp_path / json_name).read_text())
    assert {"parity", "throughput", "sampling", "kernels", "profile"} <= {k for k in record if record[k]}
    assert {r["mode"] for r in record["throughput"]} == {"train", "fwd", "cfg"}
    assert record["kernels"][0]["fwd_bytes"] > 0
    assert any(p["ranges"] for p in record["profile"]), "no block ranges recorded"
    # A stage catches a contender's exception and records it as a row: such rows must not pass silently.
    for section in ("throughput", "sampling", "kernels", "profile"):
        errors = [row["error"] for row in record[section] if row.get("error")]
        assert not errors, f"{section}: {errors}"
    assert (tmp_path / "details.tar.gz").stat().st_size > 0
    assert not (tmp_path / "details").exists()


# A python that runs `-m dit_fast ...` with every measuring engine replaced by a fake that measures one
# row every 0.2 s and never finishes (profile: one row, then hangs), and anything else as the real python.
FAKE_PYTHON = textwrap.dedent('''\
    import os, sys, time
    args = sys.argv[1:]
    if args[:2] != ["-m", "dit_fast"] or args[2] == "report":
        os.execv(REAL, [REAL, *args])
    import dit_fast.bench.kernels as kn, dit_fast.bench.parity as pa, dit_fast.bench.profile as pr
    import dit_fast.bench.sampling as sp, dit_fast.bench.throughput as tp
    from dit_fast import cli
    stage = os.path.basename(args[args.index("--out") + 1])

    def forever(emit):
        i = 0
        while True:
            emit(f"fake-{stage}-{i}")
            i += 1
            time.sleep(0.2)

    def throughput(shape, *, on_update, **kw):
        rows = []
        forever(lambda name: (rows.append({"contender": name, "mode": "train", "batch": 2, "ms_per_iter": 1.0}),
                              on_update(list(rows))))

    def sampling(shape, *, on_result, **kw):
        forever(lambda name: on_result({"contender": name, "batch": 1, "num_steps": 2, "median_ms": 1.0,
                                        "error": None}))

    def kernels(*, on_result, **kw):
        forever(lambda name: on_result({"op": "gated_residual", "shape": "B=1 L=4 D=8", "backend": name,
                                        "fwd_ms": 1.0}))

    def parity(shape, *, on_row, **kw):
        forever(lambda name: on_row({"backend": name, "dtype": "float32", "quantity": "output", "pass": True}))

    profiled = []

    def profile(contender, reference, shape, **kw):
        if profiled:
            time.sleep(3600)
        profiled.append(1)
        return {"contender": f"fake-{stage}-0", "target": kw["target"], "mode": kw["mode"], "batch": kw["batch"],
                "iters": 1, "kernels": [], "ranges": []}

    tp.run_throughput, sp.run_sampling_bench, kn.run_kernels = throughput, sampling, kernels
    pa.run_parity, pr.profile_model = parity, profile
    sys.exit(cli.main(args[2:]))
''')


@pytest.mark.slow
def test_stages_cut_by_their_limits_keep_every_measured_row(tmp_path):
    fake = tmp_path / "fake_python"
    fake.write_text(f"#!{sys.executable}\nREAL = {sys.executable!r}\n" + FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    out = tmp_path / "out"
    limits = {f"GPU_CHECK_T_{s.upper()}": "12" for s in MEASURING}
    proc = _run(out, 400, PYTHON=str(fake), GPU_CHECK_KEEP="1", GPU_CHECK_SKIP="info,roofline,gpu_tests", **limits)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    measured = {}
    for s in MEASURING:
        assert f"| {s} | TIMEOUT (rows kept) |" in summary, summary
        (partial,) = [p for p in (out / "details" / s).iterdir() if p.name.endswith("-partial.json")]
        record = json.loads(partial.read_text())
        assert record["status"].startswith("incomplete: terminated (SIGTERM)"), record["status"]
        section = {"train": "throughput", "train_lightning": "throughput", "fwd_cfg": "throughput"}.get(s, s)
        names = [r.get("contender") or r.get("backend") for r in record[section]]
        measured[s] = names
        for name in names:  # every row the stage measured before it was cut
            assert f"| {name} |" in summary or f" {name} |" in summary, (name, summary)
        assert f"{s} (partial: incomplete" in summary
    assert sum(1 for names in measured.values() if names) >= 6, measured  # 12 s suffice for a first row
    merged = [p for p in os.listdir(out) if p.endswith(".json")]
    record = json.loads((out / merged[0]).read_text())
    assert record["status"] == "incomplete"
    merged_names = {r.get("contender") or r.get("backend") for k in ("throughput", "sampling", "kernels", "parity",
                                                                      "profile") for r in record.get(k, [])}
    assert {n for names in measured.values() for n in names} <= merged_names


def test_stage_limits_fit_the_budget():
    """Install (and its no-extension retry) + every stage at its default limit + gpu_tests' minimum 10 s fit the
    7-minute budget; the training stages come first after info."""
    with open(SCRIPT) as f:
        text = f.read()
    table = re.search(r'^STAGE_LIMITS="([^"]*)"$', text, re.M).group(1)
    limits = {name.lower(): int(v) for name, v in re.findall(r"(\w+):(\d+)", table)}
    assert {"install", "install_noext", "train", "train_lightning", "max_batch", "report"} <= set(limits), limits
    budget = int(re.search(r"^BUDGET=\$\{GPU_CHECK_BUDGET:-(\d+)\}", text, re.M).group(1))
    assert budget == 420 and sum(limits.values()) + 10 <= budget, (sum(limits.values()), limits)
    stages = re.findall(r"^stage (\w+) ", text, re.M)
    assert stages[stages.index("info"):][:3] == ["info", "train", "train_lightning"], stages


def test_summary_lists_rows_of_complete_and_partial_files_and_test_outcomes(tmp_path):
    det = tmp_path / "details"
    (det / "train").mkdir(parents=True)
    (det / "kernels").mkdir()
    env = {"date": "2026-12-05"}
    (det / "stages.tsv").write_text("install\tok\t70\t85\ntrain\tTIMEOUT (rows kept)\t135\t135\n")
    (det / "train" / "x-throughput-partial.json").write_text(json.dumps({
        "env": env, "status": "partial", "throughput": [
            {"contender": "reference", "mode": "train", "batch": 32, "ms_per_iter": 410.5, "peak_mem_gib": 38.2},
            {"contender": "dit_fast[auto]", "mode": "train", "batch": 32, "error": "OutOfMemoryError: x|y"}]}))
    # a stage that finished after its last checkpoint: its complete file wins over the stale partial
    (det / "kernels" / "k-kernels.json").write_text(json.dumps({
        "env": env, "status": "complete", "kernels": [{"op": "gated_residual", "backend": "triton", "fwd_ms": 0.5}]}))
    (det / "kernels" / "k-kernels-partial.json").write_text(json.dumps({
        "env": env, "status": "partial", "kernels": [{"op": "stale", "backend": "triton"}]}))
    (det / "gpu_tests.log").write_text("tests/test_a.py::test_one PASSED                [ 50%]\n"
                                       "tests/test_a.py::test_two[bf16] FAILED          [100%]\n"
                                       "PASSED tests/test_a.py::test_one\n")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "dit_fast", "bench", "summary.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "summary.md").read_text()
    assert "| train | TIMEOUT (rows kept) | 135 | 135 |" in text
    assert "| train | reference | 32 | 410 |" in text and "38.2" in text and "train (partial: partial)" in text
    assert "OutOfMemoryError: x/y" in text
    assert "| gated_residual |" in text and "stale" not in text
    assert "- PASSED tests/test_a.py::test_one" in text and "- FAILED tests/test_a.py::test_two[bf16]" in text
    assert "1 PASSED, 1 FAILED" in text
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "dit_fast", "bench", "summary.py"), str(tmp_path / "no")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "expected an existing directory" in bad.stderr
