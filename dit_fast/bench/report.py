"""Results files: JSON (everything), Markdown tables, PNG charts.

Names: <out>/<date>-<device>[-<what>].{json,md,png}, e.g. 2026-11-26-h100-80gb-hbm3.json (bench)
or 2026-11-26-cpu-kernels.md. A run in progress checkpoints to <name>-partial.json (status "partial")
and writes the final name only when it completes, then removes its partial file: a killed or
interrupted run never replaces the complete result of an earlier one. Every file is written
atomically (dit_fast.atomic). matplotlib is imported lazily with the Agg backend; without it the
PNG is skipped.
"""
from __future__ import annotations

import contextlib
import json
import os

from ..atomic import atomic_write, write_text
from .number_format import format_float

PARTIAL = "-partial"
SECTION_KEYS = ("parity", "throughput", "sampling", "kernels", "overhead", "profile", "roofline")


def stem(out_dir: str, env: dict, what: str = "") -> str:
    slug = env.get("device_slug") or "cpu"
    return os.path.join(out_dir, f"{env['date'][:10]}-{slug}{'-' + what if what else ''}")


def write_json(path: str, record: dict) -> str:
    with atomic_write(path, "w") as f:
        json.dump(record, f, indent=1, default=_jsonable, allow_nan=True)
    return path


def remove_partial(out_dir: str, env: dict, what: str = "") -> None:
    """Drop this run's -partial checkpoint files once the complete result is written."""
    base = stem(out_dir, env, what) + PARTIAL
    for ext in (".json", ".md"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(base + ext)


def read_record(path: str) -> dict:
    """A results JSON, checked for the structure the writers need; ValueError naming the file otherwise."""
    try:
        with open(path) as f:
            record = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a dit_fast results object (JSON object), "
                         f"got a JSON {type(record).__name__}")
    env = record.get("env")
    if not isinstance(env, dict) or not isinstance(env.get("date"), str):
        raise ValueError(f"{path}: expected an 'env' object with a 'date' string (a dit_fast results file), "
                         f"got {type(env).__name__ if env is not None else 'no env'}")
    if not any(record.get(k) for k in SECTION_KEYS):
        raise ValueError(f"{path}: expected at least one non-empty section of {', '.join(SECTION_KEYS)}, found none")
    for key in SECTION_KEYS:
        rows = record.get(key)
        if rows is None:
            continue
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{path}: expected '{key}' to be a list of objects, got {type(rows).__name__}")
    for key in ("notes",):
        if key in record and not isinstance(record[key], list):
            raise ValueError(f"{path}: expected '{key}' to be a list, got {type(record[key]).__name__}")
    return record


def _jsonable(v):
    if hasattr(v, "item"):
        return v.item()
    return str(v)


# -- Markdown ----------------------------------------------------------------------------------

def _fmt(v, digits=3) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "PASS" if v else "FAIL"
    if isinstance(v, float):
        return format_float(v, digits)
    return str(v)


# Columns only some runs have (the model family's): shown only when a row has a value.
OPTIONAL_KEYS = {"model", "sampler", "losses", "speedup_vs_compile_blocks", "speedup_vs_compile_blocks_spread_pct"}


def md_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """columns: (key, header) pairs; missing values print empty (an OPTIONAL_KEYS column no row has: left out)."""
    columns = [(k, h) for k, h in columns if k not in OPTIONAL_KEYS or any(r.get(k) is not None for r in rows)]
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def env_lines(env: dict, ceilings: dict | None) -> str:
    dev = env.get("device_name", "?")
    extra = f", {env['sm_count']} SMs, sm_{env['compute_capability'].replace('.', '')}" if env.get("sm_count") else ""
    lines = [
        f"- device: {dev}{extra}",
        f"- torch {env.get('torch')}, CUDA {env.get('cuda')}, triton {env.get('triton')}, "
        f"flash-attn {env.get('flash_attn')}, dit_fast._C built: {env.get('ext_built')}",
        f"- commit {env.get('git_commit', 'unknown')[:12]}{' (dirty)' if env.get('git_dirty') else ''}, "
        f"{env.get('date')}",
    ]
    if ceilings and ceilings.get("source"):
        lines.append(f"- ceilings: copy {ceilings.get('copy_gb_per_s')} GB/s, bf16 GEMM {ceilings.get('gemm_tflops')} "
                     f"TFLOP/s ({ceilings['source']})")
    elif ceilings:
        lines.append(
            f"- measured ceilings: copy {ceilings.get('copy_gb_per_s')} GB/s (read+write), "
            f"bf16 GEMM {ceilings.get('gemm_tflops')} TFLOP/s ({ceilings.get('gemm_n')}^3)"
        )
    return "\n".join(lines)


