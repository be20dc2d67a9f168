#!/usr/bin/env bash
# The one-shot GPU run: build, measure, check, all under OUTDIR within 7 minutes (GPU_CHECK_BUDGET=420 s).
#
#   bash benchmarks/gpu_check.sh OUTDIR            # on a fresh GPU machine (torch, triton, nvcc, ninja present;
#                                                  # no network: nothing is downloaded)
#   bash benchmarks/gpu_check.sh --dry-run OUTDIR  # (or DIT_FAST_DRY_RUN=1) every stage on the CPU with a tiny model
# Where the tree arrives without its .git (the device tool's copy), name the commit for the results files:
#   DIT_FAST_GIT_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_check.sh "$OUT"   (the hash written out literally)
#
# Stages, most valuable first (each under its own `timeout`; a failed or timed-out stage is recorded, keeps
# every row it measured, and the run goes on):
#   install     pip install --no-build-isolation --no-deps -e .  (builds dit_fast._C for this GPU's arch only)
#   info        python -m dit_fast.info
#   train       DiT-XL/2 256px training step at B=32, then B=64: reference (SDPA, as users run it), reference-math,
#               dit_fast, torch.compile(reference); interleaved rounds on ONE shared model + AdamW state, peak
#               memory per contender
#   train_lightning  LightningDiT-XL/1 (the recipe: SwiGLU, RoPE, RMSNorm; 16x16x32 latents) training step at B=32
#               with its objective (transport, cosine loss, logit-normal t): dit_fast against the published model
#               as its authors run it (torch.compile per block, embedder and final layer) and eager
#   fwd_cfg     forward and CFG at B=256: the same contenders, eager first, compiled last
#   sampling    one 256px image, CFG, 25 steps: the published loop on the reference vs dit_fast.sample with and
#               without CUDA graphs (ms per step; x10 for the published 250 steps)
#   kernels     per-op table (eager, torch.compile, triton, ext), B=256 L=256 D=1152 bf16
#   parity      dit_fast vs the reference, fp32 and bf16, every backend (DiT-XL/2, random weights)
#   profile     per-kernel tables + Chrome traces, one block, training step
#   max_batch   the largest training batch that fits, reference and dit_fast (out-of-memory caught per try)
#   roofline    the predicted DiT-XL/2 B=256 budget from the ceilings measured now (dit-fast roofline --measure)
#   gpu_tests   a GPU-test subset, each test's outcome logged as it finishes (-v -rA, junit XML), in the time left
#   report      one merged <date>-<gpu>.{json,md,png}
# Every row is written the moment it is measured (<stage>/<name>-partial.json, atomically); summary.md is
# re-written from those files every 10 s while a stage runs and after it ends, so a stage cut by its limit
# leaves every measured row in summary.md, and the whole run cut from outside all but the last seconds'.
# OUTDIR then holds: summary.md, <date>-<gpu>.{json,md,png}, <date>-<gpu>-predicted-roofline.{json,md},
# details.tar.gz (stage logs, per-stage results, traces). GPU_CHECK_KEEP=1 keeps details/ unpacked too.
# Stage limits: GPU_CHECK_T_<STAGE>=seconds; GPU_CHECK_SKIP=gpu_tests,profile skips stages.
set -u

DRY="${DIT_FAST_DRY_RUN:-0}"
OUTDIR=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
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
: >"$DET/stages.tsv"
export PYTHONUNBUFFERED=1
T0=$(date +%s)

# Stage limits in seconds. Install + every stage at its limit = 403 s (388 without install_noext, which runs
# only when the extension build failed); gpu_tests gets what is left of the budget (at least 10 s), so the
# whole run ends within GPU_CHECK_BUDGET (420 s = 7 minutes).
BUDGET=${GPU_CHECK_BUDGET:-420}
SCALE=1
[ "$DRY" = "1" ] && SCALE=4  # a busy 2-core CPU machine: imports alone take seconds
# STAGE:SECONDS; GPU_CHECK_T_<STAGE> overrides one, and sets t_<stage>.
STAGE_LIMITS="INSTALL:85 INSTALL_NOEXT:15 INFO:8 TRAIN:120 TRAIN_LIGHTNING:60 FWD_CFG:30 SAMPLING:15 KERNELS:15
  PARITY:10 PROFILE:10 MAX_BATCH:15 ROOFLINE:10 REPORT:10"
for spec in $STAGE_LIMITS; do
  stage=${spec%:*}; override="GPU_CHECK_T_$stage"
  printf -v "t_${stage,,}" '%s' "${!override:-$(( ${spec#*:} * SCALE ))}"
done
t_gpu_tests=${GPU_CHECK_T_GPU_TESTS:-}

