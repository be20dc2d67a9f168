"""Stopping a benchmark: SIGTERM and SIGINT (once or twice) to a real `dit-fast` process keep what was
measured in <name>-partial, never replace an earlier complete result, and exit 143 / 130; a stop request
that library code wraps in an ordinary exception is not swallowed by a per-row handler; a run with
failed rows exits non-zero and is not "complete"."""
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from dit_fast import cli
from dit_fast.bench import stop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--device", "cpu", "--model", "DiT-S/2", "--input-size", "8", "--depth", "1", "--warmup", "0",
        "--no-progress", "--no-ceilings", "--no-png"]


def _today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).date().isoformat()


def _earlier_complete(out, what: str):
    final = out / f"{_today()}-cpu-{what}.json"
    final.write_text(json.dumps({"status": "complete", "marker": "earlier run"}))
    return final, out / f"{_today()}-cpu-{what}-partial.json"


def _rows_in(path, key: str) -> list:
    try:
        return json.loads(path.read_text()).get(key) or []
    except (OSError, ValueError):  # not there yet (written atomically: never half a file)
        return []


def _stop_after_first_rows(argv, out, what, key, signals, timeout=240):
    """Start `dit-fast argv`, wait until its partial file holds a row, send `signals` (0.05 s apart)."""
    final, partial = _earlier_complete(out, what)
    before = final.read_bytes()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "dit_fast", *argv, "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not _rows_in(partial, key):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no row measured in time"
            time.sleep(0.2)
        for s in signals:
            proc.send_signal(s)
            time.sleep(0.05)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert final.read_bytes() == before, "the earlier complete result was replaced"
    record = json.loads(partial.read_text())
    assert record["status"].startswith("incomplete"), record["status"]
    assert record[key] and not any("Stopped" in str(r.get("error")) for r in record[key]), record[key]
    assert "INCOMPLETE" in partial.with_suffix(".md").read_text()
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    return proc.returncode, record, stderr


@pytest.mark.slow
def test_sigterm_during_throughput_rounds_keeps_rows_and_exits_143(tmp_path):
    rc, record, err = _stop_after_first_rows(
        ["throughput", *TINY, "--mode", "fwd", "--backend", "torch", "--iters", "100000"],
        tmp_path, "throughput", "throughput", [signal.SIGTERM])
    assert rc == 143, err[-2000:]
    assert "terminated (SIGTERM)" in record["status"] and "Traceback" not in err


@pytest.mark.slow
def test_sigterm_during_shared_weight_training_rounds_exits_143(tmp_path):
    """LightningDiT training rows, interleaved on one shared model and optimizer: stopped mid-rounds."""
    argv = [a if a != "DiT-S/2" else "LightningDiT-B/1" for a in TINY]
    argv[argv.index("--input-size") + 1] = "4"
    rc, record, err = _stop_after_first_rows(
        ["throughput", *argv, "--mode", "train", "--backend", "torch", "--iters", "100000"],
        tmp_path, "throughput", "throughput", [signal.SIGTERM])
    assert rc == 143, err[-2000:]
    assert record["throughput"][0]["shared_weights"] and "Traceback" not in err


@pytest.mark.slow
def test_sigterm_during_kernels_is_not_swallowed_by_the_per_row_handler(tmp_path):
    rc, record, err = _stop_after_first_rows(
        ["kernels", *TINY, "--op", "gated_residual,adaln_modulate", "--batch", "1", "--iters", "1",
         "--rounds", "100000", "--no-backward"],
        tmp_path, "kernels", "kernels", [signal.SIGTERM])
    assert rc == 143, err[-2000:]


@pytest.mark.slow
def test_two_ctrl_c_keep_rows_and_exit_130(tmp_path):
    rc, record, err = _stop_after_first_rows(
        ["throughput", *TINY, "--mode", "fwd", "--backend", "torch", "--iters", "100000"],
        tmp_path, "throughput", "throughput", [signal.SIGINT, signal.SIGINT])
    assert rc == 130, err[-2000:]
    assert "Ctrl-C" in record["status"]