THROUGHPUT_COLS = [
    ("model", "model"), ("mode", "mode"), ("contender", "contender"), ("batch", "batch"), ("ms_per_iter", "ms/iter"),
    ("spread_pct", "spread %"),
    ("images_per_s", "img/s"), ("tflops", "TFLOP/s"), ("mfu", "MFU"), ("peak_mem_gib", "peak GiB"),
    ("speedup_vs_eager", "x eager"), ("speedup_vs_eager_spread_pct", "spread %"),
    ("speedup_vs_compile", "x compile"), ("speedup_vs_compile_spread_pct", "spread %"),
    ("speedup_vs_compile_blocks", "x compile-blocks"), ("speedup_vs_compile_blocks_spread_pct", "spread %"),
    ("noise", "noise"), ("error", "error"),
]
# (flag key, what it is about) per table: a row is marked NOISY when any of them is set
THROUGHPUT_NOISE = (("noisy", "time"), ("speedup_vs_eager_noisy", "x eager"), ("speedup_vs_compile_noisy", "x compile"),
                    ("speedup_vs_compile_blocks_noisy", "x compile-blocks"))
SAMPLING_NOISE = (("noisy", "time"),)  # a sampling row's bool `noisy` is no pass/fail: shown as NOISY or blank
KERNEL_NOISE = (("fwd_noisy", "fwd"), ("fwd_bwd_noisy", "fwd+bwd"), ("fwd_speedup_vs_eager_noisy", "fwd x eager"),
                ("fwd_bwd_speedup_vs_eager_noisy", "fwd+bwd x eager"))
OVERHEAD_COLS = [
    ("op", "op"), ("backend", "backend"), ("grad", "autograd"), ("us_per_call", "µs/call"), ("us_min", "min µs"),
    ("spread_pct", "spread %"),
    ("launcher", "launcher"), ("noise", "noise"), ("na", "n/a"), ("error", "error"),
]
OVERHEAD_INTRO = ("Host time per call of each public op wrapper (dit_fast.ops, input checks and backend dispatch "
                  "included) on tiny tensors (B=1 L=4 D=8), eager; autograd = inputs require grad (forward only, "
                  "the graph is built). Median over interleaved rounds. Kernel time on these sizes is small but "
                  "not zero on the CPU; see the notes for triton.")


def with_noise(row: dict, flags) -> dict:
    noisy = [what for key, what in flags if row.get(key)]
    return row | {"noise": ("NOISY: " + ", ".join(noisy)) if noisy else None}


def noise_lines(rows: list[dict]) -> list[str]:
    n = sum(1 for r in rows if r.get("noise"))
    if not n:
        return []
    return [f"**{n} of {len(rows)} rows are NOISY** (spread over 10% of the median across rounds): the machine was "
            "not quiet; compare their medians only where the difference exceeds the spread."]
