"""What the tests of benchmarks/train.py and `dit-fast sample` runs share: the script loaded as a module, the
tiny model's arguments, a checkpoint file read back, the sample subcommand's arguments parsed."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "benchmarks" / "train.py"


def tiny_train_argv(model: str) -> list[str]:
    """benchmarks/train.py arguments of a one-block `model` of width 64 (two heads) on 64-pixel images
    (about a second per run on the CPU)."""
    return ["--model", model, "--depth", "1", "--hidden-size", "64", "--num-heads", "2", "--image-size", "64",
            "--num-classes", "10", "--global-batch-size", "4", "--device", "cpu", "--no-progress"]


def load_train_script(module_name: str):
    """benchmarks/train.py imported as the module `module_name` (its main() called in-process)."""
    spec = importlib.util.spec_from_file_location(module_name, TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_saved(path):
    """A checkpoint (or any torch.save file) read back with weights_only, as train.py reads its own."""
    return torch.load(path, weights_only=True)


def parse_sample(*argv) -> argparse.Namespace:
    """`dit-fast sample` arguments parsed by the subcommand's own parser."""
    from dit_fast import sample_cli

    p = argparse.ArgumentParser()
    sample_cli.add_arguments(p)
    return p.parse_args(list(argv))
