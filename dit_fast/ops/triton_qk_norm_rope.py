"""Triton qk_norm_rope as registered torch ops with autograd (kernels/rope_qknorm.py holds the kernels).

dit_fast_triton::qk_norm_rope_fwd returns q and k ([B, L, H, Dh], contiguous); v is never copied: the public
function hands out a view of qkv. Who carries v's gradient differs by path, for one reason: a registered op
may not return a view of its input.
  - eager, with grad: one torch.autograd.Function returns (q, k, v) with v a view of qkv, so its backward
    receives d(v) and writes the whole packed d(qkv) in its one pass (d(v) copied into the v third);
  - compiled: the registered op returns (q, k), v is a view taken outside it, and its backward
    (dit_fast_triton::qk_norm_rope_bwd) writes zeros in the v third; AOTAutograd adds v's gradient;
  - eager, no grad: the launcher, v a view.
The norms' parameter gradients (gains, and biases where given) come from the same backward pass (float32
partial sums, cast to the parameters' dtypes).
cos and sin get no gradient (they are fixed buffers; dit_fast.ops refuses ones that require grad).
Math in float32, so the capability table sends float64 inputs to the torch backend.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kernels import rope_qknorm as _rq
from . import differentiable_backward, torch_lightning
from .differentiable_backward import _vjp

__all__ = ["qk_norm_rope"]


def _v_view(qkv, num_heads):
    B, L, D3 = qkv.shape
    return qkv.reshape(B, L, 3, num_heads, D3 // (3 * num_heads))[:, :, 2].transpose(1, 2)


@torch.library.custom_op("dit_fast_triton::qk_norm_rope_fwd", mutates_args=())
def _qk_norm_rope_fwd(
    qkv: torch.Tensor, num_heads: int, q_gain: Optional[torch.Tensor], k_gain: Optional[torch.Tensor], eps: float,
    cos: Optional[torch.Tensor], sin: Optional[torch.Tensor], q_bias: Optional[torch.Tensor],
    k_bias: Optional[torch.Tensor], norm: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rq.qk_norm_rope_fwd(qkv, num_heads, q_gain, k_gain, eps, cos, sin, q_bias, k_bias, norm)


@_qk_norm_rope_fwd.register_fake
def _(qkv, num_heads, q_gain, k_gain, eps, cos, sin, q_bias, k_bias, norm):
    B, L, D3 = qkv.shape
    shape = (B, L, num_heads, D3 // (3 * num_heads))
    return qkv.new_empty(shape), qkv.new_empty(shape)


def _launch_bwd(dq, dk, dv, qkv, num_heads, q_gain, k_gain, eps, cos, sin, q_bias, k_bias, norm, need_param_grad):
    dqkv, dparams = _rq.qk_norm_rope_bwd(dq, dk, dv, qkv, num_heads, q_gain, k_gain, eps, cos, sin, q_bias, k_bias,
                                         norm, need_param_grad)
    return dqkv, dparams if dparams is not None else qkv.new_empty(0, dtype=torch.float32)


@torch.library.custom_op("dit_fast_triton::qk_norm_rope_bwd", mutates_args=())
def _qk_norm_rope_bwd(
    dq: Optional[torch.Tensor], dk: Optional[torch.Tensor], dv: Optional[torch.Tensor], qkv: torch.Tensor,
    num_heads: int, q_gain: Optional[torch.Tensor], k_gain: Optional[torch.Tensor], eps: float,
    cos: Optional[torch.Tensor], sin: Optional[torch.Tensor], q_bias: Optional[torch.Tensor],
    k_bias: Optional[torch.Tensor], norm: str, need_param_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_bwd(dq, dk, dv, qkv, num_heads, q_gain, k_gain, eps, cos, sin, q_bias, k_bias, norm,
                       need_param_grad)


@_qk_norm_rope_bwd.register_fake
def _(dq, dk, dv, qkv, num_heads, q_gain, k_gain, eps, cos, sin, q_bias, k_bias, norm, need_param_grad):
    dh = qkv.shape[-1] // (3 * num_heads)
    n = (4 if q_bias is not None else 2) if need_param_grad and q_gain is not None else 0
    return qkv.new_empty(qkv.shape), qkv.new_empty((n, dh) if n else (0,), dtype=torch.float32)


# argument positions of the op (and of qk_norm_rope below)
_QKV, _Q_GAIN, _K_GAIN, _Q_BIAS, _K_BIAS = 0, 2, 3, 7, 8
_PARAMS = (_Q_GAIN, _K_GAIN, _Q_BIAS, _K_BIAS)  # the order of the backward's parameter-gradient rows


def _setup(ctx, inputs, output):
    qkv, num_heads, q_gain, k_gain, eps, cos, sin, q_bias, k_bias, norm = inputs
    ctx.save_for_backward(qkv, q_gain, k_gain, cos, sin, q_bias, k_bias)
    ctx.num_heads, ctx.eps, ctx.norm = num_heads, eps, norm


def _backward(ctx, bwd, dq, dk, dv):
    """Gradients for the 10 arguments; dq, dk, dv as [B, L, H, Dh] or None."""
    qkv, q_gain, k_gain, cos, sin, q_bias, k_bias = ctx.saved_tensors
    params = dict(zip(_PARAMS, (q_gain, k_gain, q_bias, k_bias)))
    need = bool(q_gain is not None and any(ctx.needs_input_grad[i] for i in _PARAMS))
    dqkv, rows = bwd(dq, dk, dv, qkv, ctx.num_heads, q_gain, k_gain, ctx.eps, cos, sin, q_bias, k_bias, ctx.norm,
                     need)
    grads = [dqkv, None, None, None, None, None, None, None, None, None]
    for row, i in enumerate(_PARAMS):
        if need and params[i] is not None and ctx.needs_input_grad[i]:
            grads[i] = rows[row].to(params[i].dtype)
    return tuple(grads)


def _graph_backward(ctx, dq, dk, dv):
    """The same gradients as differentiable torch ops (create_graph=True): the torch backend's vjp."""
    qkv, q_gain, k_gain, cos, sin, q_bias, k_bias = ctx.saved_tensors

    def fn(qkv, q_gain, k_gain, q_bias, k_bias):
        q, k, v = torch_lightning.qk_norm_rope(qkv, ctx.num_heads, q_gain, k_gain, ctx.eps, cos, sin, q_bias, k_bias,
                                               ctx.norm)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    dqkv, dqg, dkg, dqb, dkb = _vjp(fn, (qkv, q_gain, k_gain, q_bias, k_bias), (dq, dk, dv))
    return dqkv, None, dqg, dkg, None, None, None, dqb, dkb, None


