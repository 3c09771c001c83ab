"""Where the "ws" kernels' time goes: the 256 x 128 tiles of W1A16 and W1A8 beside cuBLAS bf16 on two of
bonsai-4b's shapes and on 3072 -> 4224 (whose 132 tiles fill an H100's SMs once), under CUDA graphs (each call
on its own weight copy), with the switches of benchmarks/ws_parts.patch set in the environment. One setting
per process (the switches are read at import).

    git apply benchmarks/ws_parts.patch
    bash benchmarks/ws_parts.sh          # every setting, each in its own process and Triton cache
    git checkout src/bonsai/kernels/triton/gluon_ws.py

With a mode that leaves out work the outputs are wrong by construction; their relative errors are printed to
show which ran.
"""

from __future__ import annotations

import os
import sys

from bench_gluon_ws import operands, run
from bench_triton import Timer, rel_err
from bonsai.kernels.triton import ws

# 96 tiles of 256 x 128 for 132 SMs; 132 (one full wave); 192 (1.45 waves)
SHAPES = [(3072, 3072, 1024), (3072, 4224, 1024), (12288, 3072, 2048)]
TILES = {"w1a16": ws.Tile(256, 128, 64, 8, 4), "w1a8": ws.Tile(256, 128, 128, 8, 4)}


def main() -> None:
    label = sys.argv[1] if len(sys.argv) > 1 else "default"
    if not any(key.startswith("BONSAI_WS_") for key in os.environ):
        print("no BONSAI_WS_* switch set: the kernels as they are", flush=True)
    timer = Timer("graph")
    for k, n, m in SHAPES:
        row, weights, x, ref = operands(k, n, m, timer)
        print(f"{label} {k}->{n} M={m} bf16 {row['bf16'] * 1e3:.1f} us", flush=True)
        for kind, tile in TILES.items():
            err = rel_err(run(kind, "ws", x, weights[0], tile), ref)
            us = timer(lambda i, kind=kind, tile=tile: run(kind, "ws", x, weights[i], tile), len(weights)) * 1e3
            print(f"{label} {kind} {us:.1f} us {row['bf16'] * 1e3 / us:.2f}x bf16 rel_err {err:.3g}", flush=True)


if __name__ == "__main__":
    main()
