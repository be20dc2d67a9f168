"""How a results table shows a float, in report.py's Markdown and in summary.py's summary.md.

Stdlib only and free of package imports: summary.py loads this file by its path (see its docstring).
"""
from __future__ import annotations

import math


def format_float(v: float, digits: int = 3) -> str:
    """`digits` significant digits; scientific notation below 0.01 or from 1e5; whole numbers from 1000."""
    if math.isnan(v) or math.isinf(v):
        return str(v)
    if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e5):
        return f"{v:.2e}"
    return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
