"""Faults around the files dit_fast writes and reads (issue 19): symlinked destinations, file modes, a
really full disk, temporaries left by a SIGKILLed writer, and files that are not checkpoints.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dit_fast import atomic, reference
from dit_fast.atomic import atomic_write, remove_stale_temporaries, write_text
from dit_fast.checkpoint import (
    CheckpointFileError,
    StateDictMismatchError,
    load_checkpoint,
    save_checkpoint,
    torch_save_atomic,
)

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)


def _small(**overrides):
    return reference.DiT(**(SMALL | overrides))


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _temps(directory) -> list[str]:
    return sorted(p.name for p in Path(directory).iterdir() if p.name.endswith(".tmp"))


# -- symlinks (item 5) -----------------------------------------------------------------------------


@pytest.mark.parametrize("writer", ["text", "pt", "safetensors"])
def test_saving_through_a_symlink_writes_its_target_and_keeps_the_link(tmp_path, writer):
    real_dir = tmp_path / "store"
    real_dir.mkdir()
    suffix = {"text": ".json", "pt": ".pt", "safetensors": ".safetensors"}[writer]
    target = real_dir / f"weights{suffix}"
    link = tmp_path / f"latest{suffix}"
    link.symlink_to(os.path.relpath(target, tmp_path))  # relative, as `ln -s` makes them

    def save(version):
        if writer == "text":
            write_text(link, json.dumps({"version": version}))
        else:
            model = _small()
            torch.nn.init.constant_(model.x_embedder.proj.bias, float(version))
            save_checkpoint(model, link)

    def version_in(path):
        if writer == "text":
            return json.loads(Path(path).read_text())["version"]
        return float(load_checkpoint(_small(), path).x_embedder.proj.bias[0].detach())

    for version in (1, 2):  # 1: a dangling link gets its target created; 2: the target is replaced
        save(version)
        assert link.is_symlink(), "the link stays a link"
        assert os.readlink(link) == os.path.relpath(target, tmp_path), "and keeps pointing where it did"
        assert version_in(target) == version and version_in(link) == version
        assert sorted(p.name for p in tmp_path.iterdir()) == [link.name, "store"]
        assert sorted(p.name for p in real_dir.iterdir()) == [target.name], "no temporary file left"


# -- file modes (item 9) ---------------------------------------------------------------------------


@pytest.fixture
def umask():
    """Set the process umask for one test, restored after."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_a_new_file_follows_the_umask_and_a_replaced_file_keeps_its_mode(tmp_path, umask, mask):
    umask(mask)
    new = tmp_path / "new.pt"
    torch_save_atomic({"w": torch.zeros(2)}, new)
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~mask
    write_text(tmp_path / "run.json", "{}")
    assert stat.S_IMODE((tmp_path / "run.json").stat().st_mode) == 0o666 & ~mask

    shared = tmp_path / "shared.safetensors"
    save_checkpoint(_small(), shared)
    os.chmod(shared, 0o644)  # made readable for the group and the world on purpose
    save_checkpoint(_small(), shared)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o644, "replacing a file keeps its mode"
    os.chmod(shared, 0o600)
    save_checkpoint(_small(), shared)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o600


# -- a really full disk (item 13) ------------------------------------------------------------------

FULL_DISK_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    from dit_fast.atomic import DiskFullError, write_text
    from dit_fast.checkpoint import save_checkpoint, torch_save_atomic
    from dit_fast import reference
    d = sys.argv[1]
    torch_save_atomic({"w": torch.arange(1000.0)}, d + "/ckpt.pt")
    write_text(d + "/run.json", "old")
    report = {}
    for name, save in [
        ("pt", lambda: torch_save_atomic({"w": torch.zeros(1_000_000)}, d + "/ckpt.pt")),
        ("text", lambda: write_text(d + "/run.json", "x" * 2_000_000)),
        ("safetensors", lambda: save_checkpoint(reference.DiT(input_size=32, hidden_size=256, depth=2,
                                                              num_heads=2, num_classes=10), d + "/w.safetensors")),
    ]:
        try:
            save()
            report[name] = "saved"
        except DiskFullError as e:
            report[name] = {"errno": e.errno, "message": str(e), "cause": type(e.__cause__).__name__}
    report["files"] = sorted(os.listdir(d))
    report["ckpt"] = torch.load(d + "/ckpt.pt", weights_only=True)["w"].tolist() == list(map(float, range(1000)))
    report["run.json"] = open(d + "/run.json").read()
    print("REPORT " + json.dumps(report))
