"""The SiT workflow: dit_fast.sample on flow models (the published SiT sample.py loop for the same seed),
`dit-fast sample --model SiT-...` and benchmarks/train.py --model SiT-... (the transport objective).

The published loop is run through dit_fast.transport.Sampler (itself checked against the official SiT
code in test_transport.py) on the batch the published sample.py builds.
"""
from __future__ import annotations

import pytest
import torch

import dit_fast
from dit_fast import reference
from dit_fast.sampling import is_flow_model, sample
from dit_fast.testing import randomize_weights_
from dit_fast.transport import Sampler, create_transport
from tolerances import rel_err
from train_script_runs import load_saved, load_train_script, parse_sample, tiny_train_argv

# The fast flow sampler equals the loop bit for bit on the CPU; a few ulps of slack for the guidance order.
FLOAT32_ROUNDING = 1e-6
NUM_CLASSES = 10  # the null label is NUM_CLASSES (1000 for ImageNet, as sample.py hard-codes it)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_sit(learn_sigma=True, fast=True, patch=2):
    cls = dit_fast.SiT if fast else reference.SiT
    kw = dict(backend="torch") if fast else {}
    model = cls(input_size=8, patch_size=patch, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                num_classes=NUM_CLASSES, learn_sigma=learn_sigma, **kw)
    return randomize_weights_(model).eval()


def published_sample_py(model, labels, seed, mode, cfg_scale, **sampler_kw):
    """The published SiT sample.py: seed, z = randn(n, 4, latent, latent), y = tensor(labels), the batch
    doubled with the null label, sample_fn(z, model.forward_with_cfg, y=y, cfg_scale=...)[-1], first half."""
    torch.manual_seed(seed)
    n = len(labels)
    z = torch.randn(n, 4, 8, 8)
    y = torch.tensor(labels)
    z = torch.cat([z, z], 0)
    y = torch.cat([y, torch.tensor([NUM_CLASSES] * n)], 0)
    sampler = Sampler(create_transport("Linear", "velocity"))
    fn = sampler.sample_ode(**sampler_kw) if mode == "ode" else sampler.sample_sde(**sampler_kw)
    return fn(z, model.forward_with_cfg, y=y, cfg_scale=cfg_scale)[-1].chunk(2, dim=0)[0]


def published_sample_ddp_py(model, labels, seed, mode, **sampler_kw):
    """sample_ddp.py with cfg_scale <= 1: model.forward on the undoubled batch."""
    torch.manual_seed(seed)
    z = torch.randn(len(labels), 4, 8, 8)
    sampler = Sampler(create_transport("Linear", "velocity"))
    fn = sampler.sample_ode(**sampler_kw) if mode == "ode" else sampler.sample_sde(**sampler_kw)
    return fn(z, model.forward, y=torch.tensor(labels))[-1]


SAMPLE_PY_CASES = [
    # (mode, cfg_scale, sample()'s flow arguments, the published Sampler's arguments)
    ("ode", 4.0, dict(sampling_method="euler"), dict(sampling_method="euler")),
    ("ode", 3.0, dict(sampling_method="heun2", timestep_shift=0.3),
     dict(sampling_method="heun2", timestep_shift=0.3)),
    ("sde", 4.0, dict(), dict(sampling_method="Euler", diffusion_form="sigma", last_step="Mean",
                              last_step_size=0.04)),
    ("sde", 2.0, dict(sampling_method="Heun", diffusion_form="linear", last_step="Tweedie", last_step_size=0.1),
     dict(sampling_method="Heun", diffusion_form="linear", last_step="Tweedie", last_step_size=0.1)),
    ("sde", 1.0, dict(last_step=None), dict(sampling_method="Euler", diffusion_form="sigma", last_step=None)),
    ("ode", 0.5, dict(), dict(sampling_method="euler")),  # cfg_scale < 1: sample.py still guides
]


@pytest.mark.parametrize("mode,cfg_scale,ours,theirs", SAMPLE_PY_CASES,
                         ids=[f"{c[0]}-cfg{c[1]}-{i}" for i, c in enumerate(SAMPLE_PY_CASES)])
