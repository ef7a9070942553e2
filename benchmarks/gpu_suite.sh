#!/usr/bin/env bash
# GPU check and benchmark in one go, for a machine with an H100/H200 and no package registry.
#
#   OUT=/some/folder bash benchmarks/gpu_suite.sh          # on the GPU machine
#   bash benchmarks/gpu_suite.sh --dry-run                 # anywhere: tiny CPU run, catches typos
#
# Stages (each with its own time limit, all logged; a failing stage does not stop the others):
#   1. install the package, building the CUDA extension (no other package is installed)
#   2. pytest -m gpu, then the triton/cuda tests (-k "triton or cuda") on the GPU
#   3. eupmu-bench: every backend's explicit and implicit step vs AdamW(fused=True), naive
#      surgery and composed torch on 1e8 fp32 parameters (GPT-2 and Llama layouts), then bf16
#   4. profile_step: torch.profiler traces of naive surgery, composed torch and EUPMU
# Writes into "$OUT": env.txt, suite.log, install.log, pytest-gpu.log, pytest-kernels.log,
# bench-*/ (JSON, markdown table, PNG, log), profile/ (chrome traces, op tables, summary.md),
# summary.txt. Exit status: 0 when every stage passed.
# Budget: the stage limits (overridable, e.g. BENCH_FP32_LIMIT=200) add up to under 8 minutes
# even if every stage runs into its limit; a usual run takes far less.
set -uo pipefail

DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    [[ $DRY_RUN == 1 && -x .venv/bin/python ]] && PYTHON=.venv/bin/python
fi
OUT="${OUT:-}"
if [[ -z "$OUT" ]]; then
    if [[ $DRY_RUN == 1 ]]; then OUT="$(mktemp -d)"; else echo "set OUT to the output folder" >&2; exit 2; fi
fi
mkdir -p "$OUT"

# Time limits per stage (seconds); together with the small steps they stay under 8 minutes.
INSTALL_LIMIT="${INSTALL_LIMIT:-120}"
GPU_TEST_LIMIT="${GPU_TEST_LIMIT:-70}"
KERNEL_TEST_LIMIT="${KERNEL_TEST_LIMIT:-40}"
BENCH_FP32_LIMIT="${BENCH_FP32_LIMIT:-100}"
BENCH_BF16_LIMIT="${BENCH_BF16_LIMIT:-70}"
PROFILE_LIMIT="${PROFILE_LIMIT:-30}"
SIZES="${SIZES:-1e8}"

if [[ $DRY_RUN == 1 ]]; then
    DEVICE=cpu; SIZES=2e5; PROFILE_NUMEL=2e5; BENCH_EXTRA=(--repeats 2 --warmup 1 --bandwidth-numel 1e6 --no-plot)
    PYTEST_EXTRA=(--collect-only -q)
else
    DEVICE=cuda; PROFILE_NUMEL=1e8; BENCH_EXTRA=(--repeats 20 --warmup 3)
    PYTEST_EXTRA=(-q)
fi

STAGES=()
declare -A STATUS
SUITE_START=$SECONDS

stage() {  # stage NAME LIMIT LOG COMMAND...
    local name=$1 limit=$2 log=$3; shift 3
    local start=$SECONDS
    echo "== $name (limit ${limit}s): $(printf "%q " "$@")" | tee -a "$OUT/suite.log"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$log" 2>&1
    local rc=$?
    [[ $rc == 5 && $name == pytest-* ]] && rc=0  # pytest: no test selected is not a failure
    STAGES+=("$name")
    STATUS[$name]=$rc
    echo "   rc=$rc after $((SECONDS - start))s, log: $log" | tee -a "$OUT/suite.log"
    tail -n 5 "$log" | sed 's/^/   | /' | tee -a "$OUT/suite.log"
}

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "dry run: $DRY_RUN"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    command -v nvcc >/dev/null && nvcc --version | tail -n 2
    "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
    "$PYTHON" -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not importable"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. Install (editable, builds the extension). --no-index: never reach for a registry.
if [[ $DRY_RUN == 1 ]]; then
    echo "== install skipped in a dry run; it would run:" | tee -a "$OUT/suite.log"
    echo "   EUPMU_BUILD_CUDA=1 MAX_JOBS=16 $PYTHON -m pip install --no-index --no-build-isolation --no-deps -e ." \
        | tee -a "$OUT/suite.log"
else
    stage install "$INSTALL_LIMIT" "$OUT/install.log" env EUPMU_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" \
        "$PYTHON" -m pip install --no-index --no-build-isolation --no-deps -e .
    if [[ ${STATUS[install]} != 0 ]]; then
        # Keep the Triton and torch measurements even when the extension does not build.
        stage install-without-extension 30 "$OUT/install-fallback.log" env EUPMU_BUILD_CUDA=0 \
            "$PYTHON" -m pip install --no-index --no-build-isolation --no-deps -e .
    fi
fi
"$PYTHON" -c "import eupmu_kernels, eupmu_bench; print('backends:', eupmu_kernels.available_backends())" \
    2>&1 | tee -a "$OUT/suite.log"

# 2. Tests on the GPU.
stage pytest-gpu "$GPU_TEST_LIMIT" "$OUT/pytest-gpu.log" "$PYTHON" -m pytest -m gpu "${PYTEST_EXTRA[@]}"
stage pytest-kernels "$KERNEL_TEST_LIMIT" "$OUT/pytest-kernels.log" \
    "$PYTHON" -m pytest -k "triton or cuda" -m "not gpu and not slow" "${PYTEST_EXTRA[@]}"

# 3. Benchmarks: fp32 on both layouts, then bf16 (moments in bf16 like torch.optim's, so the
#    ratios to fused AdamW compare equal work; add --state-dtype float32 for fp32 moments).
bench() {  # bench NAME LIMIT ARGS...
    local name=$1 limit=$2; shift 2
    mkdir -p "$OUT/$name"
    stage "$name" "$limit" "$OUT/$name/bench.log" "$PYTHON" -m eupmu_bench.cli --device "$DEVICE" \
        --sizes $SIZES --no-progress --out "$OUT/$name" "${BENCH_EXTRA[@]}" "$@"
}
bench bench-fp32 "$BENCH_FP32_LIMIT" --dtypes float32 --models gpt2 llama
bench bench-bf16 "$BENCH_BF16_LIMIT" --dtypes bfloat16 --models gpt2

# 4. Where naive surgery spends its time on the GPU: profiler traces and op tables.
mkdir -p "$OUT/profile"
stage profile "$PROFILE_LIMIT" "$OUT/profile/profile.log" "$PYTHON" -m eupmu_bench.profile_step --device "$DEVICE" \
    --numel "$PROFILE_NUMEL" --steps 3 --out "$OUT/profile"

{
    echo "suite finished in $((SECONDS - SUITE_START))s (dry run: $DRY_RUN)"
    failed=0
    for name in "${STAGES[@]}"; do
        echo "$name: rc=${STATUS[$name]}"
        [[ ${STATUS[$name]} != 0 ]] && failed=1
    done
    echo "overall: $([[ $failed == 0 ]] && echo ok || echo FAILED)"
} | tee "$OUT/summary.txt"
echo "results in $OUT"
grep -q "overall: ok" "$OUT/summary.txt"
