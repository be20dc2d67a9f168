"""Test set-up shared by every test module.

The Triton interpreter must be switched on before triton is first imported, so that Triton
kernels run on CPU tensors here; on a machine with a GPU, tests marked `gpu` run them for real.

Seeds: every test draws fresh random inputs from a new seed; a failing test's report says which
(`random seed: N`), and `DIT_FAST_SEED=N pytest ...` replays it.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_RUNS = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="Triton needs CUDA or TRITON_INTERPRET=1")
SEED_VAR = "DIT_FAST_SEED"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _seed() -> int:
    given = os.environ.get(SEED_VAR)
    if given is None:
        return int.from_bytes(os.urandom(4), "little")
    try:
        return int(given)
    except ValueError:
        raise pytest.UsageError(f"{SEED_VAR} must be an integer seed, got {given!r}") from None


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs on every run; the seed goes into the failure report (hook below) for replay.
    seed = _seed()
    request.node.dit_fast_seed = seed
    torch.manual_seed(seed)
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "dit_fast_seed", None)
    if seed is not None and report.failed:
        report.sections.append(("random seed", f"random seed: {seed} (replay: {SEED_VAR}={seed} pytest {item.nodeid})"))


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory):
    """A tiny randomly initialized diffusers AutoencoderKL saved to disk (8x downsampling, 4 latent channels,
    like the SD VAE DiT uses), for the VAE paths without a download."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=32,
    )
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return str(path)


@pytest.fixture
def one_thread():
    """Tiny ops on a shared 2-core machine: more threads only add contention (measured 10-50x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
