#!/usr/bin/env bash
# `bonsai distill` on 1 and 2 GPUs of one host (torchrun, DDP over NCCL), same teacher, data and
# steps, to measure scaling and compare the students' quality. One device call (kind nvidia-h200-x2,
# carry [".carry/distill"]):
#
#   bash scripts/distill_scaling.sh
#
# .carry/distill holds teacher.safetensors (the bonsai-emoji teacher), text_encoder/ (int8 MiniLM,
# from `python -m bonsai.train.emoji_recipe prepare`), images/ (train-split emoji PNGs) and
# prompts.txt (train captions and names). Runs:
#   gpu1      1 process,  batch 256            STEPS steps   (the baseline)
#   gpu2      2 processes, batch 128 per GPU    STEPS steps   (same global batch and samples: quality)
#   gpu2-weak 2 processes, batch 256 per GPU    WEAK_STEPS    (same per-GPU work: throughput)
# $OUT gets each run's log.jsonl, console output and student.safetensors (gpu1, gpu2). Samples per
# second = steps_per_s x batch x processes, from the log records after the first (warm-up) one.
set -u
DATA=${DATA:-.carry/distill}
STEPS=${STEPS:-800}
WEAK_STEPS=${WEAK_STEPS:-300}
RUNS=${RUNS:-/tmp/bonsai-distill-scaling}
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, "cuda devices:", torch.cuda.device_count())' || exit 1

run() {  # name, processes, per-process batch, steps
    local name=$1 procs=$2 batch=$3 steps=$4
    echo "=== $name: $procs process(es), batch $batch per process, $steps steps"
    rm -rf "$RUNS/$name"
    mkdir -p "$RUNS/$name" "$OUT/$name"
    python3 -m torch.distributed.run --standalone --nproc_per_node "$procs" -m bonsai.cli distill \
        "$DATA/teacher.safetensors" -o "$RUNS/$name" --prompts "$DATA/prompts.txt" \
        --text-encoder "$DATA/text_encoder" --images "$DATA/images" --steps "$steps" --batch "$batch" \
        --lr 2e-4 --scheme mean --rank 16 --log-every 50 --checkpoint-every 100000 --seed 0 --no-compile \
        2>&1 | grep -v '^{"step"' | tee "$OUT/$name/console.txt"
    cp "$RUNS/$name/log.jsonl" "$OUT/$name/" 2>/dev/null
    python3 - "$RUNS/$name/log.jsonl" "$batch" "$procs" <<'EOF'
import json, statistics, sys
records = [json.loads(line) for line in open(sys.argv[1])]
rates = [r["steps_per_s"] for r in records[1:]]
batch, procs = int(sys.argv[2]), int(sys.argv[3])
print(f"steady state: {statistics.median(rates):.2f} steps/s = {statistics.median(rates) * batch * procs:.0f} samples/s; last logged loss {records[-1]['loss']:.5f}")
EOF
}

run gpu1 1 256 "$STEPS"
run gpu2 2 128 "$STEPS"
run gpu2-weak 2 256 "$WEAK_STEPS"
cp "$RUNS/gpu1/student.safetensors" "$OUT/gpu1/" 2>/dev/null
cp "$RUNS/gpu2/student.safetensors" "$OUT/gpu2/" 2>/dev/null
ls -la "$OUT"/*