PARITY_COLS = [
    ("backend", "backend"), ("dtype", "dtype"), ("quantity", "quantity"), ("rel_err_vs_fp64", "rel err vs fp64"),
    ("ref_rel_err_vs_fp64", "reference's"), ("bound", "bound"), ("rel_err_vs_ref", "rel err vs ref"),
    ("max_abs_vs_ref", "max abs vs ref"), ("pass", "result"), ("worst_param", "worst param"), ("error", "error"),
]
KERNEL_COLS = [
    ("op", "op"), ("shape", "shape"), ("dtype", "dtype"), ("backend", "backend"), ("fwd_ms", "fwd ms"),
    ("fwd_gb_per_s", "fwd GB/s"),
    ("fwd_pct_copy", "fwd % copy"), ("fwd_bwd_ms", "fwd+bwd ms"), ("fwd_bwd_gb_per_s", "fwd+bwd GB/s"),
    ("fwd_bwd_pct_copy", "fwd+bwd % copy"), ("fwd_tflops", "fwd TFLOP/s"), ("fwd_spread_pct", "fwd spread %"),
    ("fwd_bwd_spread_pct", "fwd+bwd spread %"), ("fwd_speedup_vs_eager", "fwd x eager"),
    ("fwd_speedup_vs_eager_spread_pct", "spread %"), ("fwd_bwd_speedup_vs_eager", "fwd+bwd x eager"),
    ("fwd_bwd_speedup_vs_eager_spread_pct", "spread %"), ("noise", "noise"), ("skipped", "skipped"), ("error", "error"),
]
SAMPLING_COLS = [
    ("model", "model"), ("sampler", "sampler"), ("contender", "contender"), ("batch", "batch"),
    ("num_steps", "steps"), ("median_ms", "ms per call"),
    ("spread_pct", "spread %"), ("ms_per_step", "ms per step"), ("images_per_s", "images/s"),
    ("speedup_vs_reference", "x reference"), ("noise", "noise"), ("error", "error"),
]
PROFILE_KERNEL_COLS = [("name", "kernel / op"), ("calls", "calls"), ("total_us", "total µs"), ("mean_us", "mean µs"),
                       ("pct", "% of step (kernel time)")]
PROFILE_RANGE_COLS = [("range", "range"), ("calls", "calls"), ("total_us", "total µs"), ("mean_us", "mean µs"),
                      ("pct", "%")]


def _clip_name(rows: list[dict], n: int = 90) -> list[dict]:
    return [r | {"name": (r["name"][: n - 1] + "…") if len(r.get("name", "")) > n else r.get("name")} for r in rows]


def markdown(record: dict) -> str:
    cfg = record.get("config", {})
    status = record.get("status", "complete")
    parts = [f"# dit_fast {record.get('kind', 'results')}: {cfg.get('model', '')} {cfg.get('image_size', '')}px"
             + ("" if status == "complete" else f" (INCOMPLETE: {status})"),
             "", env_lines(record["env"], record.get("ceilings")), ""]
    if cfg:
        parts += ["Config: " + ", ".join(f"{k}={v}" for k, v in cfg.items()), ""]
    if "flops" in record:
        f = record["flops"]
        parts += [f"FLOPs: {f['forward_gmacs_per_image']:.2f} GMACs forward per image "
                  f"({f['forward_gflops_per_image']:.1f} GFLOP; training step x3).", ""]
    if record.get("parity"):
        ok = all(r["pass"] for r in record["parity"])
        parts += [f"## Parity against the reference ({'PASS' if ok else 'FAIL'})", "",
                  md_table(record["parity"], PARITY_COLS), ""]
    if record.get("throughput"):
        rows = [with_noise(r, THROUGHPUT_NOISE) for r in record["throughput"]]
        parts += ["## Throughput", "", md_table(rows, THROUGHPUT_COLS), "", *noise_lines(rows), ""]
    if record.get("sampling"):
        rows = [with_noise(r, SAMPLING_NOISE) for r in record["sampling"]]
        parts += ["## Sampling (CFG, one call = all steps)", "", md_table(rows, SAMPLING_COLS), "", *noise_lines(rows),
                  ""]
    if record.get("kernels"):
        rows = [with_noise(r, KERNEL_NOISE) for r in record["kernels"]]
        parts += ["## Kernels", "",
                  "Bytes: each input read once + each output written once; backward: output grads read, "
                  "what the backward needs read (per op), input grads written (dit_fast/bench/kernels.py).", "",
                  md_table(rows, KERNEL_COLS), "", *noise_lines(rows), ""]
    if record.get("overhead"):
        parts += ["## Host overhead per op call", "", OVERHEAD_INTRO, "",
                  md_table(record["overhead"], OVERHEAD_COLS), ""]
    if record.get("roofline"):
        from .roofline import markdown_section

        parts += markdown_section(record)
    for p in record.get("profile", []):
        parts += [f"## Profile: {p['contender']} {p['target']} {p['mode']} (batch {p['batch']}, {p['iters']} steps"
                  + (f", trace {p['trace']}" if p.get("trace") else "") + ")", "",
                  md_table(_clip_name(p["kernels"][:20]), PROFILE_KERNEL_COLS), ""]
        if p.get("ranges"):
            parts += ["Block ranges:", "", md_table(p["ranges"], PROFILE_RANGE_COLS), ""]
    for note in record.get("notes", []):
        parts.append(f"- {note}")
    return "\n".join(parts).rstrip() + "\n"


