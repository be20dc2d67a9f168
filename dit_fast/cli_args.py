"""What the argparse value types of `dit-fast` (cli.py) and `dit-fast sample` (sample_cli.py) share.

A bad value is a usage error (exit 2) that names what was expected and what came; argparse adds the flag.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable, TypeVar

T = TypeVar("T")


def converted(text: str, convert: Callable[[str], T], expected: str) -> T:
    """convert(text); when it raises ValueError, the usage error "expected <expected>, got '<text>'"."""
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def value_type(convert: Callable[[str], T], syntax: str, ok: Callable[[T], bool],
               expected: str | None = None) -> Callable[[str], T]:
    """An argparse type: convert(text) (text that does not convert: "expected <syntax>, got '<text>'"), refused
    unless ok(value) ("expected <expected, default syntax>, got <text>")."""
    def parse(text: str) -> T:
        value = converted(text, convert, syntax)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected or syntax}, got {text}")
        return value

    return parse


positive_int = value_type(int, "a positive integer", lambda v: v >= 1)
finite_float = value_type(float, "a number", math.isfinite, "a finite number")
non_negative_float = value_type(float, "a number", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
