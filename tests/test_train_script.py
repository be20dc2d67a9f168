"""benchmarks/train.py, the training example: checkpoints and resuming (atomic saves, skipping broken
checkpoints, optimizer settings), validated latent shards (dit_fast.data), stopping on a non-finite
loss, and the loss as one replaceable function.
"""
import errno
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dit_fast.data import InvalidShardError, LatentShards
from train_script_runs import load_saved, load_train_script, tiny_train_argv

# A one-block DiT-S/2 of width 64 on 8x8 latents: about a second per run.
TINY = tiny_train_argv("DiT-S/2")


# Tiny models: one thread (conftest's fixture)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def train():
    return load_train_script("dit_fast_train_example")


def _exp(results, index=0) -> Path:
    """The run's experiment directory: RESULTS/NNN-DiT-S-2, one per run."""
    return Path(results) / f"{index:03d}-DiT-S-2"


def _ckpts(results, index=0) -> list[str]:
    return sorted(p.name for p in (_exp(results, index) / "checkpoints").iterdir())


# -- saving and resuming ---------------------------------------------------------------------------


def test_saves_and_resumes(tmp_path, train):
    common = TINY + ["--ckpt-every", "2", "--lr", "1e-3"]
    straight = train.main(common + ["--max-steps", "3", "--results-dir", str(tmp_path / "a")])
    assert straight["step"] == 3 and len(straight["losses"]) == 3
    assert straight["experiment_dir"] == str(_exp(tmp_path / "a"))
    first = _exp(tmp_path / "a") / "checkpoints" / "0000002.pt"
    resumed = train.main(common + ["--max-steps", "3", "--results-dir", str(tmp_path / "b"), "--resume", str(first)])
    assert resumed["step"] == 3 and len(resumed["losses"]) == 1
    assert resumed["losses"][0] == straight["losses"][2], "a resumed run repeats the uninterrupted one"

    a = load_saved(_exp(tmp_path / "a") / "checkpoints" / "0000003.pt")
    b = load_saved(resumed["checkpoint"])
    assert set(a) == {"model", "ema", "opt", "args", "step"} and a["step"] == 3
    assert a["args"]["lr"] == 1e-3 and a["args"]["model"] == "DiT-S/2"
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            torch.testing.assert_close(b[key][name], tensor, rtol=0, atol=0, msg=f"{key}.{name}")
    # EMA moved away from the initial weights, by less than the model did (decay 0.9999).
    first_state = load_saved(first)
    w = "blocks.0.attn.qkv.weight"
    assert not torch.equal(a["ema"][w], first_state["ema"][w])
    assert (a["ema"][w] - first_state["ema"][w]).abs().max() < (a["model"][w] - first_state["model"][w]).abs().max()

    from dit_fast.checkpoint import load_checkpoint

    model = train.build_model(train.parse_args(common), "cpu")
    load_checkpoint(model, _exp(tmp_path / "a") / "checkpoints" / "0000003.pt", key="ema")
    torch.testing.assert_close(model.state_dict()[w], a["ema"][w], rtol=0, atol=0)


def _fail_on_nth_save(monkeypatch, n, error):
    """torch.save writes some bytes of its n-th call, then fails as a full disk or a kill would."""
    real_save, calls = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] < n:
            return real_save(obj, f, *args, **kwargs)
        if hasattr(f, "write"):
            f.write(b"PK\x03\x04 half a checkpoint" * 100)
        else:
            Path(f).write_bytes(b"PK\x03\x04 half a checkpoint" * 100)
        raise error

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk_full", "killed"])
def test_a_failed_checkpoint_save_keeps_the_previous_one(tmp_path, train, monkeypatch, error):
    results = tmp_path / "run"
    args = TINY + ["--ckpt-every", "1", "--max-steps", "2", "--results-dir", str(results)]
    train.main(args)
    good = load_saved(_exp(results) / "checkpoints" / "0000002.pt")
    _fail_on_nth_save(monkeypatch, 2, error)  # the same run again (its own directory), failing mid-save of 0000002.pt
    with pytest.raises(type(error)) as e:
        train.main(args)
    assert e.value is error or e.value.__cause__ is error, "the original error surfaces (as the cause of a full disk)"
    monkeypatch.undo()
    assert _ckpts(results, 1) == ["0000001.pt"], "no temp file left"
    assert load_saved(_exp(results, 1) / "checkpoints" / "0000001.pt")["step"] == 1
    assert _ckpts(results, 0) == ["0000001.pt", "0000002.pt"], "the first run's checkpoints are untouched"
    torch.testing.assert_close(load_saved(_exp(results) / "checkpoints" / "0000002.pt")["model"], good["model"],
                               rtol=0, atol=0)


