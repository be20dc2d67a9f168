"""The LightningDiT recipe: dit_fast.sample on a LightningDiT (the published inference.py loop through the
published Sampler API for the same seed), the per-channel latent statistics (dit_fast.data.LatentStats),
benchmarks/train.py --model LightningDiT-* (the published optimizer, transport and latent normalization)
and `dit-fast sample --model LightningDiT-*` (latents de-normalized, or decoded by a local VAE).

The published loop runs dit_fast.transport.Sampler (checked against the official code in
test_transport.py) on dit_fast.reference.LightningDiT (checked bit-exact against the official model).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import dit_fast
from dit_fast import reference
from dit_fast.data import LatentShards, LatentStats, compute_latent_stats
from dit_fast.sampling import LIGHTNINGDIT_SAMPLING, is_flow_model, sample
from dit_fast.testing import randomize_weights_
from dit_fast.transport import Sampler, create_transport
from tolerances import rel_err
from train_script_runs import load_train_script, parse_sample, tiny_train_argv

NUM_CLASSES = 10  # the null label is NUM_CLASSES (inference.py hard-codes 1000 for ImageNet)
C, SIZE = 6, 4  # latent channels and size of the tiny models
XL1_RECIPE = dict(use_swiglu=True, use_rope=True, use_rmsnorm=True, patch_size=1)
SAMPLE_TOL = 1e-4  # the bound for the Euler ODE sampler; measured ~1e-7 here

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_pair(**options):
    ref = reference.LightningDiT(input_size=SIZE, in_channels=C, hidden_size=32, depth=2, num_heads=2,
                                 num_classes=NUM_CLASSES, **(XL1_RECIPE | options))
    randomize_weights_(ref).eval()
    return ref, dit_fast.from_reference(ref, backend="torch").eval()


def published_inference(model, labels, seed, cfg_scale, num_steps, timestep_shift, cfg_interval_start):
    """inference.py's loop: z = randn(n, in_channels, latent, latent), the batch doubled with the null label,
    sample_ode(euler, num_steps, timestep_shift)(z, forward_with_cfg, cfg_interval=True, ...)[-1], first half."""
    torch.manual_seed(seed)
    n = len(labels)
    z = torch.randn(n, model.in_channels, SIZE, SIZE)
    fn = Sampler(create_transport("Linear", "velocity", None, None, None)).sample_ode(
        sampling_method="euler", num_steps=num_steps, atol=1e-6, rtol=1e-3, reverse=False,
        timestep_shift=timestep_shift)
    if cfg_scale <= 1.0:  # using_cfg = cfg_scale > 1.0
        return fn(z, model.forward, y=torch.tensor(labels))[-1]
    z = torch.cat([z, z], 0)
    y = torch.cat([torch.tensor(labels), torch.tensor([NUM_CLASSES] * n)], 0)
    out = fn(z, model.forward_with_cfg, y=y, cfg_scale=cfg_scale, cfg_interval=True,
             cfg_interval_start=cfg_interval_start)[-1]
    return out.chunk(2, dim=0)[0]


@pytest.mark.parametrize("timestep_shift", [0.3, 0.0], ids=["shift0.3", "no-shift"])
def test_sample_equals_the_published_lightning_inference(timestep_shift):
    ref, fast = tiny_pair()
    assert is_flow_model(ref) is True and is_flow_model(fast) is True
    labels, steps = [3, 1, 9], 12
    seed = int(torch.randint(0, 2**31, ()).item())
    want = published_inference(ref, labels, seed, 4.0, steps, timestep_shift, 0.11)
    recipe = LIGHTNINGDIT_SAMPLING | dict(num_steps=steps, timestep_shift=timestep_shift, cfg_scale=4.0)
    for model in (fast, ref):  # the fast model, and any LightningDiT-like module
        torch.manual_seed(seed)
        got = sample(model, labels, backend="torch", **recipe)
        assert got.shape == (3, C, SIZE, SIZE) and torch.isfinite(got).all()
        assert rel_err(got, want) <= SAMPLE_TOL, type(model).__module__
    # Each recipe setting matters (a test that cannot fail is a defect): the interval, the shift, the seed.
    torch.manual_seed(seed)
    without_interval = sample(fast, labels, backend="torch", **(recipe | dict(cfg_interval=None)))
    assert rel_err(without_interval, want) > 1e-3
    other_shift = published_inference(ref, labels, seed, 4.0, steps, 0.5 if timestep_shift else 0.3, 0.11)
    assert rel_err(other_shift, want) > 1e-3
    torch.manual_seed(seed + 1)
    assert rel_err(sample(fast, labels, backend="torch", **recipe), want) > 1e-3
    # cfg_scale <= 1: inference.py samples conditionally on the undoubled batch.
    unguided = published_inference(ref, labels, seed, 1.0, steps, timestep_shift, 0.11)
    torch.manual_seed(seed)
    assert rel_err(sample(fast, labels, backend="torch", **(recipe | dict(cfg_scale=1.0))), unguided) <= SAMPLE_TOL


def test_the_cfg_interval_start_is_lightningdits():
    """cfg_interval=s guides exactly the steps whose t >= s (t from 0, noise, to 1): the published
    forward_with_cfg with a start on a grid time and just above it agree with sample_flow's cfg_interval."""
    ref, fast = tiny_pair(use_qknorm=True, wo_shift=True)
    grid = torch.linspace(0, 1, 6)  # no shift: the ODE evaluates t = 0, 0.2, ..., 0.8
    for start in (float(grid[2]), float(grid[2]) + 1e-6, 0.0):
        seed = int(torch.randint(0, 2**31, ()).item())
        want = published_inference(ref, [4, 7], seed, 5.0, 6, 0.0, start)
        torch.manual_seed(seed)
        got = sample(fast, [4, 7], num_steps=6, cfg_scale=5.0, cfg_interval=start, backend="torch")
        assert rel_err(got, want) <= SAMPLE_TOL, start


