#!/usr/bin/env bash
# Nsight Compute on one bitmatmul call (benchmarks/profile_kernels.py): where a kernel's time goes (throughput
# against the chip's peaks, warp stall reasons, occupancy), as a report and as text.
#   bash benchmarks/profile_kernels.sh OUT 12288x3072x16 [w1a16|w1a8|bf16] [auto|fragment|ws]
# --clock-control none: the card's clocks as they are (ncu would otherwise lock them to base for the run).
set -euo pipefail
out=$1 shape=$2 kernel=${3:-w1a16} variant=${4:-auto}
root=$(cd "$(dirname "$0")/.." && pwd)
name="$out/${kernel}_${variant}_${shape}"
mkdir -p "$out"
cd "$root/benchmarks"
PYTHONPATH="$root/src${SITE:+:$SITE}" ncu --clock-control none --nvtx --nvtx-include "profile/" \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
    --section SchedulerStats --section WarpStateStats --section Occupancy --section LaunchStats \
    --export "$name" --force-overwrite python3 profile_kernels.py "$shape" --kernel "$kernel" --variant "$variant"
ncu --import "$name.ncu-rep" --page details > "$name.txt"
grep -E "Duration|Throughput|Achieved Occupancy|Stall|Registers Per Thread|Grid Size|Block Size" "$name.txt" | head -60