def test_sample_equals_the_published_sit_sample_py(mode, cfg_scale, ours, theirs):
    model = tiny_sit(learn_sigma=len(ours) % 2 == 0)
    labels = [3, 1, 9]
    seed = int(torch.randint(0, 2**31, ()).item())
    want = published_sample_py(model, labels, seed, mode, cfg_scale, num_steps=5, **theirs)
    torch.manual_seed(seed)
    got = sample(model, labels, num_steps=5, cfg_scale=cfg_scale, sampler=None if mode == "ode" else mode,
                 backend="torch", **ours)
    assert got.shape == (3, 4, 8, 8) and torch.isfinite(got).all()
    assert rel_err(got, want) <= FLOAT32_ROUNDING, (mode, cfg_scale)
    # The seed matters (a test that cannot fail is a defect): another seed gives other samples.
    torch.manual_seed(seed + 1)
    other = sample(model, labels, num_steps=5, cfg_scale=cfg_scale, sampler=mode, backend="torch", **ours)
    assert rel_err(other, want) > 1e-3


@pytest.mark.parametrize("mode", ["ode", "sde"])
def test_cfg_mode_above_one_is_the_published_sample_ddp_py(mode):
    model = tiny_sit(fast=False)  # the reference SiT: any SiT-like module
    seed = int(torch.randint(0, 2**31, ()).item())
    kw = dict(sampling_method="euler") if mode == "ode" else dict(sampling_method="Euler", diffusion_form="sigma")
    want = published_sample_ddp_py(model, [0, 5], seed, mode, num_steps=4, **kw)
    torch.manual_seed(seed)
    got = sample(model, [0, 5], num_steps=4, cfg_scale=1.0, sampler=mode, cfg_mode="above_one", backend="torch")
    assert rel_err(got, want) <= FLOAT32_ROUNDING


def test_flow_arguments_reach_sample_flow():
    """sample() hands its flow arguments to sample_flow as they are (its own tests check each against the
    published loop): the same generator stream gives the same result, and each argument changes it."""
    model = tiny_sit()
    z = torch.randn(2, 4, 8, 8)
    base = dict(num_steps=4, cfg_scale=3.0, sampler="sde", noise=z, backend="torch")
    runs = {}
    for name, extra in [("base", {}), ("cfg_interval", dict(cfg_interval=(0.0, 0.5))),
                        ("diffusion_form", dict(diffusion_form="constant")),
                        ("diffusion_norm", dict(diffusion_norm=2.0)),
                        ("last_step", dict(last_step="Euler", last_step_size=0.1)),
                        ("guide_all_channels", dict(guide_all_channels=True))]:
        got = sample(model, [1, 2], generator=torch.Generator().manual_seed(7), **base, **extra)
        want = dit_fast.sample_flow(model, z, torch.tensor([1, 2]), mode="sde", num_steps=4, cfg_scale=3.0,
                                    generator=torch.Generator().manual_seed(7), backend="torch", **extra)
        assert torch.equal(got, want), name
        runs[name] = got
    for name, got in runs.items():
        assert name == "base" or rel_err(got, runs["base"]) > 1e-4, f"{name} changed nothing"


def test_the_other_familys_sampler_is_refused():
    sit, dit = tiny_sit(), dit_fast.DiT(input_size=8, depth=1, hidden_size=32, num_heads=2, num_classes=NUM_CLASSES)
    assert is_flow_model(sit) is True and is_flow_model(tiny_sit(fast=False)) is True
    assert is_flow_model(dit) is False and is_flow_model(torch.nn.Linear(2, 2)) is None
    with pytest.raises(ValueError, match=r"sampler='ddpm' is a DDPM sampler, but the model \(SiT\) is a flow model"):
        sample(sit, [1], num_steps=3, sampler="ddpm")
    with pytest.raises(ValueError, match=r"sampler='ddim' is a DDPM sampler"):
        sample(sit, [1], num_steps=3, sampler="ddim")
    with pytest.raises(ValueError, match=r"sampler='sde' is a flow sampler, but the model \(DiT\) is a DDPM model"):
        sample(dit, [1], num_steps=3, sampler="sde")
    with pytest.raises(ValueError, match=r"timestep_shift=0.5: only the flow samplers"):
        sample(dit, [1], num_steps=3, timestep_shift=0.5)
    with pytest.raises(ValueError, match=r"eta=0.5, clip_denoised=True: only the DDPM samplers .* take these"):
        sample(sit, [1], num_steps=3, eta=0.5, clip_denoised=True)
    with pytest.raises(ValueError, match=r"last_step='Tweedie': only the DDPM samplers or sampler='sde' take this"):
        sample(sit, [1], num_steps=3, last_step="Tweedie")  # the ODE would ignore it
    with pytest.raises(ValueError, match=r"sampler must be one of \('ddpm', 'ddim'\) \(DiT\) or \('ode', 'sde'\)"):
        sample(sit, [1], num_steps=3, sampler="euler")
    with pytest.raises(ValueError, match="num_steps must be an int >= 2"):
        sample(sit, [1], num_steps=1)
    with pytest.raises(ValueError, match="sampling_method for mode='sde' must be one of"):
        sample(sit, [1], num_steps=3, sampler="sde", sampling_method="euler")
    with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 9\]"):
        sample(sit, [10], num_steps=3)