@pytest.mark.gpu
def test_sample_on_cuda_graph_equals_eager_and_the_published_loop_gpu():
    ref, _ = tiny_pair()
    ref = ref.cuda()
    fast = dit_fast.from_reference(ref).cuda().eval()  # backend "auto": the Triton kernels
    labels, seed = [3, 1, 9], 1234
    recipe = LIGHTNINGDIT_SAMPLING | dict(num_steps=8, cfg_scale=4.0)
    runs = [sample(fast, labels, cuda_graph=graph, generator=torch.Generator("cuda").manual_seed(seed), **recipe)
            for graph in (False, True)]
    assert torch.isfinite(runs[0]).all() and rel_err(runs[1], runs[0]) <= 1e-5
    torch.cuda.manual_seed(seed)
    z = torch.randn(len(labels), C, SIZE, SIZE, device="cuda")
    fn = Sampler(create_transport("Linear", "velocity")).sample_ode(sampling_method="euler", num_steps=8,
                                                                   timestep_shift=0.3)
    y = torch.tensor(labels + [NUM_CLASSES] * len(labels), device="cuda")
    want = fn(torch.cat([z, z]), ref.forward_with_cfg, y=y, cfg_scale=4.0, cfg_interval=True,
              cfg_interval_start=0.11)[-1][: len(labels)]
    got = sample(fast, labels, noise=z, **recipe)
    assert rel_err(got, want) <= SAMPLE_TOL


def test_the_recipe_defaults():
    assert LIGHTNINGDIT_SAMPLING == {"sampler": "ode", "sampling_method": "euler", "num_steps": 250,
                                     "timestep_shift": 0.3, "cfg_interval": 0.11, "cfg_scale": 10.0,
                                     "cfg_mode": "above_one"}


