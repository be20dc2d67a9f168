"""The input checks and backend choice the fused sampler updates share (dit_fast/ops/step_dispatch.py), through
both ops: every bad argument is named with what was expected and what came; a Triton path that cannot run
warns (once) and runs torch."""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from dit_fast.backends import BackendFallbackWarning
from dit_fast.ops.flow_step import NUM_COLS as FLOW_COLS
from dit_fast.ops.flow_step import flow_step_
from dit_fast.ops.sampler_step import NUM_COLS as DDPM_COLS
from dit_fast.ops.sampler_step import sampler_step_
from dit_fast.ops.step_dispatch import resolve_backend

N, C, H, W = 2, 3, 2, 2
_fresh_op = (f"test_op_{i}" for i in itertools.count())  # warn_once keys on the op: a new name warns again


def _flow_args(**changes):
    args = dict(x=torch.randn(N, C, H, W), xin=torch.randn(N, C, H, W), model_out=torch.randn(N, C, H, W),
                k=torch.randn(N, C, H, W), noise=torch.randn(N, C, H, W), table=torch.randn(4, FLOW_COLS),
                step=torch.tensor([1]))
    args.update(changes)
    return args


def _ddpm_args(**changes):
    args = dict(x=torch.randn(N, C, H, W), model_out=torch.randn(N, 2 * C, H, W), noise=torch.randn(N, C, H, W),
                table=torch.randn(4, DDPM_COLS), step=torch.tensor([1]))
    args.update(changes)
    return args


def _call(op, args):
    if op == "flow":
        return flow_step_(*args.values(), stage="euler", backend="torch")
    return sampler_step_(*args.values(), backend="torch")


BAD = [  # (what is changed, the error, its message)
    (dict(noise=[0.0]), TypeError, "noise must be a torch.Tensor, got list"),
    (dict(table=torch.empty(4, 1, device="meta")), ValueError, "table must be on cpu like x, got meta"),
    (dict(x=torch.randn(N, C, H)), ValueError, r"x must be a float32/float64 tensor \[n, C, H, W\], got "
                                               r"torch.float32 \[2, 3, 2\]"),
    (dict(x=torch.randn(N, C, H, W).half()), ValueError, "x must be a float32/float64 tensor"),
    (dict(noise=torch.randn(1, C, H, W)), ValueError, r"noise must be a torch.float32 tensor \[>= 2, 3, 2, 2\], "
                                                      r"got torch.float32 \[1, 3, 2, 2\]"),
    (dict(noise=torch.randn(N, C, H, W).double()), ValueError, "noise must be a torch.float32 tensor"),
    (dict(step=torch.tensor([1.0])), ValueError, r"step must be a one-element int32/int64 tensor, got "
                                                 r"torch.float32 \[1\]"),
    (dict(step=torch.tensor([1, 2])), ValueError, "step must be a one-element"),
    (dict(x=torch.randn(N, C, W, H).transpose(2, 3)), ValueError, r"x must be contiguous \(it is updated in place\)"),
]


@pytest.mark.parametrize("op", ["flow", "ddpm"])
@pytest.mark.parametrize("change, error, message", BAD)
def test_bad_arguments_are_named_by_both_ops(op, change, error, message):
    args = (_flow_args if op == "flow" else _ddpm_args)(**change)
    with pytest.raises(error, match=message):
        _call(op, args)


def test_the_table_message_names_each_ops_rows():
    with pytest.raises(ValueError, match=rf"table must be a torch.float32 tensor \[rows, {FLOW_COLS}\], got "
                                         rf"torch.float32 \[4, {DDPM_COLS}\]"):
        _call("flow", _flow_args(table=torch.randn(4, DDPM_COLS)))
    with pytest.raises(ValueError, match=rf"table must be a torch.float32 tensor \[num_steps, {DDPM_COLS}\], got "
                                         rf"torch.float32 \[4, {FLOW_COLS}\]"):
        _call("ddpm", _ddpm_args(table=torch.randn(4, FLOW_COLS)))


def test_flow_steps_own_buffers_are_checked_after_the_shared_ones():
    with pytest.raises(ValueError, match=r"xin \(the model's input\) must be a torch.float32 tensor \[4, 3, 2, 2\]"):
        flow_step_(*_flow_args().values(), stage="euler", cfg=True, backend="torch")
    with pytest.raises(ValueError, match=r"k \(the Heun predictor's slope\) must be a torch.float32 tensor "
                                         r"\[2, 3, 2, 2\], got torch.float32 \[2, 3, 2\]"):
        _call("flow", _flow_args(k=torch.randn(N, C, H)))
    with pytest.raises(ValueError, match="xin must be contiguous"):
        _call("flow", _flow_args(xin=torch.randn(N, C, W, H).transpose(2, 3)))


def test_good_arguments_pass_the_checks():
    x = _call("flow", _flow_args())
    assert x.shape == (N, C, H, W) and torch.isfinite(x).all()
    x = _call("ddpm", _ddpm_args(table=torch.rand(4, DDPM_COLS)))
    assert x.shape == (N, C, H, W)


def _no_kernels():
    raise ImportError("no triton here")


def test_resolve_backend_choices(monkeypatch):
    monkeypatch.delenv("DIT_FAST_BACKEND", raising=False)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'torch'\), got 'ext'"):
        resolve_backend(next(_fresh_op), "ext", "cpu", _no_kernels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these may warn
        assert resolve_backend(next(_fresh_op), "torch", "cuda", _no_kernels) == "torch"
        assert resolve_backend(next(_fresh_op), "auto", "cpu", _no_kernels) == "torch"
        assert resolve_backend(next(_fresh_op), "auto", "cuda", lambda: None) == "triton"
        monkeypatch.setenv("DIT_FAST_BACKEND", "ext")  # the global choice has no sampler kernel: auto
        assert resolve_backend(next(_fresh_op), "auto", "cuda", lambda: None) == "triton"
        monkeypatch.setenv("DIT_FAST_BACKEND", "torch")
        assert resolve_backend(next(_fresh_op), "auto", "cuda", lambda: None) == "torch"


@pytest.mark.parametrize("device_type, interpret, why", [
    ("cpu", "0", "Triton runs CPU tensors only under TRITON_INTERPRET=1"),
    ("mps", "1", "Triton does not run mps tensors"),
    ("cuda", "1", "importing the Triton kernel failed: ImportError: no triton here"),
])
def test_a_triton_path_that_cannot_run_warns_once_and_runs_torch(monkeypatch, device_type, interpret, why):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    op = next(_fresh_op)
    with pytest.warns(BackendFallbackWarning) as record:
        assert resolve_backend(op, "triton", device_type, _no_kernels) == "torch"
    assert str(record[0].message) == f"dit_fast: {op} cannot use Triton ({why}); using 'torch'"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend(op, "triton", device_type, _no_kernels) == "torch"  # warned once already