def test_resume_skips_a_truncated_newest_checkpoint(tmp_path, train, capsys):
    results = tmp_path / "run"
    args = TINY + ["--ckpt-every", "1", "--results-dir", str(results)]
    straight = train.main(args + ["--max-steps", "3"])
    ckpts = _exp(results) / "checkpoints"
    newest = ckpts / "0000003.pt"
    complete = newest.read_bytes()
    for resume in ("auto", str(ckpts), str(_exp(results)), str(results)):
        newest.write_bytes(complete[:1000])  # what a kill mid-save left before saves were atomic
        (ckpts / "0000002.pt").write_bytes(b"")
        capsys.readouterr()
        again = train.main(args + ["--max-steps", "3", "--resume", resume])
        out = capsys.readouterr().out
        assert f"skipping {newest}: " in out and "truncated or corrupt" in out
        assert f"skipping {ckpts / '0000002.pt'}: " in out and "is empty (0 bytes)" in out
        assert f"resuming from {ckpts / '0000001.pt'} (step 1)" in out
        assert again["losses"] == straight["losses"][1:], f"--resume {resume}"
        assert again["experiment_dir"] == str(_exp(results, 1)), "a resumed run writes into a new directory"
        assert load_saved(_exp(results, 1) / "checkpoints" / "0000003.pt")["step"] == 3
        shutil.rmtree(_exp(results, 1))  # the next --resume finds experiment 000's again


def test_every_rank_resumes_from_rank_0s_choice(tmp_path, train, capsys):
    """Under DDP, rank 0 picks the checkpoint and every rank loads that path: a rank whose own listing
    would pick another file (a newer one half copied in) still loads rank 0's; a rank that cannot load it
    stops every rank; an error on rank 0 reaches every rank."""
    results = tmp_path / "run"
    train.main(TINY + ["--ckpt-every", "1", "--results-dir", str(results), "--max-steps", "2"])
    ckpts = _exp(results) / "checkpoints"
    sent = {}

    def broadcast_from_rank0(obj):
        sent["decision"] = obj
        return obj

    found = train.resume_on_every_rank("auto", ckpts, "cpu", print, 0, broadcast_from_rank0, lambda ok: ok)
    assert found[0] == ckpts / "0000002.pt" and sent["decision"] == ("path", str(ckpts / "0000002.pt"))
    (ckpts / "0000003.pt").write_bytes(b"half copied")  # only "rank 1" would see this one
    found = train.resume_on_every_rank("auto", ckpts, "cpu", print, 1, lambda obj: sent["decision"], lambda ok: ok)
    assert found[0] == ckpts / "0000002.pt" and found[1]["step"] == 2
    (ckpts / "0000002.pt").write_bytes(b"")  # rank 1 cannot read rank 0's choice: everyone stops
    flags = []
    with pytest.raises(SystemExit, match="rank 0 chose .*0000002.pt, which not every rank could load .rank 1"):
        train.resume_on_every_rank("auto", ckpts, "cpu", print, 1, lambda obj: sent["decision"],
                                   lambda ok: flags.append(ok) or all(flags))
    assert flags == [False]
    with pytest.raises(SystemExit, match="neither a checkpoint file nor a directory"):
        train.resume_on_every_rank(str(tmp_path / "missing"), ckpts, "cpu", print, 1,
                                   lambda obj: ("error", "--resume: x is neither a checkpoint file nor a directory"),
                                   lambda ok: ok)


