#!/usr/bin/env bash
# The one-shot GPU run: build, check, measure, all under OUTDIR in at most ~8 minutes.
#
#   bash benchmarks/gpu_check.sh OUTDIR            # on a fresh GPU machine (torch, triton, nvcc, ninja present;
#                                                  # no network: nothing is downloaded)
#   bash benchmarks/gpu_check.sh --dry-run OUTDIR  # (or DIT_FAST_DRY_RUN=1) every stage on the CPU with a tiny model
# Where the tree arrives without its .git (the device tool's copy), name the commit for the results files:
#   DIT_FAST_GIT_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_check.sh "$OUT"   (the hash written out literally)
#
# Stages (each under its own `timeout`; a failed or timed-out stage is recorded and the run goes on):
#   install     pip install --no-build-isolation --no-deps -e .  (builds dit_fast._C for this GPU's arch)
#   info        python -m dit_fast.info
#   gpu_tests   pytest -m gpu
#   parity      dit_fast vs the reference, fp32 and bf16, every backend (DiT-XL/2, random weights)
#   throughput  DiT-XL/2 256px fwd/cfg/train: reference eager, dit_fast per backend, torch.compile(reference)
#   sampling    one 256px image, CFG, 25 steps: the published loop on the reference vs dit_fast.sample with and
#               without CUDA graphs (ms per step; x10 for the published 250 steps)
#   kernels     per-op table (eager, torch.compile, triton, ext), B=256 L=256 D=1152 bf16
#   profile     per-kernel tables + Chrome traces, one block and the whole model, fwd and train
#   roofline    the predicted DiT-XL/2 B=256 budget from the ceilings measured now (dit-fast roofline --measure),
#               written to OUTDIR beside the measured results; summary.md puts predicted next to measured
#   report      one merged <date>-<gpu>.{json,md,png}
# OUTDIR then holds: summary.md, <date>-<gpu>.{json,md,png}, <date>-<gpu>-predicted-roofline.{json,md}, details.tar.gz (stage logs, per-stage results,
# traces) -- few files, so that a device tool returning a handful of files gets all of it. Set
# GPU_CHECK_KEEP=1 to keep the details/ tree unpacked too. Stage limits: GPU_CHECK_T_<STAGE>=seconds;
# GPU_CHECK_SKIP=gpu_tests,profile skips stages. The throughput stage runs eager contenders first and
# torch.compile(reference) last (compiling DiT-XL/2 is the slow part): if its limit cuts it, every eager
# number is already saved (<name>-partial.json is rewritten after every round; a stage cut by its limit
# is merged from it and marked incomplete).
set -u

DRY="${DIT_FAST_DRY_RUN:-0}"
OUTDIR=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) OUTDIR="$arg" ;;
  esac
done
OUTDIR="${OUTDIR:-benchmarks/results/gpu-check}"
PY="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
mkdir -p "$OUTDIR/details"
OUTDIR="$(cd "$OUTDIR" && pwd)"
DET="$OUTDIR/details"
export PYTHONUNBUFFERED=1
T0=$(date +%s)

# Stage limits in seconds (sum 480 = 8 minutes: every stage at its limit still ends in time).
t_install=${GPU_CHECK_T_INSTALL:-105}
t_info=${GPU_CHECK_T_INFO:-15}
t_gpu_tests=${GPU_CHECK_T_GPU_TESTS:-55}
t_parity=${GPU_CHECK_T_PARITY:-35}
t_throughput=${GPU_CHECK_T_THROUGHPUT:-140}
t_sampling=${GPU_CHECK_T_SAMPLING:-20}
t_kernels=${GPU_CHECK_T_KERNELS:-45}
t_profile=${GPU_CHECK_T_PROFILE:-30}
t_roofline=${GPU_CHECK_T_ROOFLINE:-15}
t_report=${GPU_CHECK_T_REPORT:-20}

if [ "$DRY" = "1" ]; then
  # Tiny model on the CPU: every stage runs its real command path, in seconds.
  COMMON=(--device cpu --model DiT-S/2 --input-size 8 --depth 1 --warmup 0 --iters 1 --no-progress)
  PARITY_ARGS=(--parity-dtypes fp32)
  THROUGHPUT_ARGS=(--mode fwd,train)
  SAMPLING_ARGS=(--sample-steps 2 --batch 1)
  t_sampling=${GPU_CHECK_T_SAMPLING:-90}  # a busy 2-core CI machine: imports alone take seconds
  KERNEL_ARGS=(--op gated_residual_adaln --batch 2)
  PROFILE_ARGS=(--target block --mode fwd)
  ROOFLINE_ARGS=(--device h100)  # no GPU to measure on: the spec ceilings
  export CUDA_VISIBLE_DEVICES=""
else
  COMMON=(--no-progress)
  PARITY_ARGS=(--parity-dtypes fp32,bf16)
  THROUGHPUT_ARGS=(--mode fwd,cfg,train --compile --warmup 3 --iters 10)
  # one 256px image with CFG, 25 steps (x10 for the published 250): reference loop vs dit_fast with/without graphs
  SAMPLING_ARGS=(--sample-steps 25 --batch 1 --iters 2)
  KERNEL_ARGS=(--compile --batch 256)
  PROFILE_ARGS=(--target block,model --mode fwd,train --batch 32)
  ROOFLINE_ARGS=(--measure)
fi

