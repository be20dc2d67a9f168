"""Interleaved rounds: order rotation, per-contender and per-ratio statistics, noise flags, and their use
by the throughput and kernel tables."""
import math

import pytest
import torch

from dit_fast.bench import rounds
from dit_fast.bench.rounds import NOISY_SPREAD_PCT, per_round_ratios, ratio_stats, rotated, run_rounds, spread


def test_rotation_runs_each_contender_once_per_round_in_rotated_order():
    calls = []
    samplers = {n: (lambda c: lambda: calls.append(c) or 1.0)(n) for n in "abc"}
    times, errors = run_rounds(samplers, 4)
    assert calls == list("abc" "bca" "cab" "abc")
    assert errors == {} and all(len(v) == 4 for v in times.values())
    assert rotated([], 3) == []


def test_spread_statistics():
    s = spread([10.0, 12.0, 11.0, None, 9.0, 13.0])  # None: a round the contender did not run
    assert s["n"] == 5 and s["median"] == 11.0 and (s["min"], s["max"]) == (9.0, 13.0)
    assert s["spread_pct"] == pytest.approx(100 * 4 / 11)
    assert (s["q1"], s["q3"]) == (10.0, 12.0) and s["iqr_pct"] == pytest.approx(100 * 2 / 11)
    assert s["noisy"]  # 36% > 10%
    quiet = spread([100.0, 104.0, 101.0])
    assert quiet["spread_pct"] == pytest.approx(400 / 101) and not quiet["noisy"]
    assert spread([100.0, 100.0, 100.0 + NOISY_SPREAD_PCT + 0.01])["noisy"]
    assert not spread([100.0, 100.0, 100.0 + NOISY_SPREAD_PCT])["noisy"]
    assert spread([]) is None and spread([None]) is None


def test_ratios_are_taken_per_round_not_of_the_medians():
    ref, fast = [10.0, 20.0, 30.0], [5.0, 40.0, 15.0]
    assert per_round_ratios(ref, fast) == [2.0, 0.5, 2.0]
    s = ratio_stats(ref, fast)
    assert s["median"] == 2.0 and s["spread_pct"] == pytest.approx(75.0) and s["noisy"]
    assert per_round_ratios([1.0, None, 3.0], [1.0, 2.0, None]) == [1.0]


def test_a_failing_contender_sits_out_and_the_others_go_on():
    n = {"k": 0}

    def flaky():
        n["k"] += 1
        if n["k"] == 2:
            raise RuntimeError("out of memory\nmore")
        return 2.0

    seen = []
    times, errors = run_rounds({"ok": lambda: 1.0, "flaky": flaky}, 3, on_round=lambda r, t, e: seen.append(r))
    assert times["ok"] == [1.0, 1.0, 1.0] and times["flaky"] == [2.0, None, None]
    assert errors == {"flaky": "RuntimeError: out of memory"} and seen == [0, 1, 2]
    with pytest.raises(ValueError, match="rounds"):
        run_rounds({"ok": lambda: 1.0}, 0)


def test_throughput_speedups_use_same_round_ratios():
    from dit_fast.bench.throughput import add_speedups

    rows = [
        {"contender": "reference", "mode": "fwd", "ms_per_iter": 20.0, "ms_rounds": [10.0, 20.0, 30.0]},
        {"contender": "dit_fast[ext]", "mode": "fwd", "ms_per_iter": 15.0, "ms_rounds": [5.0, 40.0, 15.0]},
        {"contender": "dit_fast[torch]", "mode": "fwd", "ms_per_iter": 10.0},  # an older file: medians only
    ]
    add_speedups(rows)
    assert rows[1]["speedup_vs_eager"] == 2.0 and rows[1]["speedup_vs_eager_noisy"]
    assert rows[1]["speedup_vs_eager_spread_pct"] == pytest.approx(75.0)
    assert rows[2]["speedup_vs_eager"] == 2.0 and "speedup_vs_eager_noisy" not in rows[2]
    assert "speedup_vs_compile" not in rows[1]


def test_kernel_table_is_interleaved_with_spread_and_noise_flags():
    from dit_fast.bench.kernels import run_kernels
    from dit_fast.bench.report import KERNEL_COLS, KERNEL_NOISE, md_table, with_noise

    rows = run_kernels(device=torch.device("cpu"), dtype=torch.float32, shapes=[(1, 4, 8)], ops=["gated_residual"],
                       rounds=3, cpu_iters=1, progress=False)
    by = {r["backend"]: r for r in rows}
    assert "eager" in by and "ext" in by
    for r in by.values():
        assert "error" not in r, r
        for pre in ("fwd", "fwd_bwd"):
            assert len(r[f"{pre}_ms_rounds"]) == 3 and r[f"{pre}_ms"] == sorted(r[f"{pre}_ms_rounds"])[1]
            assert r[f"{pre}_spread_pct"] >= 0 and isinstance(r[f"{pre}_noisy"], bool)
    ext, eager = by["ext"], by["eager"]
    ratios = [a / b for a, b in zip(eager["fwd_ms_rounds"], ext["fwd_ms_rounds"])]
    assert math.isclose(ext["fwd_speedup_vs_eager"], sorted(ratios)[1])
    noisy = dict(ext, fwd_noisy=True)
    assert "NOISY: fwd" in md_table([with_noise(noisy, KERNEL_NOISE)], KERNEL_COLS)


def test_noise_threshold_is_ten_percent():
    assert rounds.NOISY_SPREAD_PCT == 10.0


def test_a_contenders_kernel_switch_is_held_over_forward_and_backward():
    """make_pass enters a contender's bench_context for the whole pass, backward included (the
    triton-noprefetch contender's PREFETCH switch is read by the backward launcher too)."""
    import contextlib

    from dit_fast.bench.kernels import _with_context, make_case, make_pass

    state = {"on": False, "seen": []}

    @contextlib.contextmanager
    def switch():
        state["on"] = True
        try:
            yield
        finally:
            state["on"] = False

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, y, gate):
            state["seen"].append(("fwd", state["on"]))
            return x + gate.unsqueeze(1) * y

        @staticmethod
        def backward(ctx, g):
            state["seen"].append(("bwd", state["on"]))
            return g, g, g.sum(1)

    case = make_case("gated_residual", 1, 4, 8, torch.float32, torch.device("cpu"))
    fn = _with_context(Probe.apply, switch)
    for pass_ in ("fwd", "fwd+bwd"):
        run, _ = make_pass(case, fn, "cpu", torch.float32, pass_)
        run()
    assert state["seen"] and all(on for _, on in state["seen"]), state["seen"]
    assert ("bwd", True) in state["seen"] and not state["on"]
