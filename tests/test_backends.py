"""The capability table and the resolver (dit_fast/backends.py): what runs where, fallbacks, DIT_FAST_BACKEND."""
from __future__ import annotations

import pytest
import torch

import dit_fast.ops as ops
from dit_fast import backends


def test_every_op_has_a_torch_row_and_every_row_names_known_ops():
    for row in backends.CAPABILITIES:
        assert row.backend in backends.KERNEL_BACKENDS
        assert set(row.ops) <= set(backends.ALL_OPS), row
    for op in backends.ALL_OPS:
        assert backends.capability("torch", op, "cpu") is not None
    assert set(ops.__all__) >= set(backends.ALL_OPS)


def test_table_limits():
    ext_cuda = backends.capability("ext", "adaln_modulate", "cuda")
    assert ext_cuda.refuses(True, 72) == "no float64 kernels"
    assert "D <= 4096, got D=4097" in ext_cuda.refuses(False, 4097)
    assert ext_cuda.refuses(False, 4096) == ""
    assert backends.capability("ext", "final_layer", "cpu") is None
    assert backends.capability("triton", "final_layer", "cpu").refuses(True, None) == "no float64 kernels"


def test_float64_on_a_backend_without_it_falls_back_with_a_reason(monkeypatch):
    if backends.why_not("triton", "linear_gelu_tanh", "cpu"):
        pytest.skip("triton does not run here")
    monkeypatch.setattr(backends, "_resolved", {})
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(backends.BackendFallbackWarning, match="linear_gelu_tanh on cpu .float64.*no float64 kernels"):
        assert backends.resolve("triton", "linear_gelu_tanh", "cpu", True, None) == "torch"
    assert backends.resolve("triton", "linear_gelu_tanh", "cpu", False, None) == "triton"


def test_env_var_change_is_honored_at_the_next_call(monkeypatch):
    if backends.why_not("ext", "adaln_modulate", "cpu"):
        pytest.skip("ext does not run here")
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.resolve("auto", "adaln_modulate", "cpu") == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "ext")
    assert backends.resolve("auto", "adaln_modulate", "cpu") == "ext"
    monkeypatch.delenv(backends.ENV_VAR)
    assert backends.resolve("auto", "adaln_modulate", "cpu") == backends.AUTO_CPU[0]


def test_ext_fake_kernels_allocate_on_the_arguments_device():
    if backends.why_not("ext", "adaln_modulate", "cpu"):
        pytest.skip("ext does not run here")
    x, s = torch.empty(2, 3, 8, device="meta"), torch.empty(2, 8, device="meta")
    outs = torch.ops.dit_fast_ext.adaln_modulate_fwd(x, s, s, 1e-6, None)
    assert all(o.device.type == "meta" for o in outs)
    with pytest.raises(ValueError, match="all tensors must be on one device, got x on cpu, shift on meta"):
        torch.ops.dit_fast_ext.adaln_modulate_fwd(torch.randn(2, 3, 8), s, s, 1e-6, None)