@pytest.mark.gpu
def test_sample_on_a_sit_cuda_graph_equals_eager_gpu():
    model = tiny_sit().cuda()
    for mode, extra in [("ode", dict(sampling_method="heun2")), ("sde", dict(sampling_method="Heun"))]:
        runs = [sample(model, [1, 2, 3], num_steps=6, cfg_scale=4.0, sampler=mode, cuda_graph=graph,
                       generator=torch.Generator("cuda").manual_seed(3), **extra) for graph in (False, True)]
        assert torch.isfinite(runs[0]).all() and rel_err(runs[1], runs[0]) <= 1e-5, mode


# -------------------------------------------------------------------------------------- dit-fast sample
def sit_args(out, ckpt, *extra):
    return parse_sample("--model", "SiT-S/2", "--ckpt", str(ckpt), "--depth", "1", "--hidden-size", "32",
                        "--num-heads", "2", "--image-size", "64", "--num-classes", str(NUM_CLASSES),
                        "--num-steps", "4", "--vae", "none", "--out", str(out), "--no-progress", *extra)


@pytest.fixture
def sit_ckpt(tmp_path):
    """A tiny SiT's weights without a learned-sigma head (what the published sample.py assumes of a custom
    checkpoint): the CLI must read that off the file."""
    model = tiny_sit(learn_sigma=False)
    path = tmp_path / "tiny-sit.pt"
    dit_fast.save_checkpoint(model, str(path))
    return model, path


def _latents(out):
    import numpy as np

    with np.load(out / "latents.npz") as z:
        return torch.from_numpy(z["arr_0"]), z["labels"].tolist()


def test_cli_sit_samples_what_sample_gives_and_records_the_flow_settings(tmp_path, sit_ckpt):
    import json

    from dit_fast import sample_cli

    model, ckpt = sit_ckpt
    out = tmp_path / "out"
    flags = ("--mode", "sde", "--sampling-method", "Heun", "--last-step", "Tweedie", "--last-step-size", "0.1",
             "--cfg-scale", "3", "--cfg-interval", "0.2,0.9", "--class-labels", "1,7,4", "--batch-size", "2",
             "--seed", "5")
    assert sample_cli.run(sit_args(out, ckpt, *flags)) == 0
    got, labels = _latents(out)
    assert got.shape == (3, 4, 8, 8) and labels == [1, 7, 4]
    want = torch.cat([
        sample(model, labels[j * 2: j * 2 + 2], num_steps=4, cfg_scale=3.0, sampler="sde", sampling_method="Heun",
               last_step="Tweedie", last_step_size=0.1, cfg_interval=(0.2, 0.9), backend="auto",
               generator=torch.Generator().manual_seed(5 + j)) for j in range(2)])
    assert rel_err(got, want) <= 1e-5  # the CLI's model runs backend "auto", this one "torch"
    record = json.loads((out / "run.json").read_text())
    assert {k: record[k] for k in ("mode", "sampling_method", "last_step", "last_step_size", "cfg_interval",
                                   "diffusion_form", "path_type", "prediction")} == {
        "mode": "sde", "sampling_method": "Heun", "last_step": "Tweedie", "last_step_size": 0.1,
        "cfg_interval": [0.2, 0.9], "diffusion_form": "sigma", "path_type": "Linear", "prediction": "velocity"}

    # Resumable: a lost shard is sampled again, the same; another flow setting into the same --out is refused.
    (out / "shards" / "batch_000001.npz").unlink()
    sample_cli.run(sit_args(out, ckpt, *flags))
    assert torch.equal(_latents(out)[0], got)
    for other in (("--last-step", "Mean"), ("--sampling-method", "Euler"), ("--cfg-interval", "0.2")):
        changed = list(flags)
        changed[changed.index(other[0]) + 1] = other[1]
        with pytest.raises(SystemExit, match=f"other settings \\({other[0][2:].replace('-', '_')}\\)"):
            sample_cli.run(sit_args(out, ckpt, *changed))


