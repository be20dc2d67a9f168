"""What the argparse value types of `dit-fast` (cli.py) and `dit-fast sample` (sample_cli.py) share.

A bad value is a usage error (exit 2) that names what was expected and what came; argparse adds the flag.
"""
from __future__ import annotations

import argparse
from typing import Callable, TypeVar

T = TypeVar("T")


def converted(text: str, convert: Callable[[str], T], expected: str) -> T:
    """convert(text); when it raises ValueError, the usage error "expected <expected>, got '<text>'"."""
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