# ------------------------------------------------------------------------------------------ latent stats
def test_latent_stats_files_and_their_checks(tmp_path):
    mean, std = torch.randn(C), torch.rand(C) + 0.5
    published = tmp_path / "latents_stats.pt"  # the published layout: [1, C, 1, 1] each
    torch.save({"mean": mean.reshape(1, C, 1, 1), "std": std.reshape(1, C, 1, 1)}, published)
    from safetensors.torch import save_file

    flat = tmp_path / "stats.safetensors"
    save_file({"mean": mean, "std": std}, str(flat))
    x = torch.randn(3, C, SIZE, SIZE, dtype=torch.float64)
    for path in (published, flat):
        stats = LatentStats.load(path, channels=C, multiplier=0.5)
        assert torch.equal(stats.mean, mean) and torch.equal(stats.std, std)
        m, s = mean.double().reshape(1, C, 1, 1), std.double().reshape(1, C, 1, 1)
        assert torch.allclose(stats.normalize(x), (x - m) / s * 0.5, rtol=1e-12, atol=0)
        assert torch.allclose(stats.denormalize(x), x * s / 0.5 + m, rtol=1e-12, atol=0)
        assert torch.allclose(stats.denormalize(stats.normalize(x)), x, rtol=1e-10, atol=1e-10)
    saved = tmp_path / "saved.pt"
    LatentStats.load(flat).save(saved)
    assert LatentStats.load(saved).digest() == LatentStats.load(published).digest()
    assert LatentStats.load(published, multiplier=2.0).digest() != LatentStats.load(published).digest()

    with pytest.raises(ValueError, match=r"stats for 6 latent channels, but the model has 32"):
        LatentStats.load(published, channels=32)
    with pytest.raises(FileNotFoundError, match="no such latent stats file"):
        LatentStats.load(tmp_path / "missing.pt")
    bad_cases = {
        "keys": ({"mu": mean, "std": std}, r"expected \{\"mean\": tensor, \"std\": tensor\}"),
        "std0": ({"mean": mean, "std": torch.zeros(C)}, "std > 0 in every channel"),
        "nan": ({"mean": mean * float("nan"), "std": std}, "must be finite"),
        "shape": ({"mean": torch.randn(2, C), "std": std}, r"'mean' must be a float tensor of C values"),
        "count": ({"mean": mean, "std": std[:-1]}, "mean has 6 channels but std has 5"),
    }
    for name, (obj, message) in bad_cases.items():
        torch.save(obj, tmp_path / f"{name}.pt")
        with pytest.raises(ValueError, match=message):
            LatentStats.load(tmp_path / f"{name}.pt", channels=C)
    with pytest.raises(ValueError, match="latents must be"):
        LatentStats.load(published).normalize(torch.randn(2, C + 1, 2, 2))


@pytest.mark.parametrize("chunk_rows", [1024, 3])
def test_compute_latent_stats(tmp_path, monkeypatch, chunk_rows):
    import dit_fast.data

    monkeypatch.setattr(dit_fast.data, "CHECK_CHUNK_ROWS", chunk_rows)  # read in chunks of rows, or all at once
    latents = torch.randn(20, C, 3, 3) * torch.arange(1, C + 1).reshape(1, C, 1, 1) + 2.0
    torch.save({"latents": latents, "labels": torch.zeros(20, dtype=torch.long)}, tmp_path / "a.pt")
    shards = LatentShards(tmp_path, latent_shape=(C, 3, 3), num_classes=1)
    stats = compute_latent_stats(shards)
    assert torch.allclose(stats.mean, latents.double().mean(dim=(0, 2, 3)).float(), atol=1e-6)
    assert torch.allclose(stats.std, latents.double().std(dim=(0, 2, 3)).float(), atol=1e-6)
    sub = compute_latent_stats(shards, max_rows=5, seed=1)
    assert not torch.allclose(sub.mean, stats.mean)  # 5 of the 20 rows


# ------------------------------------------------------------------------------------ benchmarks/train.py
# A one-block LightningDiT-XL/1 of width 64 (head dim 32) on 4x4 latents of the recipe's 32 channels.
TINY_TRAIN = tiny_train_argv("LightningDiT-XL/1")
LATENT = (32, 4, 4)  # VA-VAE f16d32 latents of a 64-pixel image


