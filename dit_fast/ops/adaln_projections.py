"""Every adaLN projection of a DiT as one GEMM forward and one pair of GEMMs backward, with autograd.

Each block projects the same SiLU(c) [B, D] to its own [B, 6D] modulations (the final layer to
[B, 2D]). Run one by one, a training step pays per block: a GEMM forward and, backward, a cat of the
six chunk gradients, two GEMMs, a bias-gradient reduction and the add that accumulates SiLU(c)'s
gradient over blocks; five launches per block, on tensors of a few hundred KB. Here the weights are
concatenated once per forward (under autocast, into the cast copy autocast would make per layer anyway),
one GEMM makes all modulations, and the outputs are the chunks themselves (views of that one result),
so the backward gets every chunk's gradient at once: one cat, one GEMM for all weight gradients, one
for SiLU(c)'s, one sum for all bias gradients. The per-parameter gradients are contiguous row blocks of
the one weight gradient, which autograd hands to `.grad` without copies.

The arithmetic per output element is the GEMM's, as in F.linear on each layer (a cuBLAS GEMM of other
shape may block its reduction differently: rounding-level differences, like any GEMM size change).
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["adaln_projections", "functorch_transforms_active"]


def functorch_transforms_active() -> bool:
    """Whether a torch.func transform (grad, vjp, jvp, vmap) is tracing this call. The custom autograd
    Functions of the fast path do not implement those transforms' rules, so callers then take the
    published computation, which does."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active and active())


class _AdalnProjections(torch.autograd.Function):
    @staticmethod
    def forward(ctx, silu_c, dtype, chunk_sizes, fused, n, *params):
        weights, biases = params[:n], params[n:]
        with torch.autocast(silu_c.device.type, enabled=False):
            recat = fused is None and all(w.dtype == dtype for w in weights)
            if fused is not None:
                weight = fused[0] if fused[0].dtype == dtype else fused[0].to(dtype)
                bias = fused[1]
            else:
                weight = _cat(weights, dtype)
                bias = torch.cat(biases)
            x = silu_c.to(dtype)
            mod = torch.addmm(bias.to(dtype), x, weight.t())
        # Without a cast the concatenated weight is a copy of the parameters: the backward concatenates
        # again rather than keep a second copy of every adaLN weight alive until it runs.
        ctx.save_for_backward(x, *(weights if recat else (weight,)))
        ctx.recat, ctx.n, ctx.dtype, ctx.chunk_sizes = recat, n, dtype, chunk_sizes
        ctx.silu_dtype = silu_c.dtype
        ctx.rows = [w.shape[0] for w in weights]
        ctx.param_dtypes = [p.dtype for p in params]
        ctx.set_materialize_grads(False)
        return mod.split(list(chunk_sizes), dim=1)

    @staticmethod
    def backward(ctx, *grads):
        x, *saved = ctx.saved_tensors
        B = x.shape[0]
        g = torch.cat([gr if gr is not None else x.new_zeros((B, sz)) for gr, sz in zip(grads, ctx.chunk_sizes)], dim=1)
        if g.dtype != ctx.dtype:
            g = g.to(ctx.dtype)
        n = ctx.n
        need_x = ctx.needs_input_grad[0]
        need_w = any(ctx.needs_input_grad[5 : 5 + n])
        need_b = any(ctx.needs_input_grad[5 + n :])
        dx = dws = dbs = None
        if need_x:
            weight = _cat(saved, ctx.dtype) if ctx.recat else saved[0]
            dx = (g @ weight).to(ctx.silu_dtype)
        if need_w:
            dws = _split_to((g.t() @ x), ctx.rows, ctx.param_dtypes[:n])
        if need_b:
            dbs = _split_to(g.sum(0), ctx.rows, ctx.param_dtypes[n:])
        dws = dws or [None] * n
        dbs = dbs or [None] * n
        dws = [d if need else None for d, need in zip(dws, ctx.needs_input_grad[5 : 5 + n])]
        dbs = [d if need else None for d, need in zip(dbs, ctx.needs_input_grad[5 + n :])]
        return (dx, None, None, None, None, *dws, *dbs)


def _cat(weights: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The weights one under the other, in dtype: one copy kernel when no cast is needed, else one
    casting copy per weight straight into its rows (no float32 concatenation first)."""
    if all(w.dtype == dtype for w in weights):
        return torch.cat(list(weights))
    out = torch.empty((sum(w.shape[0] for w in weights), weights[0].shape[1]), dtype=dtype, device=weights[0].device)
    row = 0
    for w in weights:
        out[row : row + w.shape[0]].copy_(w)
        row += w.shape[0]
    return out


def _split_to(t: torch.Tensor, rows: list[int], dtypes: list[torch.dtype]) -> list[torch.Tensor]:
    """Row blocks of t, each in its parameter's dtype (one cast for all when they agree)."""
    if len(set(dtypes)) == 1 and t.dtype != dtypes[0]:
        t = t.to(dtypes[0])
    return [p if p.dtype == dt else p.to(dt) for p, dt in zip(t.split(rows, dim=0), dtypes)]


def adaln_projections(
    silu_c: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    chunks: Sequence[int],
    fused: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[tuple[torch.Tensor, ...]]:
    """[F.linear(silu_c, w, b).chunk(k, dim=1) for w, b, k in zip(weights, biases, chunks)], computed as
    one GEMM (autograd included: one cat, two GEMMs and one sum for the whole backward).

    fused: (weight, bias) that the weights and biases are row-block views of (DiT(batch_adaln=True)),
    used without a concatenation. The GEMM runs in the autocast dtype when autocast is on, else in the
    weights' dtype (which must then be silu_c's, as F.linear requires).
    """
    n = len(weights)
    if n == 0 or len(biases) != n or len(chunks) != n:
        raise ValueError(f"adaln_projections: {n} weights, {len(biases)} biases, {len(chunks)} chunk counts")
    dev = silu_c.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
    else:
        dtype = weights[0].dtype
        if any(t.dtype != silu_c.dtype for t in [*weights, *biases]):
            raise TypeError(
                f"adaln_projections: weights and biases must have silu_c's dtype {silu_c.dtype} outside autocast"
            )
    sizes = []
    for w, k in zip(weights, chunks):
        if w.shape[0] % k:
            raise ValueError(f"adaln_projections: {w.shape[0]} output features do not split into {k} chunks")
        sizes += [w.shape[0] // k] * k
    outs = _AdalnProjections.apply(silu_c, dtype, tuple(sizes), fused, n, *weights, *biases)
    grouped, i = [], 0
    for k in chunks:
        grouped.append(tuple(outs[i : i + k]))
        i += k
    return grouped