if [ "$DRY" = "1" ]; then
  # Tiny model on the CPU: every stage runs its real command path, in seconds (limits x4 and no overall
  # budget: a busy 2-core CI machine takes seconds for the imports alone).
  BUDGET=${GPU_CHECK_BUDGET:-0}
  DRY_ITERS=${GPU_CHECK_DRY_ITERS:-1}
  COMMON=(--device cpu --model DiT-S/2 --input-size 8 --depth 1 --no-progress)
  TRAIN_ARGS=(--batch 2 --warmup 0 --iters "$DRY_ITERS" --contender "reference,reference-math,dit_fast[torch]"
              --backend torch)
  LIGHTNING_ARGS=(--model LightningDiT-B/1 --input-size 4 --batch 2 --warmup 0 --iters "$DRY_ITERS"
                  --contender "reference,dit_fast[torch]" --backend torch)
  FWD_CFG_ARGS=(--batch 2 --warmup 0 --iters "$DRY_ITERS" --backend torch)
  SAMPLING_ARGS=(--sample-steps 2 --batch 1 --iters "$DRY_ITERS" --backend torch)
  KERNEL_ARGS=(--op gated_residual_adaln --batch 2 --iters 1 --rounds "$DRY_ITERS")
  PARITY_ARGS=(--parity-dtypes fp32 --backend torch)
  PROFILE_ARGS=(--target block --mode fwd --backend torch)
  MAX_BATCH_ARGS=()  # needs CUDA: skipped below
  ROOFLINE_ARGS=(--device h100)  # no GPU to measure on: the spec ceilings
  GPU_TEST_ARGS=(--collect-only -q tests/test_flops.py)
  t_gpu_tests=${t_gpu_tests:-60}
  export CUDA_VISIBLE_DEVICES=""
else
  COMMON=(--no-progress)
  # B=32 first (every contender), then B=64; eager contenders before the compiled one, which compiles the
  # training step first thing in its own process (no forward compile ahead of it)
  TRAIN_ARGS=(--batch 32,64 --compile --warmup 2 --iters 8
              --contender "reference,dit_fast[auto],reference-math,reference+compile" --backend auto)
  # LightningDiT-XL/1 as its authors train it (reference+compile-blocks) against dit_fast, B=32, one compile
  LIGHTNING_ARGS=(--model LightningDiT-XL/1 --batch 32 --compile --warmup 2 --iters 6
                  --contender "reference,dit_fast[auto],reference+compile-blocks" --backend auto)
  FWD_CFG_ARGS=(--batch 256 --compile --warmup 2 --iters 8 --contender "reference,dit_fast[auto],reference+compile"
                --backend auto)
  SAMPLING_ARGS=(--sample-steps 25 --batch 1 --iters 2)
  KERNEL_ARGS=(--compile --batch 256 --rounds 3)
  PARITY_ARGS=(--parity-dtypes fp32,bf16)
  PROFILE_ARGS=(--target block --mode train --batch 32)
  MAX_BATCH_ARGS=(--mode train --batch 64 --max-batch --warmup 1 --iters 3 --contender "reference,dit_fast[auto]"
                  --backend auto)
  ROOFLINE_ARGS=(--measure)
  # the GPU tests of the fused ops and attention (no fullgraph compiles), one process: no per-worker JIT
  GPU_TEST_ARGS=(-v -rA -p no:cacheprovider --junitxml="$DET/gpu_tests.xml" -m gpu
                 tests/test_ops_adaln.py tests/test_ops_embed.py tests/test_attention.py tests/test_ext.py
                 tests/test_sampling.py)
fi

summary() {  # summary.md from every results file so far (stdlib only: no torch import)
  "$PY" "$ROOT/dit_fast/bench/summary.py" "$OUTDIR" $( [ "$DRY" = "1" ] && echo --dry-run ) \
    >>"$DET/summary.log" 2>&1 || echo "summary.md not written: see details/summary.log"
}

stage() {  # stage NAME LIMIT_S CMD...: run with a timeout, log to details/NAME.log, record the outcome
  local name="$1" limit="$2"; shift 2
  local start end rc status
  case ",${GPU_CHECK_SKIP:-}," in *",$name,"*)
    printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >>"$DET/stages.tsv"; return ;; esac
  start=$(date +%s)
  echo "=== [$name] (limit ${limit}s): $*"
  # summary.md follows the rows while the stage runs: a run cut from outside loses at most the last seconds
  ( while sleep "${GPU_CHECK_SUMMARY_EVERY:-10}"; do summary; done ) &
  local refresher=$!
  timeout --kill-after=5 "$limit" "$@" >"$DET/$name.log" 2>&1
  rc=$?
  kill "$refresher" 2>/dev/null
  wait "$refresher" 2>/dev/null
  end=$(date +%s)
  case $rc in
    0) status="ok" ;;
    124|137|143) status="TIMEOUT (rows kept)" ;;
    *) status="FAIL (rc $rc)" ;;
  esac
  tail -n 15 "$DET/$name.log"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((end - start))" "$limit" >>"$DET/stages.tsv"
  summary
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
    stage install_noext "$t_install_noext" env DIT_FAST_SKIP_EXT=1 "$PY" -m pip install --no-build-isolation \
      --no-deps --no-index -e .
  fi