def test_resume_auto_without_checkpoints_starts_fresh_and_a_broken_file_is_an_error(tmp_path, train, capsys):
    results = tmp_path / "run"
    first = train.main(TINY + ["--max-steps", "1", "--results-dir", str(results), "--resume", "auto"])
    assert first["step"] == 1 and "no checkpoints in" in capsys.readouterr().out
    broken = tmp_path / "broken.pt"
    broken.write_bytes((_exp(results) / "checkpoints" / "0000001.pt").read_bytes()[:500])
    with pytest.raises(SystemExit, match=r"--resume: .*broken\.pt.*truncated or corrupt"):
        train.main(TINY + ["--max-steps", "2", "--results-dir", str(results), "--resume", str(broken)])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no loadable checkpoint"):
        train.main(TINY + ["--max-steps", "2", "--results-dir", str(results), "--resume", str(empty)])
    with pytest.raises(SystemExit, match="neither a checkpoint file nor a directory"):
        train.main(TINY + ["--max-steps", "2", "--resume", str(tmp_path / "missing.pt")])


def test_optimizer_settings_given_on_resume_are_applied(tmp_path, train, capsys):
    results = tmp_path / "run"
    args = TINY + ["--ckpt-every", "1", "--results-dir", str(results)]
    train.main(args + ["--max-steps", "1", "--lr", "1e-3"])
    step1 = str(_exp(results) / "checkpoints" / "0000001.pt")
    capsys.readouterr()

    train.main(args + ["--max-steps", "2", "--resume", step1])  # no --lr: the checkpoint's stays
    kept = load_saved(_exp(results, 1) / "checkpoints" / "0000002.pt")
    assert kept["opt"]["param_groups"][0]["lr"] == kept["args"]["lr"] == 1e-3
    assert "--resume: optimizer" not in capsys.readouterr().out

    train.main(args + ["--max-steps", "2", "--resume", step1, "--lr", "3e-4", "--weight-decay", "0.05"])
    out = capsys.readouterr().out
    assert "optimizer lr 0.001 -> 0.0003" in out and "optimizer weight_decay 0.0 -> 0.05" in out
    changed = load_saved(_exp(results, 2) / "checkpoints" / "0000002.pt")
    assert changed["opt"]["param_groups"][0]["lr"] == changed["args"]["lr"] == 3e-4
    assert changed["opt"]["param_groups"][0]["weight_decay"] == changed["args"]["weight_decay"] == 0.05
    # It took effect: the step from 1 to 2 moved the weights by a different amount (Adam: ~lr per element).
    w = "blocks.0.adaLN_modulation.1.bias"  # has a gradient from the first step on (the gates)
    start = load_saved(step1)["model"][w]
    moved_kept = (kept["model"][w] - start).abs().max()
    moved_changed = (changed["model"][w] - start).abs().max()
    assert moved_changed < 0.5 * moved_kept

    for lr in ("nan", "1e39", "0", "-1e-4"):
        with pytest.raises(SystemExit):
            train.main(args + ["--max-steps", "2", f"--lr={lr}"])
        err = capsys.readouterr().err
        assert f"--lr must be a finite number in (0, 1] (the recipe's is 1e-4), got {float(lr)}" in err


# -- the loss ------------------------------------------------------------------------------------


def test_the_loss_is_one_replaceable_function(tmp_path, train, monkeypatch):
    seen = []

    def loss(model, diffusion, x, y, generator):
        value = real(model, diffusion, x, y, generator)
        seen.append(float(value.detach()))
        return value

    real = train.training_loss
    monkeypatch.setattr(train, "training_loss", loss)
    result = train.main(TINY + ["--max-steps", "2", "--results-dir", str(tmp_path)])
    assert result["losses"] == seen and len(seen) == 2


