"""Run by tests/test_distributed.py under `torchrun --standalone --nproc_per_node=2` (gloo, CPU).

Trains the same small fast DiT for a few SGD steps on one global batch split over the ranks,
once with DDP and once with FSDP2 (fully_shard per block, then the root), and has rank 0 save
the full parameters after training, for the test to compare with single-process training.
The helpers are also what the test uses for its single-process run.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

from dit_fast.models import DiT
from dit_fast.testing import randomize_weights_

CONFIG = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
              num_classes=10, class_dropout_prob=0.0)
GLOBAL_BATCH = 8
STEPS = 3
# SGD, not Adam: Adam's update ignores the gradient's scale, so it would hide a rank-count factor.
LR = 0.05


def build_model() -> DiT:
    torch.manual_seed(0)
    model = DiT(**CONFIG).train()
    return randomize_weights_(model, torch.Generator().manual_seed(1))


def make_batches():
    """STEPS global batches (x, t, y, target), the same on every process."""
    g = torch.Generator().manual_seed(2)
    s, c = CONFIG["input_size"], CONFIG["in_channels"]
    return [
        (
            torch.randn(GLOBAL_BATCH, c, s, s, generator=g),
            torch.randint(0, 1000, (GLOBAL_BATCH,), generator=g).float(),
            torch.randint(0, CONFIG["num_classes"], (GLOBAL_BATCH,), generator=g),
            torch.randn(GLOBAL_BATCH, c, s, s, generator=g),
        )
        for _ in range(STEPS)
    ]


def train(model, params, rank: int = 0, world: int = 1) -> list[float]:
    """SGD steps on this rank's shard of each global batch; the loss is a mean over the shard."""
    opt = torch.optim.SGD(params, lr=LR, momentum=0.9)
    n = GLOBAL_BATCH // world
    losses = []
    for x, t, y, target in make_batches():
        sl = slice(rank * n, (rank + 1) * n)
        loss = F.mse_loss(model(x[sl], t[sl], y[sl])[:, : CONFIG["in_channels"]], target[sl])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def full_state(model) -> dict[str, torch.Tensor]:
    """Full (unsharded) parameters; a collective under FSDP2, so every rank calls it."""
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        if hasattr(t, "full_tensor"):  # DTensor shard
            t = t.full_tensor()
        out[name.replace("module.", "", 1) if name.startswith("module.") else name] = t.clone()
    return out


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard  # torch 2.5
    return fully_shard


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="directory for rank 0's results")
    parser.add_argument("--modes", default="ddp,fsdp2")
    args = parser.parse_args()
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for mode in args.modes.split(","):
        model = build_model()
        if mode == "ddp":
            wrapped = DDP(model)
        elif mode == "fsdp2":
            fully_shard = _fully_shard()
            for block in model.blocks:
                fully_shard(block)
            wrapped = fully_shard(model)
        else:
            raise ValueError(f"unknown mode {mode!r}")
        sharded = all(hasattr(p, "full_tensor") for p in model.blocks[0].parameters())
        losses = train(wrapped, model.parameters(), rank, world)
        state = full_state(model)
        if rank == 0:
            torch.save({"params": state, "losses": losses, "sharded": sharded}, os.path.join(args.out, f"{mode}.pt"))
        del wrapped, model  # DDP's reducer holds communication state: release it before teardown
        dist.barrier()
    dist.barrier()  # gloo ranks sometimes abort at exit without it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Even after barrier + destroy_process_group, a gloo rank occasionally aborts in interpreter
    # teardown ("terminate called without an active exception", seen in CI). Everything is saved
    # by now: leave without running C++ static destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