""")


def test_a_full_disk_says_so_and_keeps_the_old_file(tmp_path):
    """A real full filesystem: a 1 MiB tmpfs mounted in a private mount namespace (needs root or user
    namespaces; skipped where neither is allowed)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount a small tmpfs")
    small = tmp_path / "small"
    small.mkdir()
    script = tmp_path / "full.py"
    script.write_text(FULL_DISK_SCRIPT)
    mount = f"mount -t tmpfs -o size=1m tmpfs {small} || exit 77; exec {sys.executable} {script} {small}"
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        proc = subprocess.run([*prefix, "sh", "-c", mount], capture_output=True, text=True, cwd=ROOT, timeout=300)
        refused = proc.returncode == 77 or "unshare failed" in proc.stderr or "not permitted" in proc.stderr
        if not refused:
            break
    else:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.split("REPORT ", 1)[1])
    for name in ("pt", "text", "safetensors"):
        got = report[name]
        assert isinstance(got, dict), f"{name}: {got}"
        assert got["errno"] == 28 and "no space left on the device" in got["message"], got
        assert f"{small}" in got["message"] and "keeps its previous content" in got["message"]
    assert "unexpected pos" in report["pt"]["message"], "torch.save's own words are kept, after the diagnosis"
    assert report["files"] == ["ckpt.pt", "run.json"], "no temporary file, no partial safetensors"
    assert report["ckpt"] and report["run.json"] == "old", "the previous files are intact"


# -- temporaries of killed writers (item 17) -------------------------------------------------------

WRITER_SCRIPT = textwrap.dedent("""
    import sys, time
    from dit_fast.atomic import atomic_write
    with atomic_write(sys.argv[1], "wb") as f:
        f.write(b"half a checkpoint" * 1000)
        f.flush()
        print("writing", flush=True)
        time.sleep(120)
""")


def _start_writer(path):
    child = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(path)], stdout=subprocess.PIPE, text=True,
                             cwd=ROOT)
    assert child.stdout.readline().strip() == "writing"
    return child


def test_temporaries_of_sigkilled_writers_are_removed_and_live_ones_kept(tmp_path):
    killed = _start_writer(tmp_path / "a.pt")
    live = _start_writer(tmp_path / "b.pt")
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        temps = _temps(tmp_path)
        assert len(temps) == 2 and all(".dit_fast-" in t for t in temps), temps
        dead_temp = next(t for t in temps if t.startswith(".a.pt."))
        live_temp = next(t for t in temps if t.startswith(".b.pt."))
        assert f"-{killed.pid}.tmp" in dead_temp and f"-{live.pid}.tmp" in live_temp, "the writer's pid is in the name"
        unrelated = [".c.pt.x1y2z3.tmp", f".d.pt.abc.dit_fast-otherhost-{_dead_pid()}.tmp", "notes.tmp"]
        for name in unrelated:  # no pid, another host's, not ours: never touched
            (tmp_path / name).write_bytes(b"keep")

        assert remove_stale_temporaries(tmp_path) == [str(tmp_path / dead_temp)]
        assert _temps(tmp_path) == sorted([live_temp, *unrelated]), "the live writer's temporary stays"
        assert not (tmp_path / "a.pt").exists()
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait(timeout=30)
    # The next write into the directory from a new process sweeps what the second kill left.
    subprocess.run([sys.executable, "-c", "import sys; from dit_fast.atomic import write_text; "
                    "write_text(sys.argv[1], 'done')", str(tmp_path / "e.txt")], check=True, cwd=ROOT)
    assert _temps(tmp_path) == sorted(unrelated)
    assert (tmp_path / "e.txt").read_text() == "done"


def test_stale_temporary_pattern_is_what_atomic_writes(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (seen.append(src), real_replace(src, dst)))
    with atomic_write(tmp_path / "x.bin") as f:
        f.write(b"1")
    [tmp] = seen
    name = os.path.basename(tmp)
    assert atomic._TEMP_NAME.match(name) and name.startswith(".x.bin.") and f"-{os.getpid()}.tmp" in name
    # This process's own temporaries are never stale, whatever os.kill says.
    (tmp_path / name).write_bytes(b"")
    assert remove_stale_temporaries(tmp_path) == []


