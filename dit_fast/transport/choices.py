"""The check of a named option against its allowed values, as create_transport and sample_flow word it."""
from __future__ import annotations


def check_choice(name: str, value, choices) -> None:
    """ValueError "<name> must be one of (...), got <value>" unless value is one of `choices` (a dict: its keys)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
