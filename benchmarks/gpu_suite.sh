#!/usr/bin/env bash
# GPU check and benchmark in one go, for a machine with an H100/H200 and no package registry.
#
#   OUT=/some/folder bash benchmarks/gpu_suite.sh          # on the GPU machine
#   bash benchmarks/gpu_suite.sh --dry-run                 # anywhere: tiny CPU run, catches typos
#
# Stages (each with its own time limit, all logged; a failing stage does not stop the others):
#   1. install the package with the torch already installed, building the CUDA extension; if
#      that fails, install without it (the Triton and torch backends still run); if even that
#      fails, run from the source tree (eupmu_bench reached through a link)
#   2. pytest -m gpu, then the triton/native tests (-k "triton or native") on the GPU; collection
#      errors of modules that need a package the machine lacks never stop the GPU tests
#   3. eupmu-bench: every backend's explicit and implicit step vs AdamW(fused=True), naive
#      surgery and composed torch on 1e8 fp32 parameters (GPT-2 and Llama layouts)
#   4. kernel micro-benchmarks at 1e8 (Gramian, coefficients, combine, steps), to read against
#      the bytes model of benchmarks/gpu_readiness.py
#   5. the bf16 benchmark, then profile_step: torch.profiler traces of naive surgery,
#      composed torch and EUPMU
# Writes into "$OUT": env.txt, suite.log, install*.log, pytest-gpu.log, pytest-kernels.log,
# bench-*/ (JSON, markdown table, PNG, log), kernels/ (pytest-benchmark JSON), profile/ (chrome
# traces, op tables, summary.md), summary.txt (written whatever happens). Exit status: 0 when
# every stage passed.
# Budget: the whole suite stops starting stages at TOTAL_LIMIT seconds (default 420, i.e.
# 7 minutes); each stage's own limit (overridable, e.g. BENCH_FP32_LIMIT=200) is cut to what is
# left, and a stage with no time left is recorded as skipped. A usual run takes far less.
set -uo pipefail

DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
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
OUT="$(cd "$OUT" && pwd)"

# Time limits (seconds). TOTAL_LIMIT caps the suite; the stage limits are upper bounds within it.
TOTAL_LIMIT="${TOTAL_LIMIT:-420}"
INSTALL_LIMIT="${INSTALL_LIMIT:-110}"
FALLBACK_LIMIT="${FALLBACK_LIMIT:-30}"
GPU_TEST_LIMIT="${GPU_TEST_LIMIT:-60}"
KERNEL_TEST_LIMIT="${KERNEL_TEST_LIMIT:-45}"
BENCH_FP32_LIMIT="${BENCH_FP32_LIMIT:-90}"
BENCH_KERNELS_LIMIT="${BENCH_KERNELS_LIMIT:-35}"
BENCH_BF16_LIMIT="${BENCH_BF16_LIMIT:-60}"
PROFILE_LIMIT="${PROFILE_LIMIT:-30}"
RESERVE=10  # kept back for the summary
SIZES="${SIZES:-1e8}"

if [[ $DRY_RUN == 1 ]]; then
    DEVICE=cpu; SIZES=2e5; PROFILE_NUMEL=2e5; KERNEL_NUMEL=2e5
    BENCH_EXTRA=(--repeats 2 --warmup 1 --bandwidth-numel 1e6 --no-plot)
    PYTEST_EXTRA=(--collect-only -q)
    BENCH_PYTEST_EXTRA=(--collect-only -q)
else
    DEVICE=cuda; PROFILE_NUMEL=1e8; KERNEL_NUMEL=1e8
    BENCH_EXTRA=(--repeats 20 --warmup 3)
    PYTEST_EXTRA=(-q)
    BENCH_PYTEST_EXTRA=(-q --benchmark-max-time=0.2 --benchmark-min-rounds=5 --benchmark-warmup=on
                        --benchmark-json "$OUT/kernels/benchmark.json")
fi
# No cache folder in the checkout; collection errors (a module needing an absent package) must
# not stop the tests that can run.
PYTEST_COMMON=(-p no:cacheprovider --continue-on-collection-errors -ra)

STAGES=()
declare -A STATUS
SUITE_START=$SECONDS

write_summary() {
    {
        echo "suite finished in $((SECONDS - SUITE_START))s (dry run: $DRY_RUN, total limit ${TOTAL_LIMIT}s)"
        local failed=0
        for name in "${STAGES[@]}"; do
            echo "$name: rc=${STATUS[$name]}"
            [[ ${STATUS[$name]} != 0 ]] && failed=1
        done
        echo "overall: $([[ $failed == 0 ]] && echo ok || echo FAILED)"
    } >"$OUT/summary.txt"
}
trap write_summary EXIT

