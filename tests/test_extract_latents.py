"""benchmarks/extract_latents.py: image folder -> latent shards that train.py reads."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
Image = pytest.importorskip("PIL.Image")

_spec = importlib.util.spec_from_file_location(
    "extract_latents", Path(__file__).resolve().parents[1] / "benchmarks" / "extract_latents.py")
extract_latents = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(extract_latents)


def _folder(root: Path) -> list[tuple[Path, int]]:
    rng = np.random.default_rng()
    sizes = [(40, 32), (32, 90), (70, 70), (33, 50), (128, 64)]
    items = []
    for label, name in enumerate(["b_dog", "a_cat"]):  # labels follow sorted names: a_cat=0, b_dog=1
        (root / name).mkdir(parents=True)
        for k, (w, h) in enumerate(sizes[label::2] + [(32, 32)]):
            p = root / name / f"img{k}.png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
            items.append((p, 1 - label))
    (root / "a_cat" / "notes.txt").write_text("not an image")
    return items


def test_center_crop_is_adm():
    # an image of exactly the size is unchanged
    a = np.random.default_rng().integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(extract_latents.center_crop_arr(Image.fromarray(a), 32), a)
    # 4x the size, constant on 4x4 blocks: two box halvings are exact, then no resize is needed
    small = np.random.default_rng().integers(0, 256, (16, 16, 3), dtype=np.uint8)
    big = small.repeat(4, 0).repeat(4, 1)
    got = extract_latents.center_crop_arr(Image.fromarray(big), 16)
    assert np.array_equal(got, small)
    # wide image: short side to the size, then the middle columns
    wide = np.zeros((32, 96, 3), dtype=np.uint8)
    wide[:, 32:64] = 255
    got = extract_latents.center_crop_arr(Image.fromarray(wide), 32)
    assert got.shape == (32, 32, 3) and got.min() == 255


def test_extract_shards_match_manual_pipeline(tmp_path, vae_dir):
    data, out = tmp_path / "data", tmp_path / "out"
    _folder(data)
    args = extract_latents.parse_args(["--data", str(data), "--out", str(out), "--vae", vae_dir, "--image-size", "32",
                                       "--batch-size", "2", "--shard-size", "4", "--seed", "7", "--no-progress"])
    assert extract_latents.extract(args) == 0
    shards = sorted(out.glob("*.pt"))
    assert [p.name for p in shards] == ["latents_r00_00000.pt", "latents_r00_00001.pt"]
    loaded = [torch.load(p, weights_only=True) for p in shards]
    lat = torch.cat([d["latents"] for d in loaded])
    lab = torch.cat([d["labels"] for d in loaded])
    assert lat.dtype == torch.float32 and lat.shape == (7, 4, 4, 4) and lab.dtype == torch.int64
    assert json.loads((out / "classes.json").read_text()) == ["a_cat", "b_dog"]

    # the same pipeline written out by hand
    items, _ = extract_latents.list_images(data)
    assert [lbl for _, lbl in items] == [0, 0, 0, 1, 1, 1, 1]  # a_cat has 3 images, b_dog 4
    assert lab.tolist() == [0, 0, 0, 1, 1, 1, 1]
    vae = diffusers.AutoencoderKL.from_pretrained(vae_dir).eval()
    flips = torch.rand(7, generator=torch.Generator().manual_seed(7)) < 0.5
    gen = torch.Generator().manual_seed(7 * 1000)
    want = []
    with torch.no_grad():
        for s in range(0, 7, 2):
            xs = []
            for i in range(s, min(s + 2, 7)):
                with Image.open(items[i][0]) as im:
                    arr = extract_latents.center_crop_arr(im.convert("RGB"), 32)
                if flips[i]:
                    arr = arr[:, ::-1]
                xs.append(torch.tensor(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1)
            want.append(vae.encode(torch.stack(xs)).latent_dist.sample(generator=gen) * 0.18215)
    assert torch.allclose(lat, torch.cat(want), rtol=1e-5, atol=1e-6)
    # the flip matters: unflipped encodings differ for the flipped images
    assert flips.any() and not flips.all()


def test_train_reads_the_shards(tmp_path, vae_dir):
    data, out = tmp_path / "data", tmp_path / "out"
    _folder(data)
    extract_latents.extract(extract_latents.parse_args(
        ["--data", str(data), "--out", str(out), "--vae", vae_dir, "--image-size", "32", "--no-progress"]))
    try:
        from dit_fast.data import LatentShards
    except ImportError:
        pytest.skip("dit_fast.data is not available")
    shards = LatentShards(out, num_classes=2, latent_shape=(4, 4, 4))
    assert len(shards) == 7


def test_bad_inputs(tmp_path, vae_dir):
    with pytest.raises(SystemExit, match="--data"):
        extract_latents.list_images(tmp_path / "missing")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(SystemExit, match="no images"):
        extract_latents.list_images(tmp_path / "empty")
    with pytest.raises(SystemExit):
        extract_latents.parse_args(["--data", "x", "--out", "y", "--batch-size", "0"])
