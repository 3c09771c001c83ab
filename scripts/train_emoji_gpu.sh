#!/usr/bin/env bash
# Train bonsai-emoji on one lent H200: the recipe's `gpu` stage in the background, polled by
# device calls of under 10 minutes each, results copied to $OUT at the end.
#
# Before (CPU, once): python -m bonsai.train.emoji_recipe prepare -o .carry/emoji
# Device calls, each with carry [".carry/emoji"] and timeout_s 600, made right after each other
# (a machine left idle for more than ~30 s is given back and the job is lost):
#   1. bash scripts/train_emoji_gpu.sh start     # starts the job (setsid), then waits ~9.5 min
#   2. bash scripts/train_emoji_gpu.sh wait      # waits ~9.5 min more, or until the job ends
#   3. bash scripts/train_emoji_gpu.sh collect   # waits for the end, copies results to $OUT
# Extra arguments after `start` go to `python -m bonsai.train.emoji_recipe gpu` (e.g.
# --teacher-seconds 600, or --teacher .carry/emoji/teacher.safetensors to distill from a teacher
# trained earlier). $OUT gets: bonsai-emoji-teacher.safetensors.part-aa/-ab (split -b 15M;
# join with cat), bonsai-emoji-ptq.safetensors, bonsai-emoji-distilled.safetensors, logs.tgz
# (train.log, recipe.json, distill.json, every phase's log.jsonl). Back on CPU:
#   cat bonsai-emoji-teacher.safetensors.part-* > runs/emoji/export/bonsai-emoji-teacher.safetensors
# Budget: the job takes teacher_seconds + distill_seconds + ~3 minutes, plus ~2 minutes of machine
# start; device time may count at the full rate, so check `status` first and size both. Whichever
# call is running when the teacher finishes also copies it to $OUT (teacher.safetensors.part-*),
# so a session whose time runs out during the distillation still keeps the teacher (files under
# $OUT come back even when a call is cut off).
set -u
RUN=${RUN:-/tmp/bonsai-emoji-run}
WAIT_S=${WAIT_S:-570}

progress() {
    grep -E '^\{"step"|trial|encoded|teacher:|compile|Error|error' "$RUN/train.log" 2>/dev/null | tail -n 4
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
}

copy_teacher() {  # once per call, as soon as the finished teacher exists (written atomically)
    local f="$RUN/teacher/teacher.safetensors"
    if [ -f "$f" ] && [ -n "${OUT:-}" ] && ! ls "$OUT"/teacher.safetensors.part-* > /dev/null 2>&1; then
        split -b 15M "$f" "$OUT/teacher.safetensors.part-" && echo "teacher copied to \$OUT"
    fi
}

wait_for_job() {  # until $RUN/rc exists or WAIT_S seconds pass
    local t=0
    while [ ! -f "$RUN/rc" ] && [ "$t" -lt "$WAIT_S" ]; do sleep 30; t=$((t + 30)); echo "--- ${t}s"; progress; copy_teacher; done
    copy_teacher
    [ -f "$RUN/rc" ] && echo "job finished, exit code $(cat "$RUN/rc")"
}

case "${1:-}" in
start)
    shift
    mkdir -p "$RUN"
    python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))' || exit 1
    PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1 setsid bash -c \
        'python3 -m bonsai.train.emoji_recipe gpu --data .carry/emoji --out "$0" "$@" > "$0/train.log" 2>&1; echo $? > "$0/rc"' \
        "$RUN" "$@" < /dev/null > /dev/null 2>&1 &
    sleep 5
    wait_for_job ;;
wait)
    wait_for_job ;;
collect)
    wait_for_job
    [ -f "$RUN/rc" ] || { echo "job still running; call collect again"; exit 2; }
    tail -n 30 "$RUN/train.log"
    cd "$RUN" || exit 1
    tar czf "$OUT/logs.tgz" train.log recipe.json distill.json ./*/log.jsonl ./teacher/done.json 2>/dev/null
    if [ -d export ]; then
        split -b 15M export/bonsai-emoji-teacher.safetensors "$OUT/bonsai-emoji-teacher.safetensors.part-"
        cp export/bonsai-emoji-ptq.safetensors export/bonsai-emoji-distilled.safetensors "$OUT/"
    fi
    ls -la "$OUT" ;;
*)
    echo "usage: $0 start [recipe gpu args...] | wait | collect" >&2; exit 2 ;;
esac
