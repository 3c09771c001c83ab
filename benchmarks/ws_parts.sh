#!/usr/bin/env bash
# benchmarks/ws_parts.py for each setting of benchmarks/ws_parts.patch's switches (apply it first), each in
# its own process and Triton cache (the switches change the compiled kernels; not all of them reach Triton's
# cache key).
cd "$(dirname "$0")"
grep -q BONSAI_WS_DIAG ../src/bonsai/kernels/triton/gluon_ws.py || { echo "apply benchmarks/ws_parts.patch first" >&2; exit 2; }
run() {  # label, then the switches; SETTINGS="mode0 n128 ..." runs only those labels
    local label=$1; shift
    [[ -z "${SETTINGS:-}" || " $SETTINGS " == *" $label "* ]] || return 0
    env "$@" TRITON_CACHE_DIR="/tmp/ws_parts_cache/$label" PYTHONPATH=../src${SITE:+:$SITE} \
        timeout "${LIMIT:-100}" python3 ws_parts.py "$label" 2>&1 | grep -v Warning
}
for mode in 0 1 2 3 4; do run "mode$mode" BONSAI_WS_DIAG=$mode; done
run n128 BONSAI_WS_N128=1                      # 4 load warps, 16-bit wgmmas 128 tokens wide
run lw8r56 BONSAI_WS_LW=8 BONSAI_WS_LR=56      # 8 load warps (then 128 wide)
run lw8r64 BONSAI_WS_LW=8 BONSAI_WS_LR=64
run lw8r56-mode3 BONSAI_WS_LW=8 BONSAI_WS_LR=56 BONSAI_WS_DIAG=3
