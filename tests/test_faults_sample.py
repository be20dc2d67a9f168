"""Faults of `dit-fast sample` runs (issue 19): a resume after the checkpoint was replaced, shards that do
not hold their batch (truncated, too few rows, another run's, corrupt inside), non-finite guidance or eta,
bad sizes, a checkpoint of another config, and a failed start that must not record a run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import zipfile

import numpy as np
import pytest
import torch

from dit_fast import sample_cli
from dit_fast.checkpoint import save_checkpoint
from dit_fast.sampling import sample

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--model", "DiT-S/2", "--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--image-size", "32",
        "--num-classes", "10", "--num-steps", "2", "--no-progress", "--vae", "none"]
RUN = ["--num-samples", "6", "--batch-size", "2"]


def parse(*argv):
    p = argparse.ArgumentParser()
    sample_cli.add_arguments(p)
    return p.parse_args(list(argv))


def run(out, *extra):
    return sample_cli.run(parse(*TINY, "--out", str(out), *extra))


def _weights(path, seed):
    """A tiny DiT's weights (the sampler's own model, random init with `seed`) saved at `path`."""
    model = sample_cli.build_model(parse(*TINY, "--random-init", "--out", "unused", "--seed", str(seed)), 4, "cpu")
    save_checkpoint(model, path)


def _latents(out):
    with np.load(out / "latents.npz") as z:
        return z["arr_0"].copy(), z["labels"].copy()


def _shard(out, j):
    return out / "shards" / f"batch_{j:06d}.npz"


# -- item 1: the checkpoint changed between the killed run and its resume --------------------------


def test_a_resume_refuses_a_checkpoint_whose_weights_changed(tmp_path, capsys):
    ckpt = tmp_path / "last.pt"
    _weights(ckpt, seed=1)
    out = tmp_path / "out"
    run(out, "--ckpt", str(ckpt), *RUN)
    first, _ = _latents(out)
    record = json.loads((out / "run.json").read_text())
    assert record["ckpt_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest(), "the content is recorded"
    # The state a kill after one shard leaves; then training goes on and replaces the checkpoint.
    for j in (1, 2):
        _shard(out, j).unlink()
    (out / "latents.npz").unlink()
    old_sha = record["ckpt_sha256"]
    _weights(ckpt, seed=2)
    new_sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    with pytest.raises(SystemExit) as e:
        run(out, "--ckpt", str(ckpt), *RUN)
    msg = str(e.value)
    assert "the checkpoint was replaced since" in msg and old_sha[:16] in msg and new_sha[:16] in msg
    assert "use a fresh --out" in msg
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["batch_000000.npz"], "nothing mixed in"
    assert not (out / "latents.npz").exists()
    # A fresh --out samples with the new weights; the same weights saved again (new mtime, same bytes) resume.
    assert run(tmp_path / "fresh", "--ckpt", str(ckpt), *RUN) == 0
    _weights(ckpt, seed=1)
    assert run(out, "--ckpt", str(ckpt), *RUN) == 0
    again, _ = _latents(out)
    np.testing.assert_array_equal(again, first)


# -- items 6 and 12: shards that do not hold their batch -------------------------------------------


def test_a_shard_that_does_not_hold_its_batch_is_sampled_again(tmp_path, capsys):
    out = tmp_path / "out"
    run(out, "--random-init", *RUN)
    want, want_labels = _latents(out)
    assert want.shape == (6, 4, 4, 4)
    # batch 0: a valid 1-row shard of this very run where 2 rows belong
    with np.load(_shard(out, 0)) as z:
        one_row = {k: z[k] for k in z.files}
    one_row["arr_0"], one_row["labels"] = one_row["arr_0"][:1], one_row["labels"][:1]
    np.savez(_shard(out, 0), **one_row)
    # batch 1: truncated by a kill before saves were atomic (or a copy)
    data = _shard(out, 1).read_bytes()
    _shard(out, 1).write_bytes(data[: len(data) // 2])
    # batch 2: another run's shard (another seed) copied in
    other = tmp_path / "other"
    run(other, "--random-init", *RUN, "--seed", "5")
    _shard(out, 2).write_bytes(_shard(other, 2).read_bytes())
    (out / "latents.npz").unlink()
    capsys.readouterr()

    assert run(out, "--random-init", *RUN) == 0
    said = capsys.readouterr().out
    want_said = "holds float32 [1, 4, 4, 4], expected float32 [2, 4, 4, 4]; sampling batch 0 again"
    assert f"{_shard(out, 0)}: {want_said}" in said
    assert f"{_shard(out, 1)}: unreadable (truncated or corrupt?): BadZipFile" in said
    assert f"{_shard(out, 2)}: belongs to another run" in said
    got, got_labels = _latents(out)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_labels, want_labels)


def test_a_shard_corrupt_inside_is_refused_at_the_merge_by_name_and_resampled_next_time(tmp_path):
    # 16x16 latents: a shard's samples (8 KiB) go past the first read of the start's header check, so a
    # flipped bit at their end is seen only when the merge reads them in full.
    big = [*RUN, "--image-size", "128"]
    out = tmp_path / "out"
    run(out, "--random-init", *big)
    want, _ = _latents(out)
    path = _shard(out, 1)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("arr_0.npy")
    raw = bytearray(path.read_bytes())
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26: info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28: info.header_offset + 30], "little")
    data_start = info.header_offset + 30 + name_len + extra_len
    raw[data_start + info.file_size - 4] ^= 0xFF  # a flipped bit in the last latent value: the zip stays readable
    path.write_bytes(bytes(raw))
    (out / "latents.npz").unlink()
    with pytest.raises(SystemExit, match=rf"{path}: unreadable \(truncated or corrupt\?\): BadZipFile.*CRC.*"
                                         r"removed it, rerun to sample batch 1 again"):
        run(out, "--random-init", *big)
    assert not path.exists() and not (out / "latents.npz").exists()
    assert run(out, "--random-init", *big) == 0
    np.testing.assert_array_equal(_latents(out)[0], want)


# -- item 7: guidance scale and eta ----------------------------------------------------------------


@pytest.mark.parametrize(("flag", "value", "want"), [
    ("--cfg-scale", "inf", "expected a finite number, got inf"),
    ("--cfg-scale", "nan", "expected a finite number, got nan"),
    ("--eta", "nan", "expected a finite number >= 0, got nan"),
    ("--eta", "-5", "expected a finite number >= 0, got -5"),
    ("--image-size", "0", "expected a positive integer, got 0"),
])
def test_non_finite_guidance_eta_and_sizes_are_refused_by_the_cli(capsys, flag, value, want):
    with pytest.raises(SystemExit):
        parse(*TINY, "--random-init", "--out", "x", f"{flag}={value}")
    assert f"argument {flag}: {want}" in capsys.readouterr().err


def test_non_finite_guidance_and_eta_are_refused_by_sample():
    model = sample_cli.build_model(parse(*TINY, "--random-init", "--out", "unused"), 4, "cpu")
    for kwargs, want in [(dict(cfg_scale=float("inf")), "cfg_scale must be a finite number, got inf"),
                         (dict(cfg_scale=float("nan")), "cfg_scale must be a finite number, got nan"),
                         (dict(sampler="ddim", eta=float("nan")), "eta must be a finite number >= 0, got nan"),
                         (dict(sampler="ddim", eta=-5.0), "eta must be a finite number >= 0, got -5.0"),
                         (dict(cfg_scale=True), "cfg_scale must be a finite number, got True")]:
        with pytest.raises(ValueError, match=want):
            sample(model, [1], num_steps=2, **kwargs)
    z = sample(model, [1], num_steps=2, cfg_scale=np.float32(4.0), sampler="ddim", eta=0.5)
    assert torch.isfinite(z).all()


# -- item 16: a checkpoint of another config -------------------------------------------------------


def test_a_checkpoint_of_another_config_names_the_differing_dimension(tmp_path):
    wider = tmp_path / "wide.pt"
    model = sample_cli.build_model(parse(*TINY, "--random-init", "--out", "x", "--hidden-size", "64"), 4, "cpu")
    save_checkpoint(model, wider)
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "out", "--ckpt", str(wider), *RUN)
    msg = str(e.value)
    assert msg.startswith(f"--ckpt {wider} does not fit --model DiT-S/2")
    hint = msg.split("hint: ", 1)[1]
    assert "hidden size: checkpoint 64, model 32" in hint and "input_size" not in hint
    assert not (tmp_path / "out" / "run.json").exists()
    with pytest.raises(SystemExit, match=r"--ckpt: .*is empty \(0 bytes\)"):
        (tmp_path / "empty.pt").write_bytes(b"")
        run(tmp_path / "out", "--ckpt", str(tmp_path / "empty.pt"), *RUN)
    with pytest.raises(SystemExit, match=r"--ckpt: .*no such file"):
        run(tmp_path / "out", "--ckpt", str(tmp_path / "missing.pt"), *RUN)


# -- item 18: a failed start records no run ---------------------------------------------------------


def test_a_failed_start_writes_no_run_record_and_the_corrected_rerun_goes_ahead(tmp_path, vae_dir):
    out = tmp_path / "out"
    args = ["--random-init", "--num-samples", "2", "--batch-size", "2", "--grid-size", "0"]
    with pytest.raises(SystemExit, match="--vae.*without downloading"):
        sample_cli.run(parse(*TINY, "--out", str(out), *args, "--vae", str(tmp_path / "vea-typo")))
    assert not (out / "run.json").exists()
    assert sample_cli.run(parse(*TINY, "--out", str(out), *args, "--vae", vae_dir)) == 0
    assert json.loads((out / "run.json").read_text())["vae"] == vae_dir
    with np.load(out / "samples.npz") as z:
        assert z["arr_0"].shape == (2, 32, 32, 3) and z["arr_0"].dtype == np.uint8


# -- item 17: temporaries a killed sampler left ------------------------------------------------------


def test_the_next_run_removes_temporaries_of_a_dead_writer(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    from dit_fast.atomic import _temp_tag

    stale = out / "shards" / f".batch_000001.npz.k3j2h1{_temp_tag(child.pid)}"
    stale.write_bytes(b"half")
    live = out / "shards" / f".batch_000002.npz.a1b2c3{_temp_tag(os.getppid())}"  # pytest's parent: alive
    live.write_bytes(b"being written")
    run(out, "--random-init", *RUN)
    assert not stale.exists() and live.exists()
