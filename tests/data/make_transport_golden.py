"""Regenerate tests/data/transport_golden.pt from the published transport packages (see README.md here).

    python tests/data/make_transport_golden.py --sit /path/to/SiT --lightningdit /path/to/LightningDiT

Each path is a checkout of willisma/SiT or hustvl/LightningDiT (their `transport` package is imported
from there, run, never copied); torchdiffeq and scipy must be installed.
"""
from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/, for transport_cases
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository, for dit_fast.atomic

from dit_fast.atomic import atomic_save  # noqa: E402
from transport_cases import cases  # noqa: E402


def load_transport(root: str):
    """The `transport` package of a checkout, imported under its own name and then unregistered, so
    two checkouts (both call it `transport`) load side by side."""
    def drop():
        for k in [k for k in sys.modules if k == "transport" or k.startswith("transport.")]:
            del sys.modules[k]
    drop()
    sys.path.insert(0, root)
    try:
        mod = importlib.import_module("transport")
    finally:
        sys.path.remove(root)
        drop()
    return mod


def commit(root: str) -> str:
    try:
        return subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sit", required=True)
    p.add_argument("--lightningdit", required=True)
    p.add_argument("--out", default=os.path.join(HERE, "transport_golden.pt"))
    args = p.parse_args()
    torch.set_num_threads(1)
    apis = {"sit": load_transport(args.sit), "ldit": load_transport(args.lightningdit)}
    results = {name: run(apis[which]) for name, (which, run) in cases().items()}
    for name, terms in results.items():  # a NaN golden would compare nothing
        for key, value in terms.items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise SystemExit(f"case {name}: the published {key} is not finite; drop or change the case")
    import torchdiffeq
    meta = {"sit_commit": commit(args.sit), "lightningdit_commit": commit(args.lightningdit),
            "torch": str(torch.__version__), "numpy": np.__version__, "torchdiffeq": torchdiffeq.__version__}
    atomic_save(args.out, lambda path: torch.save({"meta": meta, "cases": results}, path))
    print(f"wrote {len(results)} cases to {args.out}: {meta}")


if __name__ == "__main__":
    main()
