"""W1A8's activation quantization (ops.quantize_rows) with more or fewer warps per row, under CUDA graphs.

    PYTHONPATH=src python benchmarks/bench_quant.py [--per-thread 8,16,32,64] [--out DIR]

quantize_rows_kernel takes one row per program and spreads it over ops.quantize_warps(BLOCK) warps. For
bonsai-4b's activation widths and 1024-4096 rows, this times the kernel with each --per-thread count of columns a
thread (warps = BLOCK / 32 / columns, 1 to 32) beside that default, in one run: a CUDA graph of calls on one x,
which stays in L2 where it fits, as the previous layer's output would. Every setting's q, scales and row sums
are checked against the default's, bit for bit.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton

from bench_triton import Timer, commit
from bonsai.kernels.triton import ops

SHAPES = [(m, k) for k in (3072, 12288) for m in (1024, 2048, 4096)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-thread", default="8,16,32,64", help="columns a thread, comma-separated")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    timer = Timer("graph")
    default = ops.quantize_warps
    rows, lines = [], []
    for m, k in SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        block = triton.next_power_of_2(k)
        ref = ops.quantize_rows(x, None)
        settings = {}  # warps -> {"us", "same"}
        row = {"M": m, "K": k, "default_warps": default(block),
               "default_us": timer(lambda i: ops.quantize_rows(x, None), 1) * 1e3, "settings": settings}
        for per in (int(v) for v in args.per_thread.split(",")):
            warps = block // 32 // per
            if not 1 <= warps <= 32:
                continue
            ops.quantize_warps = lambda b, w=warps: w  # noqa: E731
            try:
                same = all(torch.equal(a, b) for a, b in zip(ops.quantize_rows(x, None), ref))
                settings[warps] = {"us": timer(lambda i: ops.quantize_rows(x, None), 1) * 1e3, "same": same}
            finally:
                ops.quantize_warps = default
        rows.append(row)
        line = f"M={m:5d} K={k:6d}: default ({row['default_warps']} warps) {row['default_us']:6.1f} us | " + " | ".join(
            f"{w} warps {v['us']:6.1f} us{'' if v['same'] else ' DIFFERS'}" for w, v in settings.items())
        print(line, flush=True)
        lines.append(line)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"device": torch.cuda.get_device_name(), "commit": commit()}
        (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (args.out / "table.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
