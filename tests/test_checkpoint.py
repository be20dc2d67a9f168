"""load_checkpoint / save_checkpoint: formats, wrappers, prefixes, strictness, refusing unsafe pickles,
atomic saves (full disk, kill mid-save) and finding the newest training checkpoint that loads."""
import argparse
import errno

import pytest
import torch

import dit_fast
from dit_fast import reference
from dit_fast.atomic import DiskFullError
from dit_fast.checkpoint import StateDictMismatchError, UnsafeCheckpointError, load_checkpoint, save_checkpoint
from dit_fast.testing import randomize_weights_
from tolerances import rel_err

SMALL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)


def _small_ref(**overrides):
    return randomize_weights_(reference.DiT(**{**SMALL, **overrides}))


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "dict"])
@pytest.mark.parametrize("target", ["reference", "fast"])
def test_round_trip(tmp_path, fmt, target):
    src = _small_ref()
    if fmt == "dict":
        source = src.state_dict()
    else:
        source = tmp_path / f"w.{fmt}"
        save_checkpoint(src, source)
    dst = reference.DiT(**SMALL) if target == "reference" else dit_fast.DiT(**SMALL, backend="torch")
    assert load_checkpoint(dst, source) is dst
    _assert_same_weights(src, dst)
    assert not dst.pos_embed.requires_grad


def test_pt_file_is_a_plain_state_dict(tmp_path):
    # The official format: a flat name -> tensor dict that torch.load(weights_only=True) reads.
    src = _small_ref()
    save_checkpoint(src, tmp_path / "w.pt")
    sd = torch.load(tmp_path / "w.pt", weights_only=True)
    assert list(sd) == list(src.state_dict()) and all(isinstance(v, torch.Tensor) for v in sd.values())


def test_safetensors_with_shared_and_strided_parameters(tmp_path):
    # safetensors rejects shared or non-contiguous storage unless save_checkpoint copies those tensors.
    src = _small_ref()
    src.blocks[1].mlp.fc1.weight = src.blocks[0].mlp.fc1.weight  # tied
    w = src.blocks[0].attn.proj.weight
    w.data = w.data.t().contiguous().t()  # same values, transposed strides
    assert not w.is_contiguous()
    save_checkpoint(src, tmp_path / "w.safetensors")
    dst = load_checkpoint(reference.DiT(**SMALL), tmp_path / "w.safetensors")
    _assert_same_weights(src, dst)


def test_loaded_reference_weights_give_the_reference_outputs(tmp_path):
    ref = _small_ref().double().eval()
    save_checkpoint(ref, tmp_path / "ref.pt")
    fast = dit_fast.DiT(**SMALL, backend="torch").double().eval()
    load_checkpoint(fast, tmp_path / "ref.pt", strict=True)
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    t, y = torch.rand(3) * 999, torch.randint(0, 11, (3,))
    with torch.no_grad():
        want, got = ref(x, t, y), fast(x, t, y)
    assert want.abs().max() > 0.1  # randomized weights: the test would notice a missing tensor
    assert rel_err(got, want) < 1e-12


def _training_checkpoint():
    model, ema = _small_ref(), _small_ref()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.randint(0, 10, (2,))).square().mean().backward()
    opt.step()
    ckpt = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
            "args": argparse.Namespace(model="DiT-S/2", image_size=64, global_batch_size=8)}
    return ckpt, model, ema


@pytest.mark.parametrize("in_memory", [False, True])
def test_training_checkpoint_unwraps_ema_by_default(tmp_path, in_memory):
    ckpt, model, ema = _training_checkpoint()
    if not in_memory:
        torch.save(ckpt, tmp_path / "0001000.pt")  # official train.py layout, args is a Namespace
        ckpt = tmp_path / "0001000.pt"
    _assert_same_weights(ema, load_checkpoint(reference.DiT(**SMALL), ckpt))
    _assert_same_weights(ema, load_checkpoint(reference.DiT(**SMALL), ckpt, key="ema"))
    _assert_same_weights(model, load_checkpoint(reference.DiT(**SMALL), ckpt, key="model"))
    with pytest.raises(KeyError, match=r"key='weights'.*model, ema, opt, args"):
        load_checkpoint(reference.DiT(**SMALL), ckpt, key="weights")