def test_a_stop_wrapped_in_an_exception_still_stops_the_run(tmp_path, monkeypatch):
    """torch.compile turns whatever its compiler raised into BackendCompilerFailed (an Exception): the
    per-row handler of run_rounds must re-raise the stop, and the run must not write the complete name."""
    import dit_fast.bench.throughput as tp
    from dit_fast.bench.rounds import run_rounds

    final, partial = _earlier_complete(tmp_path, "throughput")
    before = final.read_bytes()
    calls, others = [], []

    def wrapping_sampler():
        calls.append(1)
        if len(calls) == 1:
            return 1.0
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises stop.Stopped in here
        except BaseException as e:  # what library code may do
            raise RuntimeError("BackendCompilerFailed: wrapped") from e
        return 2.0

    def fake(shape, *, on_update=None, **kwargs):
        times, errors = run_rounds({"reference": wrapping_sampler, "other": lambda: others.append(1) or 1.0}, 100,
                                   on_round=lambda r, t, e: on_update([{"contender": "reference", "mode": "fwd",
                                                                         "batch": 2, "ms_per_iter": 1.0}]))
        return []

    monkeypatch.setattr(tp, "run_throughput", fake)
    rc = cli.main(["throughput", *TINY, "--mode", "fwd", "--out", str(tmp_path)])
    assert rc == 143 and len(calls) == 2
    assert len(others) <= 2  # the rounds stopped at the wrapped signal, not after all 100
    assert final.read_bytes() == before
    assert json.loads(partial.read_text())["status"].startswith("incomplete: terminated")
    assert signal.getsignal(signal.SIGTERM) is not stop._handler  # the CLI put the previous handler back


def test_failed_rows_exit_nonzero_and_are_not_complete(tmp_path, monkeypatch, capsys):
    import dit_fast.bench.throughput as tp

    def fake(shape, *, on_update=None, **kwargs):
        rows = [{"contender": "reference", "mode": "fwd", "batch": 2, "ms_per_iter": 5.0},
                {"contender": "dit_fast[torch]", "mode": "fwd", "batch": 2,
                 "error": "ImportError: flash_attn_3 is not installed"}]
        on_update(rows)
        return rows

    monkeypatch.setattr(tp, "run_throughput", fake)
    rc = cli.main(["throughput", *TINY, "--mode", "fwd", "--out", str(tmp_path)])
    assert rc == 1
    record = json.loads((tmp_path / f"{_today()}-cpu-throughput.json").read_text())
    assert record["status"] == "finished with 1 failed rows"
    assert "dit_fast[torch]: ImportError" in capsys.readouterr().err


def test_an_uninstalled_attention_backend_fails_the_run(tmp_path):
    """The issue's case: every dit_fast row errors (flash-attn 3 is not installed here): exit 1."""
    import torch

    from dit_fast.attention import _cannot_run

    if not _cannot_run("flash_attn_3", "cpu", torch.float32, 64, for_auto=False):
        pytest.skip("flash_attn_3 runs here")
    rc = cli.main(["throughput", *TINY, "--mode", "fwd", "--iters", "1", "--backend", "torch",
                   "--attn", "flash_attn_3", "--out", str(tmp_path)])
    assert rc == 1
    record = json.loads((tmp_path / f"{_today()}-cpu-throughput.json").read_text())
    assert record["status"] != "complete"
    assert any(r.get("error") for r in record["throughput"] if r["contender"].startswith("dit_fast"))


@pytest.mark.parametrize("command, extra, flag, words", [
    ("throughput", ["--mode", "cfg", "--batch", "1"], "--batch", "even batch"),
    ("bench", ["--mode", "fwd,cfg", "--batch", "2,3"], "--batch", "got 3"),
    ("throughput", ["--contender", "reference,bogus"], "--contender", "'bogus'"),
    ("throughput", ["--contender", "reference+compile"], "--contender", "reference+compile"),
    ("throughput", ["--mode", "train", "--max-batch"], "--max-batch", "CUDA"),
    ("kernels", ["--backend", "triton"], "--backend", "interpreter"),
    ("profile", ["--backend", "triton"], "--backend", "triton"),
    ("throughput", ["--backend", "torch,triton"], "--backend", "triton"),
])
def test_runs_that_cannot_succeed_are_refused_up_front(command, extra, flag, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, *TINY, "--out", str(tmp_path), *extra])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert f"argument {flag}" in err and "expected" in err and words in err, err
    assert os.listdir(tmp_path) == []


def test_no_benchmark_path_catches_base_exception():
    """Signals are BaseExceptions: no handler in the benchmark or CLI code may take them (bare except,
    except BaseException), except re-raising ones."""
    paths = [os.path.join(ROOT, "dit_fast", "cli.py")]
    bench = os.path.join(ROOT, "dit_fast", "bench")
    paths += [os.path.join(bench, f) for f in sorted(os.listdir(bench)) if f.endswith(".py")]
    offenders = []
    for path in paths:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if re.search(r"except\s*:|except\s+\(?[^)]*\bBaseException\b", line):
                    offenders.append(f"{os.path.relpath(path, ROOT)}:{n}: {line.strip()}")
    assert not offenders, offenders
    assert issubclass(stop.Stopped, BaseException) and not issubclass(stop.Stopped, Exception)
    assert stop.exit_code(signal.SIGINT) == 130 and stop.exit_code(signal.SIGTERM) == 143