@pytest.fixture(scope="module")
def train():
    return load_train_script("dit_fast_train_example_lightning")


def _stats_file(path, mean=0.0, std=1.0, channels=32):
    torch.save({"mean": torch.full((1, channels, 1, 1), float(mean)),
                "std": torch.full((1, channels, 1, 1), float(std))}, path)
    return path


def test_the_published_recipe_is_the_default(train):
    args = train.parse_args(TINY_TRAIN)
    assert (args.use_swiglu, args.use_rope, args.use_rmsnorm, args.use_qknorm, args.wo_shift) == (
        True, True, True, False, False)
    assert (args.path_type, args.prediction, args.loss_weight, args.use_cosine_loss, args.use_lognorm) == (
        "Linear", "velocity", None, True, True)
    assert (args.downsample_ratio, args.in_channels, args.max_grad_norm, args.ema_decay) == (16, 32, None, 0.9999)
    full = train.parse_args(["--model", "LightningDiT-XL/1"])
    assert (full.global_batch_size, full.max_steps, full.ckpt_every) == (1024, 80_000, 20_000)
    model = train.build_model(train.parse_args(TINY_TRAIN), "cpu")
    assert isinstance(model, dit_fast.LightningDiT) and model.in_channels == 32 and model.input_size == 4
    assert model.patch_size == 1 and model.use_rope and model.use_rmsnorm and model.blocks[0].mlp.w12 is not None
    off = train.parse_args(TINY_TRAIN + ["--no-use-rope", "--use-qknorm", "--wo-shift", "--no-use-cosine-loss",
                                         "--no-use-lognorm"])
    assert (off.use_rope, off.use_qknorm, off.wo_shift, off.use_cosine_loss, off.use_lognorm) == (
        False, True, True, False, False)
    assert train.build_model(off, "cpu").feat_rope is None
    transport = train.create_objective(args)
    assert transport.use_cosine_loss and transport.use_lognorm and transport.path_type.name == "LINEAR"
    # A DiT keeps its recipe; LightningDiT's model options are refused for it.
    dit = train.parse_args(["--model", "DiT-S/2"])
    assert (dit.global_batch_size, dit.downsample_ratio, dit.in_channels, dit.use_swiglu) == (256, 8, 4, None)
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "SiT-S/2", "--use-swiglu"])
    with pytest.raises(SystemExit):
        train.parse_args(TINY_TRAIN + ["--beta2", "1.0"])
    with pytest.raises(SystemExit):
        train.parse_args(TINY_TRAIN + ["--max-grad-norm", "0"])


def test_train_resumes_as_the_uninterrupted_run_with_the_published_optimizer(tmp_path, train):
    stats = _stats_file(tmp_path / "latents_stats.pt", mean=0.3, std=2.0)
    common = TINY_TRAIN + ["--ckpt-every", "2", "--max-steps", "3", "--latent-stats", str(stats)]
    straight = train.main(common + ["--results-dir", str(tmp_path / "a")])
    exp = tmp_path / "a" / "000-LightningDiT-XL-1"
    assert straight["experiment_dir"] == str(exp) and straight["step"] == 3
    assert all(np.isfinite(straight["losses"]))
    resumed = train.main(common + ["--results-dir", str(tmp_path / "b"), "--resume",
                                   str(exp / "checkpoints" / "0000002.pt")])
    assert resumed["losses"] == straight["losses"][2:], "a resumed run repeats the uninterrupted one"
    a, b = torch.load(exp / "checkpoints" / "0000003.pt", weights_only=True), torch.load(resumed["checkpoint"],
                                                                                         weights_only=True)
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(b[key][name], tensor), f"{key}.{name}"
    group = a["opt"]["param_groups"][0]
    assert (group["lr"], group["weight_decay"], tuple(group["betas"])) == (2e-4, 0.0, (0.9, 0.95))
    assert a["args"]["beta2"] == 0.95 and a["args"]["use_cosine_loss"] and a["args"]["use_lognorm"]
    assert a["args"]["latent_stats_sha256"] == LatentStats.load(stats).digest()
    # Resuming with other statistics is training on other data: refused.
    other = _stats_file(tmp_path / "other.pt", mean=0.0, std=1.0)
    with pytest.raises(SystemExit, match=r"another objective: latent_norm"):
        train.main(TINY_TRAIN + ["--max-steps", "4", "--latent-stats", str(other), "--resume",
                                 str(exp / "checkpoints" / "0000003.pt"), "--results-dir", str(tmp_path / "c")])
    # The EMA weights load into the LightningDiT the arguments build.
    model = train.build_model(train.parse_args(common), "cpu")
    dit_fast.load_checkpoint(model, resumed["checkpoint"])


