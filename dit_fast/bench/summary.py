"""summary.md of a gpu_check run: the stage table and every row any stage measured, re-written after each stage.

    python dit_fast/bench/summary.py OUTDIR [--dry-run]

Reads OUTDIR/details/stages.tsv (one line per finished stage: name, status, seconds, limit, appended by
benchmarks/gpu_check.sh), every results JSON under OUTDIR/details/<stage>/ (complete, or the
<name>-partial.json a stage cut by its limit left behind: every row it measured), the per-test outcome
lines of details/gpu_tests.log and the predicted roofline in OUTDIR. Rows are listed as they are, error
rows included, each marked with where it came from (a partial file says so).

Stdlib only and run as a script (not `-m`): importing the package would import torch, seconds per
stage on the machine whose minutes are counted. The write goes through dit_fast/atomic.py, loaded from
its file for the same reason.
"""
from __future__ import annotations

import datetime
import glob
import importlib.util
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# (section, title, columns): what each kind of row shows in the summary
TABLES = (
    ("throughput", "Throughput (training step, forward, CFG)",
     ("mode", "contender", "batch", "model", "ms_per_iter", "spread_pct", "images_per_s", "mfu", "peak_mem_gib",
      "speedup_vs_eager", "speedup_vs_compile", "speedup_vs_compile_blocks", "largest_batch", "oom_batch",
      "error")),
    ("sampling", "Sampling", ("contender", "batch", "model", "sampler", "num_steps", "median_ms", "ms_per_step",
                              "spread_pct", "speedup_vs_reference", "error")),
    ("kernels", "Kernels", ("op", "shape", "dtype", "backend", "fwd_ms", "fwd_gb_per_s", "fwd_bwd_ms",
                            "fwd_bwd_gb_per_s", "fwd_speedup_vs_eager", "fwd_bwd_speedup_vs_eager", "skipped",
                            "error")),
    ("parity", "Parity", ("backend", "dtype", "quantity", "rel_err_vs_fp64", "bound", "pass", "error")),
    ("profile", "Profile", ("contender", "target", "mode", "batch", "iters", "top_kernel", "step_cpu_us", "error")),
    ("roofline_summary", "Roofline (PREDICTED from the measured ceilings, not measured)",
     ("mode", "plan", "step_ms", "images_per_s", "mfu", "gb", "speedup_vs_eager", "speedup_vs_inductor")),
)
TEST_OUTCOME = re.compile(r"^(tests/\S+::\S+).*?\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b"
                          r"|^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (tests/\S+)")


def _load_file(name: str, *path: str):
    """A module of this package loaded from its file, without importing the package (module docstring)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, *path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _atomic():
    return _load_file("_dit_fast_atomic", "..", "atomic.py")


_format_float = _load_file("_dit_fast_number_format", "number_format.py").format_float


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return _format_float(v)
    return str(v).replace("|", "/").replace("\n", " ")[:160]


def _table(rows: list[dict], cols) -> list[str]:
    cols = [c for c in cols if any(r.get(c) not in (None, "") for r in rows)] + ["from"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return out


def _stage_of(path: str, details: str) -> str:
    rel = os.path.relpath(path, details)
    return rel.split(os.sep)[0] if os.sep in rel else "-"


def collect(outdir: str) -> dict[str, list[dict]]:
    """section -> rows, each row with "from": '<stage>' or '<stage> (partial: <status>)'."""
    details = os.path.join(outdir, "details")
    paths = sorted(glob.glob(os.path.join(details, "*", "*.json")))
    paths += sorted(glob.glob(os.path.join(outdir, "*-predicted-roofline.json")))
    sections: dict[str, list[dict]] = {}
    for path in paths:
        if path.endswith("-partial.json") and os.path.exists(path[: -len("-partial.json")] + ".json"):
            continue  # the stage finished after this checkpoint: its complete file holds every row
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, ValueError) as e:  # a stage killed mid-write leaves no such file (atomic writes)
            sections.setdefault("unreadable", []).append({"file": os.path.basename(path), "error": str(e)})
            continue
        if not isinstance(record, dict):
            continue
        status = record.get("status", "complete")
        where = _stage_of(path, details) if path.startswith(details) else "roofline"
        source = where if status == "complete" else f"{where} ({'partial: ' if 'partial' in path else ''}{status})"
        for section, _, _ in TABLES:
            for row in record.get(section) or []:
                if not isinstance(row, dict):
                    continue
                row = dict(row, **{"from": source})
                if section == "profile":
                    top = (row.get("kernels") or [{}])[0]
                    row["top_kernel"] = f"{top.get('name', '')[:60]} {_fmt(top.get('pct'))}%" if top else None
                sections.setdefault(section, []).append(row)
    return sections


def test_outcomes(log_path: str) -> list[str]:
    """'outcome test-id' per test that finished, from pytest -v / -rA output (in the order they finished)."""
    if not os.path.exists(log_path):
        return []
    seen, out = set(), []
    with open(log_path, errors="replace") as f:
        for line in f:
            m = TEST_OUTCOME.match(line.strip())
            if not m:
                continue
            test, outcome = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
            if (test, outcome) not in seen:
                seen.add((test, outcome))
                out.append(f"{outcome} {test}")
    return out


def render(outdir: str, dry_run: bool = False) -> str:
    details = os.path.join(outdir, "details")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = [f"# gpu_check {'(dry run, CPU) ' if dry_run else ''}{now}", "",
             "| stage | status | seconds | limit |", "|---|---|---|---|"]
    stages_path = os.path.join(details, "stages.tsv")
    if os.path.exists(stages_path):
        with open(stages_path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 3:
                    lines.append("| " + " | ".join((parts + [""])[:4]) + " |")
    sections = collect(outdir)
    for section, title, cols in TABLES:
        rows = sections.get(section)
        if rows:
            lines += ["", f"## {title}", "", *_table(rows, cols)]
    if sections.get("unreadable"):
        lines += ["", "## Unreadable results files", "", *_table(sections["unreadable"], ("file", "error"))]
    outcomes = test_outcomes(os.path.join(details, "gpu_tests.log"))
    if outcomes:
        counts: dict[str, int] = {}
        for o in outcomes:
            counts[o.split()[0]] = counts.get(o.split()[0], 0) + 1
        lines += ["", "## GPU tests (each outcome as it finished)", "",
                  ", ".join(f"{n} {k}" for k, n in counts.items()), "", *[f"- {o}" for o in outcomes]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    dry = "--dry-run" in args
    args = [a for a in args if a != "--dry-run"]
    if len(args) != 1 or not os.path.isdir(args[0]):
        print(f"usage: summary.py OUTDIR [--dry-run]: expected an existing directory, got {args}", file=sys.stderr)
        return 2
    _atomic().write_text(os.path.join(args[0], "summary.md"), render(args[0], dry))
    return 0


if __name__ == "__main__":
    sys.exit(main())
