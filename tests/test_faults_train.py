"""Faults of benchmarks/train.py runs (issue 19): concurrent runs sharing a --results-dir, --resume with
checkpoints of another config, shards saved with requires_grad, temporaries left by a save killed with
SIGKILL; and `python -m dit_fast.info` with an invalid DIT_FAST_BACKEND.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from train_script_runs import ROOT, TRAIN_SCRIPT, load_saved, load_train_script, tiny_train_argv

TINY = tiny_train_argv("DiT-S/2")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def train():
    return load_train_script("dit_fast_train_faults")


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


# -- item 2: concurrent runs -----------------------------------------------------------------------


@pytest.mark.slow
def test_concurrent_runs_with_one_results_dir_each_get_their_own_experiment_directory(tmp_path):
    results = tmp_path / "results"
    procs = [
        subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *TINY, "--results-dir", str(results),
                          "--max-steps", "2", "--ckpt-every", "1", "--seed", str(seed)],
                         cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for seed in (1, 2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err
    dirs = sorted(p.name for p in results.iterdir())
    assert dirs == ["000-DiT-S-2", "001-DiT-S-2"]
    seeds = set()
    for d in dirs:
        ckpts = results / d / "checkpoints"
        assert sorted(p.name for p in ckpts.iterdir()) == ["0000001.pt", "0000002.pt"]
        last = load_saved(ckpts / "0000002.pt")
        assert last["step"] == 2
        seeds.add(last["args"]["seed"])
        assert load_saved(ckpts / "0000001.pt")["args"]["seed"] == last["args"]["seed"], "one run per directory"
    assert seeds == {1, 2}
    for out, _ in outputs:
        assert "experiment directory: " in out


def test_racing_runs_never_share_an_experiment_directory(tmp_path, train):
    made, barrier = [], threading.Barrier(8)

    def start():
        barrier.wait()
        made.append(train.create_experiment_dir(tmp_path, "DiT-XL/2"))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p.name for p in made) == [f"{i:03d}-DiT-XL-2" for i in range(8)]
    (tmp_path / "042-DiT-B-4").mkdir()  # numbering continues after the highest index, whatever the model
    assert train.create_experiment_dir(tmp_path, "DiT-XL/2").name == "043-DiT-XL-2"


# -- item 11: resuming with checkpoints of another config ------------------------------------------


def test_resume_skips_checkpoints_of_another_config_and_names_the_dimension(tmp_path, train, capsys):
    results = tmp_path / "results"
    good = train.main(TINY + ["--results-dir", str(results), "--max-steps", "1"])  # 000: hidden size 64
    narrow = TINY + ["--hidden-size", "32"]
    other = train.main(narrow + ["--results-dir", str(results), "--max-steps", "2"])  # 001: newer, hidden size 32
    capsys.readouterr()
    resumed = train.main(TINY + ["--results-dir", str(results), "--max-steps", "2", "--resume", "auto"])
    said = capsys.readouterr().out
    assert f"--resume: skipping {other['checkpoint']}: " in said
    assert "weights of another model config" in said and "hidden size: checkpoint 32, model 64" in said
    assert f"resuming from {good['checkpoint']} (step 1)" in said
    assert resumed["step"] == 2 and len(resumed["losses"]) == 1
    assert resumed["experiment_dir"] == str(results / "002-DiT-S-2")
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--results-dir", str(results), "--max-steps", "3", "--resume", other["checkpoint"]])
    msg = str(e.value)
    assert msg.startswith(f"--resume: {other['checkpoint']!r} holds 'model' weights of another model config")
    assert "hidden size: checkpoint 32, model 64" in msg


# -- item 15: a shard saved with requires_grad -----------------------------------------------------


def test_a_shard_saved_with_requires_grad_trains(tmp_path, train):
    data = tmp_path / "latents"
    data.mkdir()
    latents = torch.randn(6, 4, 8, 8, requires_grad=True) * 1.0  # a non-leaf that requires grad, as from a model
    torch.save({"latents": latents, "labels": torch.arange(6) % 10}, data / "a.pt")
    result = train.main(TINY + ["--data", str(data), "--max-steps", "2", "--results-dir", str(tmp_path / "r")])
    assert result["step"] == 2 and all(map(torch.isfinite, map(torch.tensor, result["losses"])))


# -- item 17: a save killed with SIGKILL -----------------------------------------------------------

KILLED_SAVE = textwrap.dedent("""
    import importlib.util, sys, time, torch
    spec = importlib.util.spec_from_file_location("train", sys.argv[1])
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    real_save, calls = torch.save, [0]
    def save(obj, f, *args, **kwargs):  # the 2nd checkpoint: half written, then the process hangs until killed
        calls[0] += 1
        if calls[0] == 2:
            f.write(b"PK\\x03\\x04 half a checkpoint" * 1000)
            f.flush()
            print("saving", flush=True)
            time.sleep(120)
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
    train.main(sys.argv[2:])
""")


def test_temporaries_of_a_sigkilled_save_are_removed_at_the_next_start(tmp_path, train, capsys):
    results = tmp_path / "results"
    args = TINY + ["--results-dir", str(results), "--max-steps", "3", "--ckpt-every", "1"]
    child = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(TRAIN_SCRIPT), *args],
                             cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        for line in child.stdout:
            if line.strip() == "saving":
                break
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=60)
    ckpts = results / "000-DiT-S-2" / "checkpoints"
    [temp] = [p for p in ckpts.iterdir() if p.name.endswith(".tmp")]
    assert temp.name.startswith(".0000002.pt.") and f"-{child.pid}.tmp" in temp.name
    capsys.readouterr()
    resumed = train.main(args + ["--resume", "auto"])
    assert f"removed {temp}, left by a save that was killed" in capsys.readouterr().out
    assert sorted(p.name for p in ckpts.iterdir()) == ["0000001.pt"], "the complete checkpoint stays"
    assert resumed["step"] == 3 and len(resumed["losses"]) == 2, "resumed from the last complete checkpoint"


# -- item 20: dit_fast.info and DIT_FAST_BACKEND ---------------------------------------------------


def test_info_refuses_an_invalid_backend_variable():
    proc = subprocess.run([sys.executable, "-m", "dit_fast.info"], capture_output=True, text=True, cwd=ROOT,
                          env={**_env(), "DIT_FAST_BACKEND": "bogus"}, timeout=300)
    assert proc.returncode == 2
    assert "DIT_FAST_BACKEND must be one of ('auto', 'triton', 'ext', 'torch'), got 'bogus'" in proc.stderr
    assert proc.stdout == ""