def test_cli_sit_ode_grid_and_fid_npz_over_two_ranks(tmp_path, sit_ckpt, vae_dir, monkeypatch):
    import numpy as np

    from dit_fast import sample_cli

    _, ckpt = sit_ckpt
    flags = ("--mode", "ode", "--sampling-method", "heun2", "--timestep-shift", "0.3", "--num-samples", "3",
             "--batch-size", "2")
    single = tmp_path / "single"
    sample_cli.run(_with(sit_args(single, ckpt, *flags), vae=vae_dir))
    with np.load(single / "samples.npz") as z:
        arr, labels = z["arr_0"], z["labels"]
    assert arr.dtype == np.uint8 and arr.shape == (3, 64, 64, 3) and arr.std() > 0
    assert (single / "grid.png").exists()
    sharded = tmp_path / "sharded"
    for rank in (1, 0):  # two ranks one after the other, rank 0 last to merge (as the DiT CLI test does)
        monkeypatch.setattr(sample_cli, "_dist", lambda r=rank: (r, 2, None))
        monkeypatch.setattr(sample_cli, "_barrier", lambda world: None)
        sample_cli.run(_with(sit_args(sharded, ckpt, *flags), vae=vae_dir))
    with np.load(sharded / "samples.npz") as z:
        assert np.array_equal(z["arr_0"], arr) and np.array_equal(z["labels"], labels)


def _with(args, **changes):
    for k, v in changes.items():
        setattr(args, k, v)
    return args


@pytest.mark.parametrize("argv,message", [
    (("--model", "DiT-S/2", "--mode", "ode"), r"--mode: SiT \(flow\) sampling options, but --model DiT-S/2 is a DiT"),
    (("--model", "DiT-S/2", "--path-type", "GVP", "--last-step", "None"),
     r"--last-step, --path-type: SiT \(flow\) sampling options"),
    (("--sampler", "ddim"), r"--sampler: a DiT \(DDPM\) sampling option, but --model SiT-S/2 is a SiT"),
    (("--eta", "0.5"), r"--eta: a DiT \(DDPM\) sampling option"),
    (("--last-step", "Mean"), r"--last-step: not an option of --mode ode"),
    (("--mode", "sde", "--timestep-shift", "0.3"), r"--timestep-shift: not an option of --mode sde"),
    (("--sampling-method", "dopri5"), r"--sampling-method for --mode ode must be one of euler, heun2"),
    (("--num-steps", "1"), r"--num-steps must be >= 2 for a SiT"),
])
def test_cli_options_of_the_other_family_are_refused(tmp_path, argv, message):
    from dit_fast import sample_cli

    args = parse_sample("--model", "SiT-S/2", "--random-init", "--depth", "1", "--hidden-size", "32", "--num-heads",
                        "2", "--image-size", "64", "--num-classes", "10", "--num-steps", "3", "--vae", "none",
                        "--out", str(tmp_path), "--no-progress", *argv)
    with pytest.raises(SystemExit, match=message):
        sample_cli.run(args)
    assert not (tmp_path / "run.json").exists()


def test_cli_refuses_a_bad_cfg_interval(capsys):
    for text in ("0.9,0.1", "a", "0.1,0.2,0.3", "nan"):
        with pytest.raises(SystemExit):
            parse_sample("--random-init", "--out", "x", "--cfg-interval", text)
        assert "argument --cfg-interval: expected a time S or a pair LOW,HIGH" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- benchmarks/train.py
TINY_TRAIN = tiny_train_argv("SiT-S/2")


@pytest.fixture(scope="module")
def train():
    return load_train_script("dit_fast_train_example_sit")


@pytest.mark.parametrize("objective", [[], ["--use-lognorm", "--use-cosine-loss"],
                                       ["--path-type", "GVP", "--prediction", "noise", "--loss-weight", "likelihood"]],
                         ids=["linear-velocity", "lognorm-cosine", "gvp-noise-likelihood"])
