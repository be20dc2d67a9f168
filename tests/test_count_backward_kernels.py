"""scripts/count_backward_kernels.py: the per-block kernel count behind issue 10's item 2 figures."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "count_backward_kernels.py"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="counts under the Triton interpreter")
def test_counts_one_blocks_backward_and_writes_results(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (path,) = tmp_path.glob("*-cpu-backward-kernels-triton.json")
    record = json.loads(path.read_text())
    assert record["env"]["git_commit"] and record["env"]["torch"]
    # one block: 10 GEMMs (qkv, proj, fc1, fc2, adaLN: dgrad + wgrad), one attention backward, one
    # stack into the packed QKV gradient and no clone; two fused adaLN backward kernels
    assert record["aten_per_block"]["mm"] == 10
    assert record["aten_per_block"]["stack"] == 1 and "clone" not in record["aten_per_block"]
    assert record["triton_per_block"]["_adaln_bwd_kernel"] == 2
    assert record["total_per_block"] == sum(record["aten_per_block"].values()) + sum(
        record["triton_per_block"].values())