SUMMARY=()
stage() {  # stage NAME LIMIT_S CMD...: run with a timeout, log to details/NAME.log, record the outcome
  local name="$1" limit="$2"; shift 2
  local start end rc status
  case ",${GPU_CHECK_SKIP:-}," in *",$name,"*) SUMMARY+=("| $name | skipped | 0 |"); return ;; esac
  start=$(date +%s)
  echo "=== [$name] (limit ${limit}s): $*"
  timeout --kill-after=5 "$limit" "$@" >"$DET/$name.log" 2>&1
  rc=$?
  end=$(date +%s)
  case $rc in
    0) status="ok" ;;
    124|137) status="TIMEOUT" ;;
    *) status="FAIL (rc $rc)" ;;
  esac
  tail -n 25 "$DET/$name.log"
  SUMMARY+=("| $name | $status | $((end - start)) |")
}

# -- install ------------------------------------------------------------------------------------
if [ "$DRY" = "1" ]; then
  stage install "$t_install" echo "dry run: would run: $PY -m pip install --no-build-isolation --no-deps --no-index -e ."
else
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    # Build for this GPU only: half the nvcc time of the default two architectures.
    TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "9.0")
    export TORCH_CUDA_ARCH_LIST
  fi
  stage install "$t_install" "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
  # dit_fast.kernels exists only through the editable install (package_dir): a failed or timed-out
  # CUDA extension build must not take the Triton backend down with it. Reinstall without the extension.
  if ! "$PY" -c "import dit_fast.kernels" >/dev/null 2>&1; then
    stage install_noext 60 env DIT_FAST_SKIP_EXT=1 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
  fi
fi

stage info "$t_info" "$PY" -m dit_fast.info

# pytest exits 5 when no test is selected: not a failure here
PYTEST_OK5='"$0" -m pytest "$@"; rc=$?; [ $rc -eq 5 ] && exit 0; exit $rc'
if [ "$DRY" = "1" ]; then
  stage gpu_tests "$t_gpu_tests" bash -c "$PYTEST_OK5" "$PY" -m gpu --collect-only -q -p no:cacheprovider tests/test_flops.py
else
  # Most of this stage is Triton compiling kernel variants: spread it over 4 processes when xdist is there.
  XDIST=()
  "$PY" -c "import xdist" >/dev/null 2>&1 && XDIST=(-n 4)
  stage gpu_tests "$t_gpu_tests" bash -c "$PYTEST_OK5" "$PY" -m gpu -q -p no:cacheprovider "${XDIST[@]}" \
    --junitxml="$DET/gpu_tests.xml" tests
fi

stage parity "$t_parity" "$PY" -m dit_fast parity "${COMMON[@]}" "${PARITY_ARGS[@]}" --out "$DET"
stage throughput "$t_throughput" "$PY" -m dit_fast throughput "${COMMON[@]}" "${THROUGHPUT_ARGS[@]}" --out "$DET"
stage sampling "$t_sampling" "$PY" -m dit_fast throughput --mode sample "${COMMON[@]}" "${SAMPLING_ARGS[@]}" --out "$DET/sampling"
stage kernels "$t_kernels" "$PY" -m dit_fast kernels "${COMMON[@]}" --no-ceilings "${KERNEL_ARGS[@]}" --out "$DET"
stage profile "$t_profile" "$PY" -m dit_fast profile "${COMMON[@]}" "${PROFILE_ARGS[@]}" --out "$DET"
# the budget the throughput stage is measured against: DiT-XL/2 256px, B=256, forward and training step
stage roofline "$t_roofline" "$PY" -m dit_fast roofline --model DiT-XL/2 --batch 256 "${ROOFLINE_ARGS[@]}" --out "$OUTDIR"

# -- report: one merged results file (re-rendered from JSON, so stages cut by their timeout count too)
shopt -s nullglob
# a stage cut by its limit left only its -partial.json (a finished stage removes it)
JSONS=()
for what in parity throughput kernels profile; do
  for f in "$DET"/*-"$what".json "$DET"/*-"$what"-partial.json; do JSONS+=("$f"); done
done
for f in "$DET"/sampling/*-throughput.json "$DET"/sampling/*-throughput-partial.json; do JSONS+=("$f"); done
if [ ${#JSONS[@]} -gt 0 ]; then
  stage report "$t_report" "$PY" -m dit_fast report "${JSONS[@]}" --merge "$OUTDIR"
else
  SUMMARY+=("| report | FAIL (no results) | 0 |")
fi

# -- summary ------------------------------------------------------------------------------------
TOTAL=$(( $(date +%s) - T0 ))
{
  echo "# gpu_check $( [ "$DRY" = "1" ] && echo "(dry run, CPU) " )$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "| stage | status | seconds |"
  echo "|---|---|---|"
  printf '%s\n' "${SUMMARY[@]}"
  echo "| total |  | $TOTAL |"
  for md in "$OUTDIR"/*.md; do
    [ "$(basename "$md")" = "summary.md" ] && continue
    echo
    echo "Results: $(basename "$md")"
    case "$md" in
      *-roofline.md)  # predicted step per plan, to read beside the measured throughput
        grep -E '^(- ceilings|\| mode \| plan|\|---\|---\|---\|---\|---\|---\|---\|---\|---\|---\|---\|---\||\| (forward|train) \| (eager|inductor|dit_fast) \|)' "$md" ;;
      *)  # the headline tables: parity verdict and throughput
        grep -E '^(## Parity|\| (fwd|cfg|train) )' "$md" | head -n 40 ;;
    esac
  done
} >"$OUTDIR/summary.md"

tar -czf "$OUTDIR/details.tar.gz" -C "$OUTDIR" details 2>/dev/null || true
[ "${GPU_CHECK_KEEP:-0}" = "1" ] || rm -rf "$DET"

echo
cat "$OUTDIR/summary.md"
FAILED=$(printf '%s\n' "${SUMMARY[@]}" | grep -vcE '\| (ok|skipped) \|')
exit $(( FAILED > 0 ? 1 : 0 ))