def test_train_sit_resumes_as_the_uninterrupted_run(tmp_path, train, objective):
    common = TINY_TRAIN + objective + ["--ckpt-every", "2", "--lr", "1e-3", "--max-steps", "3"]
    straight = train.main(common + ["--results-dir", str(tmp_path / "a")])
    exp = "000-SiT-S-2-" + "-".join([objective[objective.index(f) + 1] if f in objective else d for f, d in
                                     (("--path-type", "Linear"), ("--prediction", "velocity"),
                                      ("--loss-weight", "None"))])
    assert straight["experiment_dir"] == str(tmp_path / "a" / exp), "named as the published SiT train.py names it"
    assert straight["step"] == 3 and all(map(torch.isfinite, torch.tensor(straight["losses"])))
    first = tmp_path / "a" / exp / "checkpoints" / "0000002.pt"
    resumed = train.main(common + ["--results-dir", str(tmp_path / "b"), "--resume", str(first)])
    assert resumed["losses"] == straight["losses"][2:], "a resumed run repeats the uninterrupted one"
    a, b = load_saved(tmp_path / "a" / exp / "checkpoints" / "0000003.pt"), load_saved(resumed["checkpoint"])
    assert set(a) == {"model", "ema", "opt", "args", "step"} and a["args"]["model"] == "SiT-S/2"
    assert a["args"]["use_lognorm"] == ("--use-lognorm" in objective)
    assert a["args"]["path_type"] == ("GVP" if "GVP" in objective else "Linear")
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(b[key][name], tensor), f"{key}.{name}"
    # The EMA weights load into a SiT for sampling.
    model = train.build_model(train.parse_args(common), "cpu")
    assert isinstance(model, dit_fast.SiT)
    dit_fast.load_checkpoint(model, resumed["checkpoint"])


def test_the_sit_loss_is_the_transport_loss(train):
    model = train.build_model(train.parse_args(TINY_TRAIN), "cpu").eval()  # eval: no label dropout draws
    randomize_weights_(model)
    x, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 5, 9])
    for cosine in (False, True):
        transport = create_transport("Linear", "velocity", use_cosine_loss=cosine)
        torch.manual_seed(11)
        loss = train.training_loss(model, transport, x, y, torch.Generator())
        torch.manual_seed(11)
        with torch.no_grad():
            terms = transport.training_losses(model, x, dict(y=y))
        want = terms["loss"].mean() + (terms["cos_loss"].mean() if cosine else 0)
        assert "cos_loss" in terms if cosine else "cos_loss" not in terms
        assert loss.item() == pytest.approx(want.item(), rel=1e-6)
        model.zero_grad()
        loss.backward()
        assert model.final_layer.linear.weight.grad.abs().sum() > 0
    args = train.parse_args(TINY_TRAIN + ["--path-type", "VP", "--prediction", "score", "--train-eps", "1e-4"])
    transport = train.create_objective(args)
    assert transport.path_type.name == "VP" and transport.model_type.name == "SCORE" and transport.train_eps == 1e-4