def test_gradient_clipping_at_the_given_norm(tmp_path, train, monkeypatch):
    real, seen = torch.nn.utils.clip_grad_norm_, []

    def clip(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        before = real(parameters, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None]))
        seen.append((max_norm, float(before), float(after)))
        return before

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    train.main(TINY_TRAIN + ["--max-steps", "2", "--results-dir", str(tmp_path / "off")])
    assert seen == [], "off by default, as in the published configs"
    train.main(TINY_TRAIN + ["--max-steps", "2", "--max-grad-norm", "0.01", "--results-dir", str(tmp_path / "on")])
    assert len(seen) == 2
    for max_norm, before, after in seen:
        assert max_norm == 0.01 and before > 0.01 and after == pytest.approx(0.01, rel=1e-4)


def test_latent_stats_are_required_with_data_and_must_fit(tmp_path, train):
    data = tmp_path / "latents"
    data.mkdir()
    torch.save({"latents": torch.randn(4, *LATENT), "labels": torch.arange(4)}, data / "a.pt")
    run = TINY_TRAIN + ["--data", str(data), "--max-steps", "1", "--results-dir", str(tmp_path / "r")]
    with pytest.raises(SystemExit, match=r"--latent-stats: --model LightningDiT-XL/1 trains on latents normalized"):
        train.main(run)
    with pytest.raises(SystemExit, match=r"--latent-stats: .*stats for 4 latent channels, but the model has 32"):
        train.main(run + ["--latent-stats", str(_stats_file(tmp_path / "sd.pt", channels=4))])
    with pytest.raises(SystemExit, match=r"--latent-stats: .*no such latent stats file"):
        train.main(run + ["--latent-stats", str(tmp_path / "nope.pt")])
    assert train.main(run + ["--latent-stats", "none"])["step"] == 1


def test_the_loss_decreases_on_a_tiny_normalized_data_set(tmp_path, train):
    """Eight latents near mean + 1.5 std per channel: normalized, the velocity target x1 - x0 has mean 1.5,
    which the zero-initialized output must learn (MSE from 1.5^2 + 1 toward 1, the cosine term from 1 down).
    Unnormalized, the first loss would be about 5.4 (E (mean + 1.5 std)^2 + 1, plus 1)."""
    data = tmp_path / "latents"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(1, 32, 1, 1, generator=g), torch.rand(1, 32, 1, 1, generator=g) + 0.5
    latents = mean + std * (1.5 + 0.1 * torch.randn(8, *LATENT, generator=g))
    torch.save({"latents": latents, "labels": torch.arange(8)}, data / "a.pt")
    torch.save({"mean": mean, "std": std}, tmp_path / "latents_stats.pt")
    result = train.main(TINY_TRAIN + ["--data", str(data), "--latent-stats", str(tmp_path / "latents_stats.pt"),
                                      "--global-batch-size", "8", "--lr", "1e-3", "--precision", "fp32",
                                      "--max-steps", "30", "--results-dir", str(tmp_path / "r")])
    losses = np.array(result["losses"])
    assert abs(losses[0] - (1.5**2 + 0.01 + 1 + 1)) < 0.3, losses.round(3).tolist()  # normalized: MSE + cosine 1
    assert losses[-5:].mean() < 0.7 * losses[:5].mean(), losses.round(3).tolist()