def write_markdown(path: str, record: dict) -> str:
    return write_text(path, markdown(record))


# -- charts ------------------------------------------------------------------------------------

def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_charts(path: str, record: dict) -> str | None:
    """One PNG with a panel per section present: throughput, kernel latency, profile top kernels."""
    plt = _pyplot()
    if plt is None:
        return None
    panels = []
    if any(r.get("images_per_s") for r in record.get("throughput", [])):
        panels.append(_throughput_panel)
    if any(r.get("fwd_ms") for r in record.get("kernels", [])):
        panels.append(_kernel_panel)
    if any(p.get("kernels") for p in record.get("profile", [])):
        panels.append(_profile_panel)
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 4.2 * len(panels)), squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        panel(ax, record)
    title = f"{record['env'].get('device_name', '')} - {record.get('config', {}).get('model', '')}"
    fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)
    return path


def _grouped(ax, groups: list[str], series: dict[str, list[float]], ylabel: str, log: bool = False):
    n = max(len(series), 1)
    width = 0.8 / n
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (k - (n - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, [v if v else 0 for v in values], width, label=name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=0, fontsize=8)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=min(n, 4))


def _throughput_panel(ax, record):
    rows = [r for r in record["throughput"] if r.get("images_per_s")]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    names = list(dict.fromkeys(r["contender"] for r in rows))
    val = {(r["contender"], r["mode"]): r["images_per_s"] for r in rows}
    _grouped(ax, modes, {n: [val.get((n, m)) for m in modes] for n in names}, "images/s")
    ax.set_title("Throughput (higher is better)")


def _kernel_panel(ax, record):
    rows = [r for r in record["kernels"] if r.get("fwd_ms")]
    first_shape, first_dtype = rows[0]["shape"], rows[0].get("dtype")
    rows = [r for r in rows if r["shape"] == first_shape and r.get("dtype") == first_dtype]
    ops = list(dict.fromkeys(r["op"] for r in rows))
    names = list(dict.fromkeys(r["backend"] for r in rows))
    val = {(r["backend"], r["op"]): r["fwd_ms"] for r in rows}
    _grouped(ax, ops, {n: [val.get((n, o)) for o in ops] for n in names}, "forward ms (log)", log=True)
    ax.set_title(f"Kernel latency, {first_shape} {first_dtype or ''} (lower is better)")


def _profile_panel(ax, record):
    p = next(p for p in record["profile"] if p.get("kernels"))
    top = p["kernels"][:12][::-1]
    ax.barh([r["name"][:60] for r in top], [r["total_us"] / max(p["iters"], 1) for r in top])
    ax.set_xlabel("µs per step")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(f"Top kernels: {p['contender']} {p['target']} {p['mode']}")


def write_all(out_dir: str, record: dict, what: str = "", png: bool = True, partial: bool = False) -> dict[str, str]:
    """JSON + Markdown (+ PNG) under out_dir, under the -partial name when `partial`; returns the paths written."""
    base = stem(out_dir, record["env"], what) + (PARTIAL if partial else "")
    paths = {"json": write_json(base + ".json", record), "md": write_markdown(base + ".md", record)}
    chart = write_charts(base + ".png", record) if png else None
    if chart:
        paths["png"] = chart
    return paths