stage() {  # stage NAME LIMIT LOG COMMAND...
    local name=$1 limit=$2 log=$3; shift 3
    local left=$((TOTAL_LIMIT - (SECONDS - SUITE_START) - RESERVE))
    STAGES+=("$name")
    if (( left < 5 )); then
        STATUS[$name]=124
        echo "== $name skipped: the suite's ${TOTAL_LIMIT}s are used up" | tee -a "$OUT/suite.log"
        return
    fi
    (( limit > left )) && limit=$left
    local start=$SECONDS
    echo "== $name (limit ${limit}s): $(printf "%q " "$@")" | tee -a "$OUT/suite.log"
    timeout --signal=TERM --kill-after=5 "$limit" "$@" >"$log" 2>&1
    local rc=$?
    [[ $rc == 5 && $name == pytest-* ]] && rc=0  # pytest: no test selected is not a failure
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
    for pkg in transformers accelerate hypothesis sklearn scipy matplotlib pytest_benchmark tqdm mnist1d gguf; do
        "$PYTHON" -c "import $pkg" >/dev/null 2>&1 && echo "package $pkg: yes" || echo "package $pkg: absent"
    done
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. Install (editable, builds the extension against the installed torch). --no-index: never
#    reach for a registry.
if [[ $DRY_RUN == 1 ]]; then
    echo "== install skipped in a dry run; it would run:" | tee -a "$OUT/suite.log"
    echo "   EUPMU_BUILD_CUDA=1 MAX_JOBS=16 $PYTHON -m pip install --no-index --no-build-isolation --no-deps -e ." \
        | tee -a "$OUT/suite.log"
else
    stage install "$INSTALL_LIMIT" "$OUT/install.log" env EUPMU_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" \
        "$PYTHON" -m pip install --no-index --no-build-isolation --no-deps -e .
    if [[ ${STATUS[install]} != 0 ]]; then
        # Keep the Triton and torch measurements even when the extension does not build.
        stage install-without-extension "$FALLBACK_LIMIT" "$OUT/install-fallback.log" env EUPMU_BUILD_EXT=0 \
            "$PYTHON" -m pip install --no-index --no-build-isolation --no-deps -e .
    fi
fi
# Whatever the install did, the package and the benchmarks must import: else run from the
# source tree, with eupmu_bench (the benchmarks folder) reached through a link.
if ! "$PYTHON" -c "import eupmu_kernels, eupmu_bench" >/dev/null 2>&1; then
    SHIM="$OUT/.pythonpath"
    mkdir -p "$SHIM"
    ln -sfn "$REPO/benchmarks" "$SHIM/eupmu_bench"
    export PYTHONPATH="$SHIM:$REPO${PYTHONPATH:+:$PYTHONPATH}"
    echo "== the package is not installed: running from the source tree (PYTHONPATH=$PYTHONPATH)" \
        | tee -a "$OUT/suite.log"
fi
"$PYTHON" -c "import eupmu_kernels, eupmu_bench; from eupmu_kernels.backends.native_backend import extension_error; \
print('backends:', eupmu_kernels.available_backends(), '| extension:', extension_error() or 'loaded')" \
    2>&1 | tee -a "$OUT/suite.log"

# 2. Tests on the GPU.
stage pytest-gpu "$GPU_TEST_LIMIT" "$OUT/pytest-gpu.log" "$PYTHON" -m pytest -m gpu "${PYTEST_COMMON[@]}" \
    "${PYTEST_EXTRA[@]}"
stage pytest-kernels "$KERNEL_TEST_LIMIT" "$OUT/pytest-kernels.log" \
    "$PYTHON" -m pytest -k "triton or native" -m "not gpu and not slow" "${PYTEST_COMMON[@]}" "${PYTEST_EXTRA[@]}"

# 3. Benchmarks: fp32 on both layouts, then the kernels one by one, then bf16 (moments in bf16
#    like torch.optim's, so the ratios to fused AdamW compare equal work; add --state-dtype
#    float32 for fp32 moments).
bench() {  # bench NAME LIMIT ARGS...
    local name=$1 limit=$2; shift 2
    mkdir -p "$OUT/$name"
    stage "$name" "$limit" "$OUT/$name/bench.log" "$PYTHON" -m eupmu_bench.cli --device "$DEVICE" \
        --sizes $SIZES --no-progress --out "$OUT/$name" "${BENCH_EXTRA[@]}" "$@"
}
bench bench-fp32 "$BENCH_FP32_LIMIT" --dtypes float32 --models gpt2 llama

mkdir -p "$OUT/kernels"
stage bench-kernels "$BENCH_KERNELS_LIMIT" "$OUT/kernels/bench.log" env EUPMU_BENCH_NUMEL="$KERNEL_NUMEL" \
    EUPMU_BENCH_DTYPES=float32,bfloat16 "$PYTHON" -m pytest "$REPO/benchmarks/bench_kernels.py" \
    -p no:cacheprovider "${BENCH_PYTEST_EXTRA[@]}"

bench bench-bf16 "$BENCH_BF16_LIMIT" --dtypes bfloat16 --models gpt2

# 4. Where naive surgery spends its time on the GPU: profiler traces and op tables.
mkdir -p "$OUT/profile"
stage profile "$PROFILE_LIMIT" "$OUT/profile/profile.log" "$PYTHON" -m eupmu_bench.profile_step --device "$DEVICE" \
    --numel "$PROFILE_NUMEL" --steps 3 --out "$OUT/profile"

write_summary
trap - EXIT
cat "$OUT/summary.txt"
echo "results in $OUT"
grep -q "overall: ok" "$OUT/summary.txt"