def test_the_loss_is_the_published_hybrid_loss(train):
    from dit_fast.diffusion import create_diffusion

    args = train.parse_args(TINY)
    model = train.build_model(args, "cpu").eval()  # no label dropout: both losses see the same labels
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)  # the paper zeroes it: outputs would be 0
    diffusion = create_diffusion(timestep_respacing="")
    x, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 5, 9])
    gen = torch.Generator().manual_seed(7)
    loss = train.training_loss(model, diffusion, x, y, gen)
    gen.manual_seed(7)
    t = torch.randint(0, 1000, (3,), generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    with torch.no_grad():
        want = diffusion.training_losses(model, x, t, dict(y=y), noise=noise)
    assert loss.item() == pytest.approx(want["loss"].mean().item(), rel=1e-6)
    assert want["vb"].mean().item() > 0 and loss.item() > want["mse"].mean().item()
    # The variational-bound term is what trains the learned variance: the sigma outputs get gradient.
    loss.backward()
    p, c = model.patch_size, model.out_channels
    rows = model.final_layer.linear.weight.grad.reshape(p * p, c, -1)
    assert rows[:, 4:].abs().sum() > 0 and rows[:, :4].abs().sum() > 0


@pytest.mark.parametrize("broken", ["loss", "grads"])
def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, train, monkeypatch, broken):
    real_loss, real_ema, calls, ema_updates = train.training_loss, train.update_ema, [0], []

    def loss(*args):
        value = real_loss(*args)
        calls[0] += 1
        if calls[0] == 3:
            if broken == "loss":
                return value * float("nan")
            value.register_hook(lambda g: g * float("inf"))  # finite loss, non-finite gradients
        return value

    def update_ema(ema, model, decay):
        assert all(torch.isfinite(p).all() for p in model.parameters()), "EMA updated from non-finite weights"
        ema_updates.append(1)
        real_ema(ema, model, decay)

    monkeypatch.setattr(train, "training_loss", loss)
    monkeypatch.setattr(train, "update_ema", update_ema)
    results = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--ckpt-every", "1", "--max-steps", "5", "--results-dir", str(results)])
    msg = str(e.value)
    assert msg.startswith("step 3: the loss is ") and "stopped before updating the weights" in msg
    assert f"last good checkpoint is {_exp(results) / 'checkpoints' / '0000002.pt'}" in msg
    assert len(ema_updates) == 2
    assert _ckpts(results) == ["0000001.pt", "0000002.pt"]
    last = load_saved(_exp(results) / "checkpoints" / "0000002.pt")
    assert all(torch.isfinite(t).all() for key in ("model", "ema") for t in last[key].values())


# -- latent shards ---------------------------------------------------------------------------------


def _shards(tmp_path, **overrides):
    """A .npy shard of 5 rows and a .pt shard of 3, with `overrides` replacing parts of them."""
    data = tmp_path / "latents"
    data.mkdir(exist_ok=True)
    parts = dict(npy=np.random.randn(5, 4, 8, 8).astype(np.float16), npy_labels=np.arange(5) % 10,
                 pt=torch.randn(3, 4, 8, 8), pt_labels=torch.tensor([1, 2, 3]))
    parts.update(overrides)
    np.save(data / "a.npy", parts["npy"])
    np.save(data / "a.labels.npy", parts["npy_labels"])
    torch.save({"latents": parts["pt"], "labels": parts["pt_labels"]}, data / "b.pt")
    return data


def _open(data, **kwargs):
    return LatentShards(data, latent_shape=(4, 8, 8), num_classes=10, **kwargs)


def test_reads_latent_shards(tmp_path, train):
    data = _shards(tmp_path, pt=torch.randn(3, 4, 8, 8, dtype=torch.bfloat16))
    shards = _open(data)
    assert len(shards) == 8 and shards.shape == (4, 8, 8)
    x, y = shards.batch_at(np.array([0, 6, 1]), "cpu")
    assert x.shape == (3, 4, 8, 8) and x.dtype == torch.float32 and y.tolist() == [1, 3, 2]  # .pt shards first
    want = torch.load(data / "b.pt", weights_only=True)["latents"]
    assert (torch.equal(x[0], want[0].float())
            and torch.equal(x[1], torch.from_numpy(np.load(data / "a.npy")[3]).float()))
    result = train.main(["--model", "DiT-S/8", "--depth", "1", "--hidden-size", "32", "--num-heads", "2",
                         "--image-size", "64", "--num-classes", "10", "--global-batch-size", "4",
                         "--max-steps", "2", "--device", "cpu", "--no-progress", "--precision", "fp32",
                         "--data", str(data), "--results-dir", str(tmp_path / "run")])
    assert result["step"] == 2 and all(np.isfinite(result["losses"]))
    with pytest.raises(SystemExit, match=r"b\.pt: latents have shape \[3, 4, 8, 8\], expected \[N, 4, 16, 16\]"):
        train.main(["--model", "DiT-S/8", "--depth", "1", "--image-size", "128", "--data", str(data),
                    "--device", "cpu", "--max-steps", "1", "--results-dir", str(tmp_path / "bad")])