def test_a_resume_with_another_objective_is_refused(tmp_path, train, capsys):
    sit_run = train.main(TINY_TRAIN + ["--max-steps", "1", "--results-dir", str(tmp_path / "sit")])
    sit_ckpt = sit_run["checkpoint"]
    with pytest.raises(SystemExit, match=r"another objective: prediction 'velocity' \(this run: 'noise'\)"):
        train.main(TINY_TRAIN + ["--max-steps", "2", "--prediction", "noise", "--resume", sit_ckpt,
                                 "--results-dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match=r"another objective: use_lognorm False \(this run: True\)"):
        train.main(TINY_TRAIN + ["--max-steps", "2", "--use-lognorm", "--resume", str(tmp_path / "sit"),
                                 "--results-dir", str(tmp_path / "x")])
    # A DiT and a SiT of one config have the same weights' shapes: only the recorded objective tells them apart.
    dit_args = ["--model", "DiT-S/2"] + TINY_TRAIN[2:]
    with pytest.raises(SystemExit, match="another objective: objective 'SiT transport' .this run: 'DDPM hybrid"):
        train.main(dit_args + ["--max-steps", "2", "--resume", sit_ckpt, "--results-dir", str(tmp_path / "x")])
    dit_run = train.main(dit_args + ["--max-steps", "1", "--results-dir", str(tmp_path / "dit")])
    with pytest.raises(SystemExit, match="another objective: objective 'DDPM hybrid.*this run: 'SiT transport'"):
        train.main(TINY_TRAIN + ["--max-steps", "2", "--resume", dit_run["checkpoint"],
                                 "--results-dir", str(tmp_path / "x")])
    # Through a results directory of both: the other objective's experiment is skipped, saying why.
    import shutil

    shutil.copytree(tmp_path / "sit" / "000-SiT-S-2-Linear-velocity-None", tmp_path / "dit" / "001-SiT-S-2-x")
    capsys.readouterr()
    again = train.main(dit_args + ["--max-steps", "2", "--resume", str(tmp_path / "dit"),
                                   "--results-dir", str(tmp_path / "dit")])
    out = capsys.readouterr().out
    assert "skipping " + str(tmp_path / "dit" / "001-SiT-S-2-x" / "checkpoints") in out and "another objective" in out
    assert again["step"] == 2 and len(again["losses"]) == 1
    # Transport options on a DiT run are refused.
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train.parse_args(dit_args + ["--path-type", "GVP", "--use-lognorm"])
    err = capsys.readouterr().err
    assert "--path-type, --use-lognorm: SiT (transport) options, but --model DiT-S/2 is a DiT" in err
    with pytest.raises(SystemExit):
        train.parse_args(TINY_TRAIN + ["--prediction", "score", "--use-cosine-loss"])
    assert "--use-cosine-loss compares velocities: it needs --prediction velocity" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(TINY_TRAIN + ["--loss-weight", "likelihood"])
    assert "--loss-weight likelihood weights the noise and score losses" in capsys.readouterr().err


def test_a_non_finite_sit_loss_stops_before_the_weights_change(tmp_path, train, monkeypatch):
    real, calls = train.training_loss, [0]

    def loss(*args):
        calls[0] += 1
        return real(*args) * (float("nan") if calls[0] == 2 else 1.0)

    monkeypatch.setattr(train, "training_loss", loss)
    with pytest.raises(SystemExit, match=r"^step 2: the loss is nan .* last good checkpoint is .*0000001\.pt"):
        train.main(TINY_TRAIN + ["--ckpt-every", "1", "--max-steps", "3", "--results-dir", str(tmp_path)])


def test_the_sit_loss_decreases_on_a_tiny_data_set(tmp_path, train):
    """Eight latents near a constant c: the velocity target x1 - x0 has mean c, which the zero-initialized
    output must learn (the loss starts near c^2 + 1 and falls toward 1 as it does)."""
    import numpy as np

    data = tmp_path / "latents"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    latents = 1.5 + 0.1 * torch.randn(8, 4, 8, 8, generator=g)
    torch.save({"latents": latents, "labels": torch.arange(8)}, data / "a.pt")
    result = train.main(TINY_TRAIN + ["--data", str(data), "--global-batch-size", "8", "--lr", "1e-3",
                                      "--precision", "fp32", "--max-steps", "30", "--results-dir", str(tmp_path / "r")])
    losses = np.array(result["losses"])
    assert losses[:3].mean() > 2.5, losses.round(3).tolist()
    assert losses[-5:].mean() < 0.7 * losses[:5].mean(), losses.round(3).tolist()


def test_train_then_sample_a_sit_with_the_transport_it_learned(tmp_path, train):
    """benchmarks/train.py's checkpoint samples with `dit-fast sample`; a transport other than the one its
    args record (a noise-prediction GVP model sampled as Linear velocity) is refused, not sampled wrong."""
    from dit_fast import sample_cli

    run = train.main(TINY_TRAIN + ["--path-type", "GVP", "--prediction", "noise", "--max-steps", "1",
                                   "--results-dir", str(tmp_path / "r")])
    ckpt = run["checkpoint"]
    with pytest.raises(SystemExit, match=r"was trained with --path-type GVP --prediction noise .*but this run samples "
                                         r"with --path-type Linear, --prediction velocity"):
        sample_cli.run(sit_args(tmp_path / "a", ckpt, "--hidden-size", "64"))
    assert not (tmp_path / "a" / "run.json").exists()
    args = sit_args(tmp_path / "b", ckpt, "--hidden-size", "64", "--path-type", "GVP", "--prediction", "noise",
                    "--class-labels", "1,2")
    assert sample_cli.run(args) == 0
    got, _ = _latents(tmp_path / "b")
    model = train.build_model(train.parse_args(TINY_TRAIN), "cpu").eval()
    dit_fast.load_checkpoint(model, ckpt)  # the EMA weights, with train.py's learned-sigma head
    want = sample(model, [1, 2], num_steps=4, cfg_scale=4.0, path_type="GVP", prediction="noise",
                  generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(got).all() and rel_err(got, want) <= 1e-5