def test_model_only_wrapper_and_unknown_wrapper():
    src = _small_ref()
    _assert_same_weights(src, load_checkpoint(reference.DiT(**SMALL), {"model": src.state_dict(), "step": 3}))
    with pytest.raises(ValueError, match=r"top-level keys are state_dict, step.*key="):
        load_checkpoint(reference.DiT(**SMALL), {"state_dict": src.state_dict(), "step": 3})
    load_checkpoint(dst := reference.DiT(**SMALL), {"state_dict": src.state_dict(), "step": 3}, key="state_dict")
    _assert_same_weights(src, dst)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped(prefix):
    src = _small_ref()
    sd = {prefix + k: v for k, v in src.state_dict().items()}
    _assert_same_weights(src, load_checkpoint(dit_fast.DiT(**SMALL, backend="torch"), sd))
    _assert_same_weights(src, load_checkpoint(reference.DiT(**SMALL), {"ema": sd}))


def test_compiled_model_loads_and_saves_without_prefix(tmp_path):
    src = _small_ref()
    compiled = torch.compile(reference.DiT(**SMALL))  # lazy: nothing is compiled here
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    assert load_checkpoint(compiled, src.state_dict()) is compiled
    _assert_same_weights(src, compiled._orig_mod)
    save_checkpoint(compiled, tmp_path / "c.safetensors")
    _assert_same_weights(src, load_checkpoint(reference.DiT(**SMALL), tmp_path / "c.safetensors"))


def test_data_parallel_wrapper_loads_into_the_inner_model():
    src = _small_ref()
    wrapped = torch.nn.DataParallel(dit_fast.DiT(**SMALL, backend="torch"))
    assert load_checkpoint(wrapped, src.state_dict()) is wrapped
    _assert_same_weights(src, wrapped.module)


def test_a_prefix_on_only_some_keys_is_an_error():
    sd = _small_ref().state_dict()
    sd["module.pos_embed"] = sd.pop("pos_embed")
    want = r"missing keys \(1\): pos_embed\n.*unexpected keys \(1\): module.pos_embed"
    with pytest.raises(StateDictMismatchError, match=want):
        load_checkpoint(reference.DiT(**SMALL), sd)


def test_strict_errors_list_missing_unexpected_and_shapes():
    model = reference.DiT(**SMALL)
    sd = _small_ref().state_dict()
    del sd["blocks.1.mlp.fc2.bias"]
    sd["blocks.2.attn.qkv.weight"] = torch.zeros(96, 32)
    sd["y_embedder.embedding_table.weight"] = torch.zeros(1001, 32)
    with pytest.raises(StateDictMismatchError) as e:
        load_checkpoint(model, sd)
    msg = str(e.value)
    assert "missing keys (1): blocks.1.mlp.fc2.bias" in msg
    assert "unexpected keys (1): blocks.2.attn.qkv.weight" in msg
    assert "shape mismatches (1): y_embedder.embedding_table.weight (expected [11, 32], got [1001, 32])" in msg


def test_long_key_lists_are_truncated():
    sd = {f"extra.{i}": torch.zeros(1) for i in range(25)}
    with pytest.raises(StateDictMismatchError) as e:
        load_checkpoint(reference.DiT(**SMALL), sd)
    msg = str(e.value)
    assert "unexpected keys (25): extra.0, " in msg and "extra.9, ... and 15 more" in msg and "extra.10" not in msg
    n = len(reference.DiT(**SMALL).state_dict())
    assert f"missing keys ({n}): pos_embed, " in msg and f"... and {n - 10} more" in msg


def test_missing_pos_embed_is_an_error_unless_not_strict():
    src = _small_ref()
    sd = src.state_dict()
    del sd["pos_embed"]
    with pytest.raises(StateDictMismatchError, match=r"missing keys \(1\): pos_embed\n.*hint: pos_embed"):
        load_checkpoint(reference.DiT(**SMALL), sd)
    dst = reference.DiT(**SMALL)
    table = dst.pos_embed.detach().clone()
    with pytest.warns(UserWarning, match="missing keys \\(1\\): pos_embed"):
        load_checkpoint(dst, sd, strict=False)
    assert torch.equal(dst.pos_embed, table)
    assert torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_checkpoint_for_another_input_size_names_pos_embed():
    sd = _small_ref(input_size=16).state_dict()
    for strict in (True, False):
        want = r"(?s)pos_embed \(expected \[1, 16, 32\], got \[1, 64, 32\]\).*input_size"
        with pytest.raises(StateDictMismatchError, match=want):
            load_checkpoint(reference.DiT(**SMALL), sd, strict=strict)