BAD_SHARDS = {
    # Equal totals (8 latents, 8 labels) but not per shard: rows would pair with the wrong labels.
    "counts_per_shard": (dict(npy_labels=np.arange(6) % 10, pt_labels=torch.tensor([1, 2])),
                         r"b\.pt: 3 latents but labels of shape \[2\], expected \[3\]"),
    "float_labels_pt": (dict(pt_labels=torch.tensor([1.0, 2.5, 3.0])),
                        r"b\.pt: labels must be an integer dtype, got torch\.float32"),
    "float_labels_npy": (dict(npy_labels=np.arange(5) * 1.0),
                         r"a\.labels\.npy: labels must be an integer dtype, got float64"),
    "null_class_label": (dict(pt_labels=torch.tensor([1, 10, 3])),
                         r"b\.pt: labels must be in \[0, 10\).*null class.*from 1 to 10"),
    "negative_label": (dict(npy_labels=np.array([0, -1, 2, 3, 4])),
                       r"a\.npy: labels must be in \[0, 10\).*from -1 to 4"),
    "wrong_channels": (dict(pt=torch.randn(3, 3, 8, 8)),
                       r"b\.pt: latents have shape \[3, 3, 8, 8\], expected \[N, 4, 8, 8\]"),
    "integer_latents": (dict(pt=torch.zeros(3, 4, 8, 8, dtype=torch.int32)), r"b\.pt: latents must be floating point"),
    "nan_latent": (dict(npy=np.where(np.arange(5)[:, None, None, None] == 2, np.nan, np.random.randn(5, 4, 8, 8))),
                   r"a\.npy: latent row 2 has non-finite values"),
}


@pytest.mark.parametrize("case", sorted(BAD_SHARDS))
def test_bad_shards_are_refused_when_opened(tmp_path, case):
    overrides, message = BAD_SHARDS[case]
    data = _shards(tmp_path, **overrides)
    with pytest.raises(InvalidShardError, match=message):
        _open(data)