def _compiled_backward(ctx, dq, dk):
    if differentiable_backward.wanted():
        return _graph_backward(ctx, dq, dk, None)
    return _backward(ctx, _qk_norm_rope_bwd, dq, dk, None)


_qk_norm_rope_fwd.register_autograd(_compiled_backward, setup_context=_setup)


def _heads_last(g):
    return None if g is None else g.transpose(1, 2)  # [B, H, L, Dh] -> [B, L, H, Dh] (a view)


class _QKNormRope(torch.autograd.Function):
    """Eager with grad: (q, k, v) with v a view of qkv, so the fused backward also places d(v)."""

    @staticmethod
    def forward(ctx, *args):
        q, k = _rq.qk_norm_rope_fwd(*args)
        _setup(ctx, args, None)
        ctx.set_materialize_grads(False)
        return q.transpose(1, 2), k.transpose(1, 2), _v_view(args[_QKV], args[1])

    @staticmethod
    def backward(ctx, dq, dk, dv):
        if dq is None and dk is None and dv is None:
            return (None,) * 10
        dq, dk, dv = _heads_last(dq), _heads_last(dk), _heads_last(dv)
        if differentiable_backward.wanted():
            return _graph_backward(ctx, dq, dk, dv)
        return _backward(ctx, _launch_bwd, dq, dk, dv)


def qk_norm_rope(qkv, num_heads, q_gain=None, k_gain=None, eps=1e-6, cos=None, sin=None, q_bias=None, k_bias=None,
                 norm="rms"):
    """(q, k, v), each [B, H, L, Dh]; see torch_lightning.qk_norm_rope for the semantics."""
    args = (qkv, num_heads, q_gain, k_gain, eps, cos, sin, q_bias, k_bias, norm)
    if not torch.compiler.is_compiling() and torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in args
    ):
        return _QKNormRope.apply(*args)
    if torch.compiler.is_compiling():
        q, k = _qk_norm_rope_fwd(*args)
    else:
        q, k = _rq.qk_norm_rope_fwd(*args)
    return q.transpose(1, 2), k.transpose(1, 2), _v_view(qkv, num_heads)
