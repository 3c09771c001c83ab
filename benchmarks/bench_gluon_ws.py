"""The warp-specialized Gluon kernels (variant "ws": ws.py, gluon_ws.py) on one Hopper GPU, beside cuBLAS bf16
and the default fragment kernels, W1A16 and W1A8, in one run.

    PYTHONPATH=src python benchmarks/bench_gluon_ws.py [--ms 1024,2048,4096] [--out DIR]
    PYTHONPATH=src python benchmarks/bench_gluon_ws.py --per-tile 3072x3072x1024,12288x3072x2048 \
        [--tiles w1a16:128x256x64x8x4,w1a8:128x256x128x8x4x1] [--out DIR]

1. Correctness of every "ws" tile (ws.TILES and ws.STREAM_K_TILES): relative error against float64 (x @ W.T
   on the dequantized weight, with a row offset) on fresh random inputs, M and N off the tile, K a multiple of
   16 but not of BLOCK_K.
2. Timing of bonsai-4b's GEMM shapes under CUDA graphs as bench_triton.py --timing graph (each call on its
   own weight copy, the copies together over twice the L2): cuBLAS bf16, and W1A16 / W1A8 in the "fragment"
   and "ws" variants, and "ws+sk": "ws" choosing among its tiles and their stream-K versions (ws.STREAM_K),
   each tuned by its own launcher first (autotuner / ws's tile timing); W1A8 includes the activation
   quantization kernel. Each timed "ws" call's output is also checked against float64.
--per-tile K x N x M,...: instead of 2., every tile of both lists on these shapes, one at a time, the same way,
   beside cuBLAS bf16 (what the tile timing's choice rests on, without its noise); --tiles adds tiles to try
   (kernel:BLOCK_M x BLOCK_N x BLOCK_K x MMA warps x stages[x 1 for stream-K]), each checked against float64.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
import triton

from bench_triton import SHAPES, Timer, commit, copies_for, launch_floor, random_weight, rel_err
from bonsai.kernels.triton import ops as triton_ops
from bonsai.kernels.triton import ws

KINDS = ("w1a16", "w1a8")
VARIANTS = ("fragment", "ws", "ws+sk")


def run(kind: str, variant: str, x: torch.Tensor, w, tile: ws.Tile | None = None) -> torch.Tensor:
    ws.STREAM_K = variant == "ws+sk"  # which tiles the first call of a shape times (each setting remembers its own)
    config = None if tile is None else triton_ops.TileConfig(*tile[:5], stream_k=tile.stream_k)
    return getattr(triton_ops, kind)(x, w, config=config, variant=variant.removesuffix("+sk"))


def check() -> list[dict]:
    rows = []
    m, k, n = 333, 3088, 1040
    w = random_weight(n, k, False, "cuda")
    w = type(w)(w.signs, w.in_features, w.row_scale, row_offset=torch.randn(n, device="cuda") * 0.01)
    x = (torch.randn(m, k, device="cuda") * 2 + 0.3).bfloat16()
    ref = x.double() @ w.dequantize(torch.float64).t()
    for kind in KINDS:
        for tile in ws.TILES[kind] + ws.STREAM_K_TILES[kind]:
            row = {"kernel": kind, "M": m, "K": k, "N": n, "tile": tile}
            try:
                row["rel_err"] = rel_err(run(kind, "ws", x, w, tile), ref)
            except Exception as err:  # report and go on with the other tiles
                row["error"] = f"{type(err).__name__}: {str(err)[-400:]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
        rows.append({"kernel": kind, "tile": "fragment", "rel_err": rel_err(run(kind, "fragment", x, w), ref)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def operands(k: int, n: int, m: int, timer: Timer) -> tuple[dict, list, torch.Tensor, torch.Tensor]:
    """(the row with cuBLAS bf16's time, the packed weight copies, x, x @ W.T in float64) for one shape."""
    packed = copies_for(n * k // 8)
    weights = [random_weight(n, k, False, "cuda") for _ in range(packed)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w_bf16 = [w.dequantize(torch.bfloat16) for w in weights[:copies_for(n * k * 2)]]
    row = {"K": k, "N": n, "M": m, "copies": packed, "bf16": timer(lambda i: torch.matmul(x, w_bf16[i].t()), len(w_bf16))}
    return row, weights, x, x.double() @ weights[0].dequantize(torch.float64).t()


def time_shape(k: int, n: int, m: int, timer: Timer) -> dict:
    row, weights, x, ref = operands(k, n, m, timer)
    packed = len(weights)
    for kind in KINDS:
        for variant in VARIANTS:
            key = f"{kind}:{variant}"
            try:
                row[f"{key} rel_err"] = rel_err(run(kind, variant, x, weights[0]), ref)  # tunes, then checks
                row[key] = timer(lambda i, kind=kind, variant=variant: run(kind, variant, x, weights[i]), packed)
            except Exception as err:  # report and go on with the other paths
                row[key], row[f"{key} error"] = None, f"{type(err).__name__}: {str(err)[-300:]}"
    row["ws tiles"] = {f"{key[0]}{'+sk' if key[-1] else ''}": tile for key, tile in ws._chosen.items()
                       if key[1:4] == (triton_ops.m_bucket(m), n, k)}
    return row


def time_tiles(k: int, n: int, m: int, timer: Timer, extra: dict[str, list]) -> dict:
    """Every "ws" tile, one and stream-K, and the extra ones, on one shape under CUDA graphs, beside cuBLAS."""
    row, weights, x, ref = operands(k, n, m, timer)
    packed = len(weights)
    for kind in KINDS:
        for tile in ws.TILES[kind] + ws.STREAM_K_TILES[kind] + extra.get(kind, []):
            key = f"{kind} {'x'.join(map(str, tile[:5]))}{' sk' if tile.stream_k else ''}"
            try:
                row[f"{key} rel_err"] = rel_err(run(kind, "ws", x, weights[0], tile), ref)
                row[key] = timer(lambda i, kind=kind, tile=tile: run(kind, "ws", x, weights[i], tile), packed)
            except Exception as err:  # report and go on with the other tiles
                row[key], row[f"{key} error"] = None, f"{type(err).__name__}: {str(err)[-300:]}"
    return row


def tile_table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        lines.append(f"{r['K']}->{r['N']} M={r['M']}: bf16 {r['bf16'] * 1e3:.1f} us")
        for key, t in r.items():
            if key.startswith("w1a") and not key.endswith(("rel_err", "error")):
                lines.append(f"  {key:<32} " + (f"{t * 1e3:8.1f} us {r['bf16'] / t:5.2f}x bf16" if t else "fail"))
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    cols = [f"{kind}:{variant}" for kind in KINDS for variant in VARIANTS]
    lines = [f"{'K->N':>12} {'M':>5} | {'bf16 us':>8} {'TF/s':>5} | " + " | ".join(f"{c:>21}" for c in cols),
             f"{'':>12} {'':>5} | {'':>8} {'':>5} | " + " | ".join(f"{'us':>8} {'TF/s':>5} {'x bf16':>6}" for _ in cols)]
    for r in rows:
        tf = lambda t: 2 * r["M"] * r["N"] * r["K"] / (t * 1e-3) / 1e12  # noqa: E731
        cells = [f"{r[c] * 1e3:8.1f} {tf(r[c]):5.0f} {r['bf16'] / r[c]:6.2f}" if r.get(c) else f"{'fail':>21}" for c in cols]
        lines.append(f"{r['K']:>5}->{r['N']:<6} {r['M']:>5} | {r['bf16'] * 1e3:8.1f} {tf(r['bf16']):5.0f} | " + " | ".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ms", default="1024,2048,4096")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--per-tile", default="", help="K x N x M shapes, comma-separated: time every tile there")
    parser.add_argument("--tiles", default="", help="with --per-tile, more tiles: kernel:BMxBNxBKxWARPSxSTAGES[x1]")
    args = parser.parse_args()
    extra: dict[str, list] = {}
    for spec in filter(None, args.tiles.split(",")):
        kind, dims = spec.split(":")
        extra.setdefault(kind, []).append(ws.Tile(*(int(v) for v in dims.split("x"))))
    torch.manual_seed(0)
    timer = Timer("graph")
    meta = {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "commit": commit(), "torch": torch.__version__, "triton": triton.__version__,
            "floor_us": launch_floor(timer, "cuda") * 1e3}
    print(json.dumps(meta), flush=True)
    checks, rows = check(), []

    def save() -> None:  # after each row: a run cut short by its time limit keeps what it measured
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "gluon_ws.json").write_text(json.dumps({"meta": meta, "checks": checks, "rows": rows}, indent=1))
            (args.out / "gluon_ws.txt").write_text(json.dumps(meta) + "\n" + table(rows) + "\n")

    save()
    if args.per_tile:
        for shape in args.per_tile.split(","):
            k, n, m = (int(v) for v in shape.split("x"))
            rows.append(time_tiles(k, n, m, timer, extra))
            print(json.dumps(rows[-1]), flush=True)
            if args.out:
                (args.out / "gluon_ws_tiles.txt").write_text(json.dumps(meta) + "\n" + tile_table(rows) + "\n")
            save()
        print(tile_table(rows))
        return
    for k, n in SHAPES["4b"]:
        for m in (int(s) for s in args.ms.split(",")):
            rows.append(time_shape(k, n, m, timer))
            print(json.dumps(rows[-1]), flush=True)
            save()
    print(table(rows))


if __name__ == "__main__":
    main()