# -------------------------------------------------------------------------------------- dit-fast sample
CLI_LABELS = "1,7,4"


def lightning_args(out, ckpt, *extra):
    return parse_sample("--model", "LightningDiT-XL/1", "--ckpt", str(ckpt), "--depth", "1", "--hidden-size", "64",
                        "--num-heads", "2", "--image-size", "64", "--num-classes", "10", "--num-steps", "4",
                        "--out", str(out), "--no-progress", *extra)


@pytest.fixture
def lightning_ckpt(tmp_path):
    """The tiny LightningDiT the CLI builds for lightning_args (XL/1 recipe, 32 channels, 4x4 latents), random
    weights, and a stats file."""
    model = dit_fast.LightningDiT(input_size=4, patch_size=1, in_channels=32, hidden_size=64, depth=1, num_heads=2,
                                  num_classes=10, use_swiglu=True, use_rope=True, use_rmsnorm=True, backend="torch")
    randomize_weights_(model).eval()
    path = tmp_path / "tiny-lightning.pt"
    dit_fast.save_checkpoint(model, str(path))
    g = torch.Generator().manual_seed(1)
    stats = tmp_path / "latents_stats.pt"
    torch.save({"mean": torch.randn(1, 32, 1, 1, generator=g), "std": torch.rand(1, 32, 1, 1, generator=g) + 0.5},
               stats)
    return model, path, stats


def _npz(path):
    with np.load(path) as z:
        return z["arr_0"], z["labels"].tolist()


def test_cli_writes_denormalized_latents_as_the_published_inference(tmp_path, lightning_ckpt):
    from dit_fast import sample_cli

    model, ckpt, stats_file = lightning_ckpt
    out = tmp_path / "out"
    flags = ("--latent-stats", str(stats_file), "--class-labels", CLI_LABELS, "--batch-size", "2", "--seed", "5")
    assert sample_cli.run(lightning_args(out, ckpt, *flags)) == 0
    assert not (out / "samples.npz").exists() and not (out / "grid.png").exists(), "no VAE: latents only"
    got, labels = _npz(out / "latents.npz")
    assert got.shape == (3, 32, 4, 4) and got.dtype == np.float32 and labels == [1, 7, 4]
    stats = LatentStats.load(stats_file)
    normalized = torch.cat([
        sample(model, labels[j * 2: j * 2 + 2], num_steps=4, cfg_scale=10.0, timestep_shift=0.3,
               cfg_interval=0.11, generator=torch.Generator().manual_seed(5 + j), backend="torch")
        for j in range(2)])
    want = stats.mean.reshape(1, -1, 1, 1) + normalized * stats.std.reshape(1, -1, 1, 1)  # multiplier 1
    assert rel_err(torch.from_numpy(got), want) <= 1e-5  # the CLI's model runs backend "auto", this one "torch"
    assert rel_err(torch.from_numpy(got), normalized) > 0.1, "de-normalized"
    record = json.loads((out / "run.json").read_text())
    assert {k: record[k] for k in ("mode", "sampling_method", "num_steps", "timestep_shift", "cfg_interval",
                                   "cfg_scale", "vae", "use_swiglu", "use_rope", "use_rmsnorm", "use_qknorm",
                                   "wo_shift", "latent_multiplier", "latent_stats_digest")} == {
        "mode": "ode", "sampling_method": "euler", "num_steps": 4, "timestep_shift": 0.3, "cfg_interval": [0.11, 1.0],
        "cfg_scale": 10.0, "vae": "none", "use_swiglu": True, "use_rope": True, "use_rmsnorm": True,
        "use_qknorm": False, "wo_shift": False, "latent_multiplier": 1.0, "latent_stats_digest": stats.digest()}

    # Resumable: a lost shard is sampled again, the same; other statistics into the same --out are refused.
    (out / "shards" / "batch_000001.npz").unlink()
    sample_cli.run(lightning_args(out, ckpt, *flags))
    assert np.array_equal(_npz(out / "latents.npz")[0], got)
    torch.save({"mean": torch.zeros(32), "std": torch.ones(32)}, stats_file)
    with pytest.raises(SystemExit, match=r"other settings \(latent_stats_digest\)"):
        sample_cli.run(lightning_args(out, ckpt, *flags))


