"""Ahead-of-time compilation of every Triton kernel for sm_80 / sm_90 (scripts/check_triton_compile.py).

Opt-in (DIT_FAST_TEST_TRITON_COMPILE=1): every published config takes 5-10 minutes on 2 cores, and CI runs the
script directly.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_triton_compile.py"


@pytest.mark.skipif(os.environ.get("DIT_FAST_TEST_TRITON_COMPILE") != "1",
                    reason="set DIT_FAST_TEST_TRITON_COMPILE=1 to compile every Triton kernel for sm_80/sm_90")
def test_every_triton_kernel_compiles_for_sm80_and_sm90():
    # A subprocess: the script must import triton with TRITON_INTERPRET=0, conftest set it to 1 here.
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-20000:]}\n{proc.stderr[-20000:]}"
    assert " 0 failed" in proc.stdout


def test_other_triton_venv_without_triton_is_named(tmp_path):
    """--triton-venv: a venv holding no triton for this Python is refused before anything compiles."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--triton-venv", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"--triton-venv {tmp_path}: no triton in" in proc.stderr + proc.stdout


def _load_compare():
    import importlib.util

    path = SCRIPT.parent / "compare_triton_versions.py"
    spec = importlib.util.spec_from_file_location("compare_triton_versions", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_judges_the_worse_of_two_versions():
    """The merged table keeps both versions' resources and fails a variant when either version exceeds the
    register limit or spills on a hot path."""
    cmp = _load_compare()

    def run(version, regs, verdict="ok", stack=0):
        return {"triton": version, "variants": [
            {"kernel": "_adaln_fwd_kernel", "arch": "sm_90", "variant": "v", "scenarios": ["s"], "regs": regs,
             "stack_bytes": stack, "shared_bytes": 16, "verdict": verdict}]}

    limit = cmp.REG_LIMITS["_adaln_fwd_kernel"]
    (row,) = cmp.merge(run("3.9.0", limit - 32), run("3.6.0", limit))
    assert row["worse_regs"] == limit and row["verdict"] == "ok"
    assert row["3.9.0"]["regs"] == limit - 32 and row["3.6.0"]["regs"] == limit
    (row,) = cmp.merge(run("3.9.0", limit - 32), run("3.6.0", limit + 8))
    assert row["verdict"] == "FAIL" and "over limit" in row["why"]
    (row,) = cmp.merge(run("3.9.0", 64), run("3.6.0", 64, "FAIL", stack=8))
    assert row["verdict"] == "FAIL" and row["worse_stack_bytes"] == 8
