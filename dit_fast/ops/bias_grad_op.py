"""The backward half shared by the Triton ops that act on a GEMM's output `pre` and take the GEMM's bias
(bias + GELU-tanh, SwiGLU): one registered op dit_fast_triton::<name>(dout, pre, bias, need_bias_grad) ->
(d(pre), d(bias)) with its fake kernel, and the first-order backward formula around it.

d(bias) comes out of the same pass over d(pre) as a float32 sum; an op returns tensors, so an empty float32
tensor stands for "not computed". (No `from __future__ import annotations` here: torch.library reads the
schema off the real annotation objects of the function defined inside backward_op.)
"""
from typing import Optional

import torch

__all__ = ["backward_op", "save_inputs", "backward"]


def backward_op(name: str, kernel):
    """(launch, op): the eager launcher and the registered op dit_fast_triton::<name>, both (dout, pre, bias,
    need_bias_grad) -> (d(pre), d(bias)); kernel has that signature and gives None for a d(bias) not asked for.
    d(pre) is contiguous with pre's shape."""

    def launch(dout, pre, bias, need_bias_grad):
        dpre, dbias = kernel(dout, pre, bias, need_bias_grad)
        return dpre, dbias if dbias is not None else pre.new_empty(0, dtype=torch.float32)

    def run(
        dout: torch.Tensor, pre: torch.Tensor, bias: Optional[torch.Tensor], need_bias_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return launch(dout, pre, bias, need_bias_grad)

    op = torch.library.custom_op(f"dit_fast_triton::{name}", run, mutates_args=())

    @op.register_fake
    def _(dout, pre, bias, need_bias_grad):
        n = pre.shape[-1] if need_bias_grad else 0
        return torch.empty_like(pre, memory_format=torch.contiguous_format), pre.new_empty(n, dtype=torch.float32)

    return launch, op


def save_inputs(ctx, inputs, output):
    """setup_context of an op with inputs (pre, bias): both are what its backward reads."""
    ctx.save_for_backward(*inputs)


def backward(ctx, bwd, dout):
    """(d(pre), d(bias)) of an op with inputs (pre, bias), from bwd (the launcher, or the registered op when
    compiling); d(bias) in the bias's dtype, None without a bias or when not needed."""
    pre, bias = ctx.saved_tensors
    need_b = bool(ctx.needs_input_grad[1] and bias is not None)
    dpre, db = bwd(dout, pre, bias, need_b)
    return dpre, db.to(bias.dtype) if need_b else None
