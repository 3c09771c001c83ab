"""Every tile and K split of the W1A16 fragment kernel at M <= 16, under CUDA graphs, beside cuBLAS bf16.

    PYTHONPATH=src python benchmarks/sweep_small_m.py [--ms 1,16] [--out DIR]
        [--block-ns 32,64,128] [--block-ks 128,256,512] [--stages 2,4] [--splits 1,2,4,8,16] [--warps 4]

What the small-M path could reach by its configuration alone: the autotuner picks among a few tiles with
do_bench (L2 cleared, host launch in the time) and ops.split_k picks the shares by a rule; here each
(BLOCK_N, BLOCK_K, stages, shares, warps) runs on its own under graphs (bench_triton.py's Timer: each call on its own
weight copy, the copies over twice the L2), checked against float64. Prints, per bonsai-4b shape, cuBLAS,
the default path (autotuned tile, ops.split_k's shares), the best configuration and the five after it.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import triton

from bench_gluon_ws import operands
from bench_triton import SHAPES, Timer, commit, launch_floor, rel_err
from bonsai.kernels.triton import ops, w1a16

AXES = {"block_ns": "32,64,128", "block_ks": "128,256,512", "stages": "2,4", "splits": "1,2,4,8,16", "warps": "4"}


def configs(k: int, axes: dict[str, tuple[int, ...]]) -> list[ops.TileConfig]:
    """Every combination whose shares each get at least one K block. The kernel gives each share
    ceil(blocks / shares) blocks, so a count that leaves the last shares empty (6 blocks in 4 shares of 2) is
    left out, as ops.split_k leaves it out: it would launch programs with no work under a misleading label."""
    return [ops.TileConfig(ops.SMALL_M, bn, bk, w, st, split_k=s)
            for bn, bk, st, s, w in itertools.product(*(axes[a] for a in AXES))
            if ops.filled_shares(triton.cdiv(k, bk), s) == s]


def sweep(k: int, n: int, m: int, timer: Timer, axes: dict[str, tuple[int, ...]]) -> dict:
    row, weights, x, ref = operands(k, n, m, timer)
    packed = len(weights)
    row["default rel_err"] = rel_err(w1a16(x, weights[0], variant="fragment"), ref)  # (tunes first)
    row["default"] = timer(lambda i: w1a16(x, weights[i], variant="fragment"), packed)
    print(json.dumps(row), flush=True)  # before the configurations: a run cut short keeps its baseline
    row["configs"] = []
    for c in configs(k, axes):
        entry = {"block_n": c.block_n, "block_k": c.block_k, "stages": c.num_stages, "split_k": c.split_k,
                 "warps": c.num_warps}
        try:
            entry["rel_err"] = rel_err(w1a16(x, weights[0], config=c, variant="fragment"), ref)
            entry["ms"] = timer(lambda i, c=c: w1a16(x, weights[i], config=c, variant="fragment"), packed)
        except Exception as err:  # e.g. out of shared memory: report and go on
            entry["error"] = f"{type(err).__name__}: {str(err)[-200:]}"
        row["configs"].append(entry)
        print(json.dumps({"K": k, "N": n, "M": m, **entry}), flush=True)
    return row


def table(rows: list[dict], floor: float) -> str:
    lines = [f"empty kernel under graphs: {floor * 1e3:.2f} us"]
    for r in rows:
        lines.append(f"{r['K']}->{r['N']} M={r['M']}: bf16 {r['bf16'] * 1e3:.1f} us; default {r['default'] * 1e3:.1f} us "
                     f"({r['bf16'] / r['default']:.2f}x, rel err {r['default rel_err']:.2e})")
        ok = sorted((c for c in r["configs"] if c.get("ms")), key=lambda c: c["ms"])
        for c in ok[:6]:
            lines.append(f"  BN {c['block_n']:>3} BK {c['block_k']:>3} stages {c['stages']} shares {c['split_k']:>2} "
                         f"warps {c.get('warps', 4)}: "
                         f"{c['ms'] * 1e3:6.1f} us {r['bf16'] / c['ms']:5.2f}x bf16 (rel err {c['rel_err']:.2e})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ms", default="1,16")
    parser.add_argument("--out", type=Path)
    for axis, default in AXES.items():
        parser.add_argument("--" + axis.replace("_", "-"), default=default, help=f"comma-separated (default {default})")
    args = parser.parse_args()
    axes = {a: tuple(int(v) for v in getattr(args, a).split(",")) for a in AXES}
    timer = Timer("graph")
    floor = launch_floor(timer, "cuda")
    rows = [sweep(k, n, int(m), timer, axes) for m in args.ms.split(",") for k, n in SHAPES["4b"]]
    text = table(rows, floor)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"device": torch.cuda.get_device_name(), "commit": commit(), "floor_ms": floor}
        (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (args.out / "table.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