# -- files that are not checkpoints (item 14) ------------------------------------------------------


def _not_checkpoints(tmp_path) -> dict:
    cases = {}
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    cases["empty"] = (empty, r"is empty \(0 bytes\), expected a checkpoint")
    text = tmp_path / "notes.pt"
    text.write_text("epoch 1: loss 0.15\n")
    cases["text"] = (text, r"is a text file, not a checkpoint; it starts with 'epoch 1: loss 0.15'")
    lfs = tmp_path / "lfs.pt"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 1234\n")
    cases["lfs"] = (lfs, r"Git LFS pointer.*git lfs pull")
    html = tmp_path / "download.pt"
    html.write_text("<!DOCTYPE html><html><body>403 Forbidden</body></html>")
    cases["html"] = (html, r"an HTML page")
    st_as_pt = tmp_path / "st.pt"
    save_checkpoint(_small(), tmp_path / "real.safetensors")
    shutil.copy(tmp_path / "real.safetensors", st_as_pt)
    cases["safetensors named .pt"] = (st_as_pt, r"holds a safetensors file .* but its name says torch\.save file"
                                                r".*rename it to end in \.safetensors")
    pt_as_st = tmp_path / "pt.safetensors"
    save_checkpoint(_small(), tmp_path / "real.pt")
    shutil.copy(tmp_path / "real.pt", pt_as_st)
    cases["pt named .safetensors"] = (pt_as_st, r"holds a torch\.save file .* rename it to end in \.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((tmp_path / "real.pt").read_bytes()[:3000])
    cases["truncated pt"] = (truncated, r"is not a readable checkpoint \(truncated or corrupt\?\)")
    truncated_st = tmp_path / "truncated.safetensors"
    truncated_st.write_bytes((tmp_path / "real.safetensors").read_bytes()[:3000])
    cases["truncated safetensors"] = (truncated_st, r"(not a readable safetensors file|neither a torch\.save)")
    binary = tmp_path / "noise.pt"
    binary.write_bytes(bytes(range(256)) * 4)
    cases["binary"] = (binary, r"is neither a torch\.save file \(zip or pickle\) nor a safetensors file")
    folder = tmp_path / "folder"
    folder.mkdir()
    cases["directory"] = (folder, r"is a directory, expected a checkpoint file")
    diffusers_dir = tmp_path / "transformer"
    diffusers_dir.mkdir()
    (diffusers_dir / "config.json").write_text("{}")
    (diffusers_dir / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    cases["diffusers directory"] = (diffusers_dir, r"a diffusers model folder.*convert_diffusers")
    return cases


def test_load_checkpoint_says_what_a_file_is_when_it_is_no_checkpoint(tmp_path):
    for case, (path, want) in _not_checkpoints(tmp_path).items():
        with pytest.raises(CheckpointFileError, match=want) as e:
            load_checkpoint(_small(), path)
        assert repr(str(path)) in str(e.value), f"{case}: the message names the file"
        assert isinstance(e.value, ValueError)
    # and the real ones still load
    load_checkpoint(_small(), tmp_path / "real.pt")
    load_checkpoint(_small(), tmp_path / "real.safetensors")


# -- the config a checkpoint was made for (item 16) ------------------------------------------------


def test_a_checkpoint_of_another_config_names_the_dimension_that_differs():
    wider = _small(hidden_size=64).state_dict()
    with pytest.raises(StateDictMismatchError) as e:
        load_checkpoint(_small(), wider)
    hint = str(e.value).split("hint: ", 1)[1]
    assert "hidden size: checkpoint 64, model 32" in hint
    assert "input_size" not in hint, "pos_embed differs only in width: the input size is not to blame"
    deeper = _small(depth=3).state_dict()
    with pytest.raises(StateDictMismatchError, match=r"hint: .*depth: checkpoint 3, model 2"):
        load_checkpoint(_small(), deeper)
    other_classes = _small(num_classes=20).state_dict()
    with pytest.raises(StateDictMismatchError, match=r"num_classes \(\+1 null class\): checkpoint 21, model 11"):
        load_checkpoint(_small(), other_classes)
    larger = _small(input_size=16).state_dict()
    with pytest.raises(StateDictMismatchError, match=r"input_size: checkpoint 8x8 patches, model 4x4 patches"):
        load_checkpoint(_small(), larger)
