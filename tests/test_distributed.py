"""DDP and FSDP2 over 2 gloo processes train the fast DiT exactly like one process on the global batch."""
import os
import subprocess
import sys
from pathlib import Path

import distributed_worker as worker
import pytest
import torch

from tolerances import rel_err

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 150


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "distributed_worker.py"), "--out", str(out)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s:\n{e.stdout}\n{e.stderr}")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out


@pytest.fixture(scope="module")
def single_process():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = worker.build_model()
        initial = worker.full_state(model)
        losses = worker.train(model, model.parameters())
        return initial, worker.full_state(model), losses
    finally:
        torch.set_num_threads(n)


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_matches_single_process(distributed_results, single_process, mode):
    initial, expected, expected_losses = single_process
    got = torch.load(distributed_results / f"{mode}.pt", weights_only=True)
    params = got["params"]
    assert set(params) == set(expected), f"{mode}: parameter names differ"
    # Compare what training changed (the updates), not the weights, which would hide small updates.
    names = [n for n in expected if not torch.equal(expected[n], initial[n])]
    assert len(names) > 10, "single-process training barely changed the model"
    upd = torch.cat([(params[n] - initial[n]).reshape(-1) for n in names])
    ref = torch.cat([(expected[n] - initial[n]).reshape(-1) for n in names])
    err = rel_err(upd, ref)
    assert err < 1e-5, f"{mode}: parameter updates differ from single-process training by {err:.2e} (relative)"
    for n in expected:
        if n not in names:
            torch.testing.assert_close(params[n], initial[n], rtol=0, atol=0, msg=f"{mode}: {n} changed")
    assert len(got["losses"]) == worker.STEPS
    if mode == "fsdp2":
        assert got["sharded"], "fully_shard left the block parameters unsharded"


@pytest.mark.distributed
def test_train_script_resumes_every_rank_from_one_checkpoint(tmp_path):
    """benchmarks/train.py under torchrun (2 gloo ranks): --resume auto is decided by rank 0 and loaded by
    both ranks (the broadcast and the all-ranks check run for real)."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    root = HERE.parent
    tiny = ["--model", "DiT-S/2", "--depth", "1", "--hidden-size", "64", "--num-heads", "2", "--image-size", "64",
            "--num-classes", "10", "--global-batch-size", "4", "--device", "cpu", "--no-progress",
            "--ckpt-every", "1", "--results-dir", str(tmp_path / "run")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for extra in (["--max-steps", "2"], ["--max-steps", "3", "--resume", "auto"]):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(root / "benchmarks" / "train.py"), *tiny, *extra]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        assert proc.returncode == 0, f"{extra}: torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "(step 2)" in proc.stdout and "resuming from" in proc.stdout, proc.stdout[-2000:]
    # Each run gets its own experiment directory (000: the first run, 001: the resumed one).
    assert torch.load(tmp_path / "run" / "001-DiT-S-2" / "checkpoints" / "0000003.pt", weights_only=True)["step"] == 3