@pytest.fixture(scope="module")
def f16_vae_dir(tmp_path_factory):
    """A tiny random diffusers AutoencoderKL with VA-VAE f16d32's shape: 16x downsampling, 32 latent channels."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=32, block_out_channels=(8,) * 5,
                                  down_block_types=("DownEncoderBlock2D",) * 5,
                                  up_block_types=("UpDecoderBlock2D",) * 5, layers_per_block=1, norm_num_groups=4,
                                  sample_size=64)
    path = tmp_path_factory.mktemp("f16vae")
    vae.save_pretrained(path)
    return str(path)


def test_cli_decodes_with_a_local_vae_over_two_ranks(tmp_path, lightning_ckpt, f16_vae_dir, vae_dir, monkeypatch):
    import diffusers

    from dit_fast import sample_cli

    _, ckpt, stats_file = lightning_ckpt
    flags = ("--latent-stats", str(stats_file), "--num-samples", "3", "--batch-size", "2", "--cfg-scale", "6.7")
    sample_cli.run(lightning_args(tmp_path / "latents", ckpt, *flags))
    latents, labels = _npz(tmp_path / "latents" / "latents.npz")
    sharded = tmp_path / "sharded"
    for rank in (1, 0):  # two ranks one after the other, rank 0 last to merge
        monkeypatch.setattr(sample_cli, "_dist", lambda r=rank: (r, 2, None))
        monkeypatch.setattr(sample_cli, "_barrier", lambda world: None)
        sample_cli.run(lightning_args(sharded, ckpt, *flags, "--vae", f16_vae_dir))
    images, image_labels = _npz(sharded / "samples.npz")
    assert images.dtype == np.uint8 and images.shape == (3, 64, 64, 3) and image_labels == labels
    assert (sharded / "grid.png").exists()
    vae = diffusers.AutoencoderKL.from_pretrained(f16_vae_dir).eval()
    with torch.no_grad():  # the de-normalized latents decoded as they are (VA-VAE's decode_to_images)
        want = sample_cli.decode_to_uint8(vae, torch.from_numpy(latents), scale=1.0)
    assert np.abs(images.astype(int) - want.astype(int)).max() <= 1
    # The SD VAE (4 latent channels) does not fit a LightningDiT.
    with pytest.raises(SystemExit, match=r"has 4 latent channels, but --model LightningDiT-XL/1 samples 32"):
        sample_cli.run(lightning_args(tmp_path / "sd", ckpt, *flags, "--vae", vae_dir))


def test_cli_refusals(tmp_path, lightning_ckpt, train):
    from dit_fast import sample_cli

    _, ckpt, stats_file = lightning_ckpt
    with pytest.raises(SystemExit, match=r"--latent-stats: --model LightningDiT-XL/1 samples latents normalized"):
        sample_cli.run(lightning_args(tmp_path / "a", ckpt))
    sd_stats = _stats_file(tmp_path / "sd.pt", channels=4)
    with pytest.raises(SystemExit, match=r"stats for 4 latent channels, but the model has 32"):
        sample_cli.run(lightning_args(tmp_path / "a", ckpt, "--latent-stats", str(sd_stats)))
    with pytest.raises(SystemExit, match=r"--use-swiglu, --latent-stats: LightningDiT options, but --model is "
                                         r"DiT-S/2"):
        sample_cli.run(parse_sample("--model", "DiT-S/2", "--random-init", "--use-swiglu", "--latent-stats", "x",
                                    "--out", str(tmp_path / "a")))
    assert not (tmp_path / "a" / "run.json").exists()
    # A train.py checkpoint records its statistics and model options: others are refused.
    run = train.main(TINY_TRAIN + ["--max-steps", "1", "--latent-stats", str(stats_file),
                                   "--results-dir", str(tmp_path / "r")])
    other = _stats_file(tmp_path / "other.pt")
    with pytest.raises(SystemExit, match=r"was trained on latents normalized with statistics .*latents_stats.pt"):
        sample_cli.run(lightning_args(tmp_path / "b", run["checkpoint"], "--latent-stats", str(other)))
    with pytest.raises(SystemExit, match=r"was trained with --use-rope \(its recorded args\)"):
        sample_cli.run(lightning_args(tmp_path / "b", run["checkpoint"], "--latent-stats", str(stats_file),
                                      "--no-use-rope"))
    # With its own statistics it samples what dit_fast.sample gives for its EMA weights.
    assert sample_cli.run(lightning_args(tmp_path / "c", run["checkpoint"], "--latent-stats", str(stats_file),
                                         "--class-labels", "2,3")) == 0
    model = train.build_model(train.parse_args(TINY_TRAIN), "cpu").eval()
    dit_fast.load_checkpoint(model, run["checkpoint"])
    recipe = LIGHTNINGDIT_SAMPLING | dict(num_steps=4)
    want = LatentStats.load(stats_file).denormalize(
        sample(model, [2, 3], **recipe, generator=torch.Generator().manual_seed(0)))
    got, _ = _npz(tmp_path / "c" / "latents.npz")
    assert rel_err(torch.from_numpy(got), want) <= 1e-5


def test_extract_latents_writes_the_published_stats_file_that_train_reads(tmp_path, f16_vae_dir, train):
    """VA-VAE-shaped latents (16x, 32 channels) unscaled, with latents_stats.pt beside the shards (the published
    layout: LatentShards skips it), which train.py --latent-stats then reads."""
    import importlib.util
    from pathlib import Path

    from PIL import Image

    spec = importlib.util.spec_from_file_location(
        "extract_latents_lightning", Path(__file__).resolve().parents[1] / "benchmarks" / "extract_latents.py")
    extract_latents = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extract_latents)
    data, out = tmp_path / "data", tmp_path / "out"
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (data / name).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(data / name / f"{k}.png")
    argv = ["--data", str(data), "--out", str(out), "--vae", f16_vae_dir, "--image-size", "64", "--latent-scale", "1",
            "--latent-stats", "--no-progress"]
    assert extract_latents.main(argv) == 0
    shards = LatentShards(out, latent_shape=LATENT, num_classes=2)
    assert len(shards) == 6 and [s.path.name for s in shards.shards] == ["latents_r00_00000.pt"]
    x, _ = shards.batch_at(np.arange(6), "cpu")
    stats = LatentStats.load(out / "latents_stats.pt", channels=32)
    assert torch.allclose(stats.mean, x.double().mean(dim=(0, 2, 3)).float(), atol=1e-6)
    assert torch.allclose(stats.std, x.double().std(dim=(0, 2, 3)).float(), atol=1e-6)
    raw = torch.load(out / "latents_stats.pt", weights_only=True)
    assert raw["mean"].shape == (1, 32, 1, 1) and raw["std"].shape == (1, 32, 1, 1)
    (out / "latents_stats.pt").unlink()
    assert extract_latents.main(["--stats-only", "--out", str(out)]) == 0
    assert LatentStats.load(out / "latents_stats.pt").digest() == stats.digest()
    run = train.main(TINY_TRAIN + ["--data", str(out), "--latent-stats", str(out / "latents_stats.pt"),
                                   "--num-classes", "2", "--max-steps", "1", "--results-dir", str(tmp_path / "r")])
    assert run["step"] == 1 and np.isfinite(run["losses"]).all()
