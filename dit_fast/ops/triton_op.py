"""One spec per Triton op -> its three call paths, so that they cannot drift apart.

A Triton op is specified once by
  op        the `torch.library.custom_op` (schema + fake kernel; its body calls the launcher),
  launch    the launcher itself (same arguments and outputs as `op`),
  setup     setup_context(ctx, inputs, output): what backward needs, saved once for both paths,
  backward  backward(ctx, kernels, *grads): the first-order formula, `kernels` being the launchers
            (eager) or the registered backward ops (compiled; AOTAutograd traces with fake tensors),
  graph_backward  graph_backward(ctx, *grads): the same gradients as differentiable torch ops, run
            when the backward itself is differentiated (create_graph=True; differentiable_backward.py),
  n_out     how many leading outputs the public function returns (the others, e.g. row statistics,
            exist only to be saved).

Calls then take one of three paths, all from this spec:
  - while torch.compile traces: the registered op, with `register_autograd`;
  - eager, some input requires grad: a torch.autograd.Function on the launchers;
  - eager, no grad: the launcher alone (`launch_no_grad` when the op has a cheaper form there).
Why not the registered op everywhere: its eager per-call cost is ~20 us higher without grad and
~85 us higher with grad than the autograd.Function (docs/DESIGN.md, "Per-call overhead"), about
1.3 ms per DiT forward at batch 2 on a slow host, more than the GPU time of the forward.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from . import differentiable_backward


class TritonOp:
    def __init__(
        self,
        op,
        launch: Callable,
        setup: Callable,
        backward: Callable,
        graph_backward: Callable,
        *,
        eager_kernels,
        compiled_kernels,
        n_out: int = 1,
        launch_no_grad: Callable | None = None,
    ):
        self.op = op
        self._launch = launch
        self._launch_no_grad = launch_no_grad or launch
        self._n_out = n_out

        def op_backward(ctx, *grads):
            grads = grads[:n_out]
            if differentiable_backward.wanted():
                return graph_backward(ctx, *grads)
            return backward(ctx, compiled_kernels, *grads)

        op.register_autograd(op_backward, setup_context=setup)
        public = self._public

        class _Function(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                out = launch(*args)
                setup(ctx, args, out)
                return public(out)

            @staticmethod
            def backward(ctx, *grads):
                if differentiable_backward.wanted():
                    return graph_backward(ctx, *grads)
                return backward(ctx, eager_kernels, *grads)

        _Function.__name__ = _Function.__qualname__ = f"{op._name}_function"
        self.function = _Function

    def _public(self, out):
        if not isinstance(out, tuple):
            return out
        return out[0] if self._n_out == 1 else out[: self._n_out]

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self._public(self.op(*args))
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return self.function.apply(*args)
        return self._public(self._launch_no_grad(*args))
