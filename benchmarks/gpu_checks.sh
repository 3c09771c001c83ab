#!/usr/bin/env bash
# The Triton kernels' GPU checks in one call on a lent GPU (each step under its own time limit, its output
# kept under OUT even when a later step fails or runs out of time):
#   1. the GPU tests of the Triton kernels (every autotune tile, every "ws" tile, split-K, dispatch, the fused
#      rows in the "fragment" and "ws" variants) against float64;
#   2. bonsai-4b's GEMMs at M >= 1024 in the "fragment" and "ws" variants beside cuBLAS (bench_gluon_ws.py);
#   3. W1A16 at M <= 16 under CUDA graphs, with and without split-K, each row beside cuBLAS bf16;
#   4. with BASELINE_SRC (a `src` folder of another commit, e.g. from `git archive REV src`), step 3 again
#      on that code, for an A/B on the same machine.
#
#   mkdir -p .carry/old_src && git archive ab8c4ff src | tar -x -C .carry/old_src   # two-launch split-K
#   OUT=/tmp/out BASELINE_SRC=.carry/old_src/src bash benchmarks/gpu_checks.sh      # on the device, carry .carry
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-out/gpu_checks}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: one step runs from benchmarks/
export PYTHONUNBUFFERED=1
SITE=${SITE:-}  # extra import path (e.g. carried wheels unpacked with pip install --target)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" | tee -a "$OUT/device.txt"

small_m() {  # $1: source folder, $2: results folder
    PYTHONPATH="$1${SITE:+:$SITE}" timeout "${BENCH_LIMIT:-200}" python3 benchmarks/bench_triton.py \
        --models 4b,emoji --ms 1,16 --variants fragment --timing graph --skip-check --split-ks 1 --out "$2" \
        2>&1 | tail -40
}

PYTHONPATH="src${SITE:+:$SITE}" timeout "${TEST_LIMIT:-200}" python3 -m pytest -q -s -m gpu \
    tests/test_kernel_triton.py tests/test_kernel_triton_fusion.py 2>&1 | tail -30 | tee "$OUT/gpu_tests.txt"
(cd benchmarks && PYTHONPATH="$ROOT/src${SITE:+:$SITE}" timeout "${WS_LIMIT:-240}" python3 bench_gluon_ws.py \
    --out "$OUT/ws" 2>&1 | tail -20)
small_m src "$OUT/small_m"
if [ -n "${BASELINE_SRC:-}" ]; then
    small_m "$BASELINE_SRC" "$OUT/small_m_baseline"
fi
