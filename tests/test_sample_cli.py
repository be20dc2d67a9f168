"""`dit-fast sample` (dit_fast.sample_cli) end to end with a tiny DiT and a small random AutoencoderKL."""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest

from dit_fast import sample_cli

diffusers = pytest.importorskip("diffusers")


def parse(*argv):
    p = argparse.ArgumentParser()
    sample_cli.add_arguments(p)
    return p.parse_args(list(argv))


def tiny_args(out, vae, *extra):
    return parse("--model", "DiT-S/2", "--random-init", "--depth", "1", "--hidden-size", "32", "--num-heads", "2",
                 "--image-size", "32", "--num-classes", "10", "--num-steps", "3", "--vae", vae, "--out", str(out),
                 "--no-progress", *extra)


def test_writes_grid_and_fid_npz(tmp_path, vae_dir):
    args = tiny_args(tmp_path, vae_dir, "--class-labels", "1,2,3", "--num-samples", "5", "--batch-size", "2")
    assert sample_cli.run(args) == 0
    with np.load(tmp_path / "samples.npz") as z:
        arr, labels = z["arr_0"], z["labels"]
    assert arr.dtype == np.uint8 and arr.shape == (5, 32, 32, 3)
    assert labels.tolist() == [1, 2, 3, 1, 2]
    assert arr.std() > 0
    from PIL import Image

    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (3 * 34 + 2, 2 * 34 + 2)
    assert sorted(os.listdir(tmp_path / "shards")) == [f"batch_{j:06d}.npz" for j in range(3)]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_resume_skips_done_batches_and_is_deterministic(tmp_path, vae_dir):
    args = tiny_args(tmp_path, "none", "--num-samples", "4", "--batch-size", "2", "--class-labels", "0,9")
    sample_cli.run(args)
    with np.load(tmp_path / "latents.npz") as z:
        first = z["arr_0"].copy()
    assert first.dtype == np.float32 and first.shape == (4, 4, 4, 4)
    shard0 = tmp_path / "shards" / "batch_000000.npz"
    shard1 = tmp_path / "shards" / "batch_000001.npz"
    os.utime(shard0, (1, 1))  # mark: a rerun must not rewrite a finished batch
    shard1.unlink()
    sample_cli.run(args)
    assert os.stat(shard0).st_mtime == 1
    with np.load(tmp_path / "latents.npz") as z:
        assert np.array_equal(z["arr_0"], first)
    # other settings into the same directory are refused
    with pytest.raises(SystemExit, match="other settings.*seed"):
        sample_cli.run(tiny_args(tmp_path, "none", "--num-samples", "4", "--batch-size", "2",
                                 "--class-labels", "0,9", "--seed", "1"))
    assert json.loads((tmp_path / "run.json").read_text())["seed"] == 0


def test_ranks_split_batches_and_match_single_process(tmp_path, monkeypatch):
    single = tmp_path / "single"
    sample_cli.run(tiny_args(single, "none", "--num-samples", "5", "--batch-size", "2"))
    sharded = tmp_path / "sharded"
    # Two ranks, one after the other (no process group: barriers are no-ops), rank 1 first so that
    # rank 0 finds every batch when it merges.
    for rank in (1, 0):
        monkeypatch.setattr(sample_cli, "_dist", lambda r=rank: (r, 2, None))
        monkeypatch.setattr(sample_cli, "_barrier", lambda world: None)
        sample_cli.run(tiny_args(sharded, "none", "--num-samples", "5", "--batch-size", "2"))
        if rank == 1:
            assert sorted(os.listdir(sharded / "shards")) == ["batch_000001.npz"]
    with np.load(single / "latents.npz") as a, np.load(sharded / "latents.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
        assert b["labels"].min() >= 0 and b["labels"].max() < 10


def test_missing_vae_and_bad_labels_are_explained(tmp_path):
    with pytest.raises(SystemExit, match="--vae.*without downloading"):
        sample_cli.run(tiny_args(tmp_path / "a", str(tmp_path / "no-such-vae")))
    with pytest.raises(SystemExit, match="class-labels must lie in \\[0, 9\\]"):
        sample_cli.run(tiny_args(tmp_path / "b", "none", "--class-labels", "3,10"))
    with pytest.raises(SystemExit):
        parse("--out", "x")  # --ckpt or --random-init is required
    with pytest.raises(SystemExit):
        parse("--random-init", "--out", "x", "--class-labels", "a,b")


def test_image_grid_layout():
    imgs = np.stack([np.full((2, 3, 3), i, dtype=np.uint8) for i in range(1, 6)])
    g = sample_cli.image_grid(imgs, cols=2)
    assert g.shape == (3 * 4 + 2, 2 * 5 + 2, 3)
    assert g[2, 2, 0] == 1 and g[2, 7, 0] == 2 and g[6, 2, 0] == 3 and g[10, 2, 0] == 5 and g[10, 7, 0] == 0