def test_unreadable_shards_are_refused(tmp_path):
    data = _shards(tmp_path)
    good = (data / "b.pt").read_bytes()
    (data / "b.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(InvalidShardError, match=r"b\.pt: cannot be read .*truncated"):
        _open(data)
    torch.save({"latents": torch.randn(3, 4, 8, 8), "labels": torch.tensor([1, 2, 3]), "hook": _open}, data / "b.pt")
    with pytest.raises(InvalidShardError, match=r"b\.pt: holds Python objects .*refusing to unpickle"):
        _open(data)
    torch.save([torch.randn(3, 4, 8, 8)], data / "b.pt")
    with pytest.raises(InvalidShardError,
                       match=r'b\.pt: expected a dict \{"latents": tensor, "labels": tensor\}, got list'):
        _open(data)


def _published_shard(path, n=5, dtype=torch.float32, **overrides):
    """A shard as hustvl/LightningDiT's extract_features.py writes it (safetensors' own writer)."""
    from safetensors.torch import save_file

    tensors = dict(latents=torch.randn(n, 4, 8, 8).to(dtype), latents_flip=torch.randn(n, 4, 8, 8).to(dtype),
                   labels=torch.arange(n) % 10)
    tensors.update(overrides)
    save_file({k: v for k, v in tensors.items() if v is not None}, str(path),
              metadata={"total_size": str(n), "dtype": str(dtype), "device": "cpu"})
    return tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reads_published_lightningdit_shards_with_their_flips(tmp_path, train, dtype):
    data = _shards(tmp_path)
    c = _published_shard(data / "c.safetensors", dtype=dtype)
    d = _published_shard(data / "d.safetensors", n=2, dtype=dtype, latents_flip=None)  # no flips: rows as they are
    shards = _open(data)
    assert len(shards) == 8 + 5 + 2 and shards.has_flips
    index = np.array([8, 9, 12, 13, 14, 0])  # c's rows 0, 1, 4; d's rows 0, 1; b.pt's row 0 (.pt first)
    flip = np.array([False, True, True, True, False, True])
    x, y = shards.batch_at(index, "cpu", flip)
    want = [c["latents"][0], c["latents_flip"][1], c["latents_flip"][4], d["latents"][0], d["latents"][1]]
    for got, w in zip(x, want):
        assert torch.equal(got, w.float())  # widened exactly, never rounded
    assert torch.equal(x[5], torch.load(data / "b.pt", weights_only=True)["latents"][0])
    assert y.tolist() == [0, 1, 4, 0, 1, 1]
    assert torch.equal(shards.batch_at(index, "cpu")[0][1], c["latents"][1].float())  # no flip asked
    with pytest.raises(ValueError, match=r"flip must have shape \[6\] \(one per index\), got \[2\]"):
        shards.batch_at(index, "cpu", flip[:2])
    result = train.main(TINY + ["--data", str(data), "--max-steps", "2", "--results-dir", str(tmp_path / "run")])
    assert result["step"] == 2 and all(np.isfinite(result["losses"]))


def test_bad_published_shards_are_refused(tmp_path):
    data = tmp_path / "latents"
    data.mkdir()
    path = data / "c.safetensors"
    cases = [
        (dict(latents_flip=torch.randn(4, 4, 8, 8)), r"latents_flip have shape \[4, 4, 8, 8\], expected the latents' "
                                                     r"\[5, 4, 8, 8\]"),
        (dict(labels=torch.arange(5.0)), r"labels must be an integer dtype .*got F32 \(refused, not converted\)"),
        (dict(labels=None), r'expected the tensors "latents" and "labels" .*got \[\'latents\', \'latents_flip\'\]'),
        (dict(latents=torch.zeros(5, 4, 8, 8, dtype=torch.int32)), r"latents must be floating point .*got I32"),
        (dict(latents_flip=torch.full((5, 4, 8, 8), float("nan"))), r"latents_flip row 0 has non-finite values"),
        (dict(labels=torch.tensor([0, 1, 10, 2, 3])), r"labels must be in \[0, 10\)"),
    ]
    for overrides, message in cases:
        _published_shard(path, **overrides)
        with pytest.raises(InvalidShardError, match=r"c\.safetensors: " + message):
            _open(data)
    _published_shard(path)
    good = path.read_bytes()
    for broken in (good[: len(good) - 7], good[:5], b"\xff" * 8 + good[8:]):
        path.write_bytes(broken)
        with pytest.raises(InvalidShardError, match=r"c\.safetensors: .*(truncated|cannot be read)"):
            _open(data)


def test_finite_values_on_a_sample_or_all_rows_and_in_every_batch(tmp_path, train):
    from dit_fast.data import SAMPLE_ROWS, _rows_to_check

    n = 4 * SAMPLE_ROWS
    unsampled = int(np.setdiff1d(np.arange(n), _rows_to_check(n, "sample"))[0])
    latents = np.random.randn(n, 4, 8, 8).astype(np.float32)
    latents[unsampled, 1, 2, 3] = np.inf
    data = _shards(tmp_path, npy=latents, npy_labels=np.arange(n) % 10)
    with pytest.raises(InvalidShardError, match=rf"a\.npy: latent row {unsampled} has non-finite values"):
        _open(data, check="all")
    shards = _open(data)  # the sample misses the row ...
    shards.batch_at(np.array([0, 3 + unsampled - 1]), "cpu")
    with pytest.raises(InvalidShardError, match=rf"a\.npy: latent row {unsampled} has non-finite"):
        shards.batch_at(np.array([0, 3 + unsampled]), "cpu")  # ... the batch that reads it does not
    run = TINY + ["--data", str(data), "--max-steps", "1", "--results-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit, match=rf"--data: .*a\.npy: latent row {unsampled} has non-finite"):
        train.main(run + ["--check-data", "all"])


def test_bad_arguments(tmp_path):
    data = _shards(tmp_path)
    with pytest.raises(ValueError, match="check must be one of sample, all, got 'some'"):
        _open(data, check="some")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        _open(tmp_path / "missing")
    with pytest.raises(IndexError, match=r"indices must be in \[0, 8\)"):
        _open(data).batch_at(np.array([8]), "cpu")
    assert not math.isnan(float(_open(data).batch_at(np.array([7]), "cpu")[0].sum()))