def test_diffusers_state_dict_gets_a_hint():
    sd = {"transformer_blocks.0.attn1.to_q.weight": torch.zeros(1)}
    with pytest.raises(StateDictMismatchError, match="from_diffusers"):
        load_checkpoint(reference.DiT(**SMALL), sd)


class _RunsCodeWhenUnpickled:
    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        # What a malicious checkpoint does: unpickling calls an arbitrary callable.
        return (exec, (f"open({self.sentinel!r}, 'w').write('ran')",))


def _function_in_checkpoint():
    pass


@pytest.mark.parametrize("payload", ["code", "function"])
def test_refuses_to_unpickle_arbitrary_objects(tmp_path, payload):
    sentinel = tmp_path / "code_ran"
    bad = _RunsCodeWhenUnpickled(sentinel) if payload == "code" else _function_in_checkpoint
    path = tmp_path / "evil.pt"
    torch.save({"model": _small_ref().state_dict(), "extra": bad}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pt.*refusing to unpickle"):
        load_checkpoint(reference.DiT(**SMALL), path)
    assert not sentinel.exists()
    if payload == "code":
        # The payload is live: a plain unpickle would have run it.
        torch.load(path, weights_only=False)
        assert sentinel.read_text() == "ran"


def test_bad_arguments():
    model = reference.DiT(**SMALL)
    with pytest.raises(TypeError, match="path_or_state_dict must be a file path"):
        load_checkpoint(model, 42)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        load_checkpoint(model.state_dict(), model.state_dict())
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_checkpoint(model, "/nonexistent/DiT-XL-2-256x256.pt")
    with pytest.raises(ValueError, match=r"must end in \.safetensors, \.pt or \.pth"):
        save_checkpoint(model, "weights.bin")


def _published_dit_xl2(input_size):
    """Names and shapes of the official DiT-XL/2 checkpoints, written from the published architecture."""
    D, p, C, out = 1152, 2, 4, 8
    shapes = {
        "pos_embed": (1, (input_size // p) ** 2, D),
        "x_embedder.proj.weight": (D, C, p, p),
        "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256),
        "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D),
        "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (1001, D),
    }
    for i in range(28):
        for name, rows, cols in [("attn.qkv", 3 * D, D), ("attn.proj", D, D), ("mlp.fc1", 4 * D, D),
                                 ("mlp.fc2", D, 4 * D), ("adaLN_modulation.1", 6 * D, D)]:
            shapes[f"blocks.{i}.{name}.weight"] = (rows, cols)
            shapes[f"blocks.{i}.{name}.bias"] = (rows,)
    shapes.update({
        "final_layer.linear.weight": (p * p * out, D),
        "final_layer.linear.bias": (p * p * out,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D),
        "final_layer.adaLN_modulation.1.bias": (2 * D,),
    })
    return shapes


@pytest.mark.parametrize("image_size", [256, 512])
def test_official_dit_xl2_checkpoint_layout_loads_strictly(image_size):
    # Meta tensors: the 675M-parameter model is checked without allocating it.
    published = _published_dit_xl2(image_size // 8)
    official = {k: torch.empty(s, device="meta") for k, s in published.items()}
    for cls in (reference.DiT_models, dit_fast.DiT_models):
        with torch.device("meta"):
            model = cls["DiT-XL/2"](input_size=image_size // 8)
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == published
        if image_size == 256:
            assert sum(p.numel() for p in model.parameters()) == 675_129_632
        load_checkpoint(model, {"module." + k: v for k, v in official.items()}, strict=True)


def test_model_built_on_meta_takes_the_checkpoint_tensors():
    src = _small_ref()
    with torch.device("meta"):
        model = dit_fast.DiT(**SMALL, backend="torch")
    load_checkpoint(model, src.state_dict())
    assert not any(p.is_meta for p in model.parameters())
    _assert_same_weights(src, model)
    assert not model.pos_embed.requires_grad and model.blocks[0].attn.qkv.weight.requires_grad


def test_official_512_checkpoint_into_256_model_names_the_shapes():
    official_512 = {k: torch.empty(s, device="meta") for k, s in _published_dit_xl2(64).items()}
    with torch.device("meta"):
        model = dit_fast.DiT_models["DiT-XL/2"](input_size=32)
    with pytest.raises(StateDictMismatchError, match=r"pos_embed \(expected \[1, 256, 1152\], got \[1, 1024, 1152\]\)"):
        load_checkpoint(model, official_512)


# -- atomic saves ----------------------------------------------------------------------------------


def _writer_that_fails_midway(error):
    """Stands in for torch.save / safetensors' save_file: writes part of a file, then fails."""

    def write(obj, f, *args, **kwargs):
        if hasattr(f, "write"):
            f.write(b"\x00" * 4096)
        else:
            with open(f, "wb") as out:
                out.write(b"\x00" * 4096)
        raise error

    return write


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk_full", "killed"])
def test_a_failed_save_leaves_the_previous_file_and_no_temp_file(tmp_path, monkeypatch, fmt, error):
    import safetensors.torch

    old = _small_ref()
    path = tmp_path / f"w.{fmt}"
    save_checkpoint(old, path)
    if fmt == "pt":
        monkeypatch.setattr(torch, "save", _writer_that_fails_midway(error))
    else:
        monkeypatch.setattr(safetensors.torch, "save_file", _writer_that_fails_midway(error))
    with pytest.raises(type(error)) as e:
        save_checkpoint(_small_ref(), path)
    if isinstance(error, OSError):  # a full disk says so, naming the file, with the writer's error as the cause
        assert isinstance(e.value, DiskFullError) and e.value.errno == errno.ENOSPC and e.value.__cause__ is error
        assert str(path) in str(e.value) and "no space left" in str(e.value)
    else:
        assert e.value is error, "the writer's own error surfaces"
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temporary file is left behind"
    _assert_same_weights(old, load_checkpoint(reference.DiT(**SMALL), path))


def test_save_writes_in_the_destination_directory_then_renames(tmp_path, monkeypatch):
    # The temporary file must be on the destination's filesystem for os.replace to be atomic.
    import os

    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (replaced.append((src, dst)), real_replace(src, dst)))
    save_checkpoint(_small_ref(), tmp_path / "w.pt")
    [(src, dst)] = replaced
    assert os.path.dirname(src) == str(tmp_path) and dst == str(tmp_path / "w.pt")


# -- training checkpoints --------------------------------------------------------------------------


def test_newest_training_checkpoint_skips_the_ones_that_do_not_load(tmp_path):
    from dit_fast.checkpoint import newest_training_checkpoint

    ckpt, _, _ = _training_checkpoint()
    ckpt = {**ckpt, "args": {"lr": 1e-4}, "step": 0}
    for step in (100, 200, 300, 400, 1000):
        torch.save({**ckpt, "step": step}, tmp_path / f"{step:07d}.pt")
    full = (tmp_path / "0001000.pt").read_bytes()
    (tmp_path / "0001000.pt").write_bytes(full[: len(full) // 3])  # truncated by a kill
    (tmp_path / "0000400.pt").write_bytes(b"")  # a full disk
    torch.save({"model": ckpt["model"]}, tmp_path / "0000300.pt")  # weights only: not resumable
    (tmp_path / "notes.pt").write_bytes(b"not a checkpoint name")  # ignored: not STEP.pt
    path, found, skipped = newest_training_checkpoint(tmp_path)
    assert path == tmp_path / "0000200.pt" and found["step"] == 200
    assert [(p.name, why.split(":")[0]) for p, why in skipped] == [
        ("0001000.pt", f"{str(tmp_path / '0001000.pt')!r} is not a readable checkpoint (truncated or corrupt?)"),
        ("0000400.pt", f"{str(tmp_path / '0000400.pt')!r} is empty (0 bytes), expected a checkpoint"),
        ("0000300.pt", f"{str(tmp_path / '0000300.pt')!r} is not a training checkpoint"),
    ]
    assert "lacks ema, opt, step" in skipped[2][1]
    for p in tmp_path.glob("0*.pt"):
        p.unlink()
    assert newest_training_checkpoint(tmp_path) == (None, None, [])