fi

stage info "$t_info" "$PY" -m dit_fast.info
stage train "$t_train" "$PY" -m dit_fast throughput --mode train "${COMMON[@]}" "${TRAIN_ARGS[@]}" --out "$DET/train"
stage train_lightning "$t_train_lightning" "$PY" -m dit_fast throughput --mode train "${COMMON[@]}" \
  "${LIGHTNING_ARGS[@]}" --out "$DET/train_lightning"
stage fwd_cfg "$t_fwd_cfg" "$PY" -m dit_fast throughput --mode fwd,cfg "${COMMON[@]}" "${FWD_CFG_ARGS[@]}" \
  --out "$DET/fwd_cfg"
stage sampling "$t_sampling" "$PY" -m dit_fast throughput --mode sample "${COMMON[@]}" "${SAMPLING_ARGS[@]}" \
  --out "$DET/sampling"
stage kernels "$t_kernels" "$PY" -m dit_fast kernels "${COMMON[@]}" --no-ceilings "${KERNEL_ARGS[@]}" --out "$DET/kernels"
stage parity "$t_parity" "$PY" -m dit_fast parity "${COMMON[@]}" "${PARITY_ARGS[@]}" --out "$DET/parity"
stage profile "$t_profile" "$PY" -m dit_fast profile "${COMMON[@]}" "${PROFILE_ARGS[@]}" --out "$DET/profile"
if [ "$DRY" = "1" ]; then
  printf 'max_batch\tskipped (needs CUDA)\t0\t%s\n' "$t_max_batch" >>"$DET/stages.tsv"
else
  stage max_batch "$t_max_batch" "$PY" -m dit_fast throughput "${COMMON[@]}" "${MAX_BATCH_ARGS[@]}" --out "$DET/max_batch"
fi
# the budget the throughput stages are measured against: DiT-XL/2 256px, B=256, forward and training step
stage roofline "$t_roofline" "$PY" -m dit_fast roofline --model DiT-XL/2 --batch 256 "${ROOFLINE_ARGS[@]}" --out "$OUTDIR"

# pytest exits 5 when no test is selected: not a failure here
PYTEST_OK5='"$0" -m pytest "$@"; rc=$?; [ $rc -eq 5 ] && exit 0; exit $rc'
if [ -z "$t_gpu_tests" ]; then  # what is left of the budget, keeping the report's share
  t_gpu_tests=$(( BUDGET - ($(date +%s) - T0) - t_report - 5 ))
  [ "$t_gpu_tests" -lt 10 ] && t_gpu_tests=10
fi
stage gpu_tests "$t_gpu_tests" bash -c "$PYTEST_OK5" "$PY" "${GPU_TEST_ARGS[@]}"

# -- report: one merged results file (from the JSON, so stages cut by their limit count too) -----------
shopt -s nullglob
JSONS=()
for what in train train_lightning fwd_cfg sampling kernels parity profile max_batch; do
  for f in "$DET/$what"/*.json; do
    # a -partial file whose stage then finished is superseded by the complete one
    case "$f" in *-partial.json) [ -e "${f%-partial.json}.json" ] && continue ;; esac
    JSONS+=("$f")
  done
done
if [ ${#JSONS[@]} -gt 0 ]; then
  stage report "$t_report" "$PY" -m dit_fast report "${JSONS[@]}" --merge "$OUTDIR"
else
  printf 'report\tFAIL (no results)\t0\t%s\n' "$t_report" >>"$DET/stages.tsv"
fi

TOTAL=$(( $(date +%s) - T0 ))
printf 'total\t\t%s\t%s\n' "$TOTAL" "$BUDGET" >>"$DET/stages.tsv"
summary
FAILED=$(cut -f2 "$DET/stages.tsv" | grep -vcE '^(ok|skipped.*|)$')
tar -czf "$OUTDIR/details.tar.gz" -C "$OUTDIR" details 2>/dev/null || true
[ "${GPU_CHECK_KEEP:-0}" = "1" ] || rm -rf "$DET"

echo
cat "$OUTDIR/summary.md" 2>/dev/null
exit $(( FAILED > 0 ? 1 : 0 ))
