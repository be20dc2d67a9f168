"""Interleaved rounds: timings that survive a noisy (shared) machine.

Timing contenders one after the other lets a burst of load from another job land on one of them
only, and a ratio of two such medians can be off by 10x. Here round r runs every contender once,
in an order rotated by r, so that slow phases of the machine hit all contenders alike; a speedup is
then taken per round (reference time / contender time of the same round) and summarized by its
median and spread across rounds.

Spread = (max - min) / median over the rounds, in percent: with the handful of rounds a benchmark
affords, the range is the honest measure (an IQR of 5 samples says little). A result whose spread
exceeds NOISY_SPREAD_PCT is flagged `noisy`: its median may still be right, but do not trust a
difference smaller than its spread.
"""
from __future__ import annotations

import statistics
from typing import Callable

from . import stop

NOISY_SPREAD_PCT = 10.0


def rotated(names: list[str], r: int) -> list[str]:
    """The order of round r: names rotated left by r (round 0 keeps the given order)."""
    if not names:
        return []
    k = r % len(names)
    return names[k:] + names[:k]


def run_rounds(
    samplers: dict[str, Callable[[], float]],
    rounds: int,
    on_round: Callable[[int, dict[str, list[float]], dict[str, str]], None] | None = None,
) -> tuple[dict[str, list[float | None]], dict[str, str]]:
    """Call every sampler once per round, order rotated per round; each returns one time (ms).

    Returns (times, errors): times[name][r] is round r's sample (None once the contender failed);
    errors[name] is the failure of a contender that raised, which then sits out the later rounds.
    on_round(r, times, errors) runs after every round (to save what was measured).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(samplers)
    times: dict[str, list[float | None]] = {n: [] for n in names}
    errors: dict[str, str] = {}
    for r in range(rounds):
        for name in rotated(names, r):
            if name in errors:
                continue
            try:
                times[name].append(float(samplers[name]()))
            except Exception as e:  # one contender's failure must not lose the others' numbers
                stop.check()  # ... but a stop request wrapped in an Exception by library code is not one
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        for name in errors:
            times[name] += [None] * (r + 1 - len(times[name]))
        if on_round:
            on_round(r, times, errors)
    return times, errors


def _quantile(sorted_values: list[float], q: float) -> float:
    # Linear interpolation between closest ranks (numpy's default), without numpy.
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def spread(values: list[float | None]) -> dict | None:
    """median, min, max, quartiles and spreads (% of the median) of the samples; None if there are none."""
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    med = statistics.median(v)
    q1, q3 = _quantile(v, 0.25), _quantile(v, 0.75)
    rel = (lambda d: 100.0 * d / med) if med else (lambda d: float("inf") if d else 0.0)
    spread_pct = rel(v[-1] - v[0])
    return {
        "median": med,
        "min": v[0],
        "max": v[-1],
        "q1": q1,
        "q3": q3,
        "spread_pct": spread_pct,
        "iqr_pct": rel(q3 - q1),
        "n": len(v),
        "noisy": spread_pct > NOISY_SPREAD_PCT,
    }


def per_round_ratios(numerator: list[float | None], denominator: list[float | None]) -> list[float]:
    """numerator[r] / denominator[r] for the rounds where both were measured (e.g. speedup = ref / fast)."""
    return [a / b for a, b in zip(numerator, denominator) if a is not None and b is not None and b > 0]


def ratio_stats(numerator: list[float | None], denominator: list[float | None]) -> dict | None:
    return spread(per_round_ratios(numerator, denominator))
