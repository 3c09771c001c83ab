"""The warp-specialized Gluon kernels (bonsai.kernels.triton.gluon_ws) on one Hopper GPU, beside cuBLAS bf16
and the product's Triton fragment kernels (W1A16, W1A8), in one run.

    PYTHONPATH=src python benchmarks/bench_gluon_ws.py [--ms 1024,2048,4096] [--out DIR]

1. Correctness, every tile below: relative error against float64 (x @ W.T on the dequantized weight) and,
   for W1A8, against its own numerics (bitmatmul_w1a8_reference: the same int8 rounding of x), on fresh
   random inputs; M and N not multiples of the tile, K a multiple of 16 (TMA's row alignment) but not of
   the tile's K. A tile is timed only if every check of it passed.
2. Timing under CUDA graphs as bench_triton.py --timing graph (each call on its own weight copy, the copies
   together over twice the L2); W1A8 columns include the activation quantization kernel. The Gluon column is
   the fastest of its tiles for that shape (each timed the same way; all in the JSON).
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
import triton
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from bench_triton import SHAPES, Timer, commit, copies_for, launch_floor, random_weight, rel_err
from bonsai.kernels.reference import bitmatmul_w1a8_reference
from bonsai.kernels.triton import quantize_rows, w1a8, w1a16
from bonsai.kernels.triton.fragments import bf16_words, int8_words
from bonsai.kernels.triton.gluon_ws import w1a8_ws_kernel, w1a16_ws_kernel

# (BLOCK_M tokens, BLOCK_N weight rows, BLOCK_K, MMA warps, stages); 8 MMA warps hold 64 rows each... per
# warpgroup, and the whole program (MMA + 5 producer warps, padded to 16) gets at most 128 registers a thread.
TILES = {
    "w1a8": [(128, 128, 128, 4, 4), (128, 128, 128, 4, 3), (128, 128, 128, 8, 4), (256, 128, 128, 8, 3),
             (128, 64, 128, 4, 4), (64, 128, 128, 4, 4)],
    "w1a16": [(128, 128, 64, 4, 4), (128, 128, 64, 4, 6), (128, 128, 64, 8, 4), (128, 64, 64, 4, 6),
              (64, 128, 64, 4, 6), (256, 64, 64, 4, 4)],
}
ONE_BITS = {torch.bfloat16: 0x3F80, torch.float16: 0x3C00}


def _desc(x: torch.Tensor, bm: int, bk: int) -> TensorDescriptor:
    dtype = gl.int8 if x.dtype == torch.int8 else gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16
    return TensorDescriptor.from_tensor(x, [bm, bk], gl.NVMMASharedLayout.get_default_for([bm, bk], dtype))


def ws_w1a8(x: torch.Tensor, weight, tile: tuple) -> torch.Tensor:
    bm, bn, bk, warps, stages = tile
    m, k = x.shape
    n = weight.out_features
    q, xs, qsum = quantize_rows(x, None)
    words = weight.prepared("triton-fragment-int8", int8_words)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    w1a8_ws_kernel[grid](_desc(q, bm, bk), words, out, xs, qsum, weight.row_scale, weight.row_scale, xs, out, m, n, k,
                         words.shape[1], HAS_OFFSET=False, HAS_BIAS=False, BLOCK_N=bn, STAGES=stages, GROUP_M=8,
                         num_warps=warps)
    return out


def ws_w1a16(x: torch.Tensor, weight, tile: tuple) -> torch.Tensor:
    bm, bn, bk, warps, stages = tile
    m, k = x.shape
    n = weight.out_features
    words = weight.prepared("triton-fragment-bf16", bf16_words)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    w1a16_ws_kernel[grid](_desc(x, bm, bk), words, out, weight.row_scale, weight.row_scale, weight.row_scale, out,
                          m, n, k, words.shape[1], ONE_BITS=ONE_BITS[x.dtype], HAS_OFFSET=False, HAS_BIAS=False,
                          BLOCK_N=bn, STAGES=stages, GROUP_M=8, num_warps=warps)
    return out


OURS = {"w1a8": ws_w1a8, "w1a16": ws_w1a16}
PRODUCT = {"w1a8": lambda x, w: w1a8(x, w, variant="fragment"), "w1a16": lambda x, w: w1a16(x, w, variant="fragment")}


def check() -> list[dict]:
    rows = []
    for m, k, n in [(333, 3088, 1040), (1024, 3072, 3072)]:
        w = random_weight(n, k, False, "cuda")
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ w.dequantize(torch.float64).t()
        own = {"w1a8": bitmatmul_w1a8_reference(x.double(), w).double(), "w1a16": ref}
        for kind, fn in OURS.items():
            for tile in TILES[kind]:
                row = {"kernel": kind, "M": m, "K": k, "N": n, "tile": tile}
                try:
                    y = fn(x, w, tile)
                    torch.cuda.synchronize()
                    row.update(vs_float64=rel_err(y, ref), vs_own_numerics=rel_err(y, own[kind]))
                except Exception as err:  # report and go on with the other tiles
                    row["error"] = f"{type(err).__name__}: {str(err)[-400:]}"
                rows.append(row)
                print(json.dumps(rows[-1]), flush=True)
            y = PRODUCT[kind](x, w)
            rows.append({"kernel": kind, "M": m, "K": k, "N": n, "tile": "triton fragment", "vs_float64": rel_err(y, ref),
                         "vs_own_numerics": rel_err(y, own[kind])})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def time_shape(k: int, n: int, m: int, timer: Timer, good: dict) -> dict:
    packed = copies_for(n * k // 8)
    ws = [random_weight(n, k, False, "cuda") for _ in range(packed)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    dense = copies_for(n * k * 2)
    w_bf16 = [w.dequantize(torch.bfloat16) for w in ws[:dense]]
    row = {"K": k, "N": n, "M": m, "copies": packed}
    row["bf16"] = timer(lambda i: torch.matmul(x, w_bf16[i].t()), len(w_bf16))
    del w_bf16
    for kind, fn in OURS.items():
        PRODUCT[kind](x, ws[0])  # autotune before timing
        row[f"triton_{kind}"] = timer(lambda i, kind=kind: PRODUCT[kind](x, ws[i]), packed)
        for tile in good[kind]:
            try:
                t = timer(lambda i, tile=tile, fn=fn: fn(x, ws[i], tile), packed)
            except Exception as err:  # report and go on with the other tiles
                print(json.dumps({"K": k, "N": n, "M": m, "kernel": kind, "tile": tile, "error": str(err)[-300:]}), flush=True)
                continue
            row[f"ws_{kind} {tile}"] = t
            if row.get(f"ws_{kind}") is None or t < row[f"ws_{kind}"]:
                row[f"ws_{kind}"], row[f"ws_{kind}_tile"] = t, tile
    return row


def table(rows: list[dict]) -> str:
    head = f"{'K->N':>12} {'M':>5} | {'bf16 us':>8} {'TF/s':>5}"
    for kind in OURS:
        head += f" | {kind + ' us':>9} {'x bf16':>6} | {'ws us':>8} {'TF/s':>5} {'x bf16':>6} {'x ' + kind:>8} | tile"
    lines = [head]
    for r in rows:
        tf = lambda t: 2 * r["M"] * r["N"] * r["K"] / (t * 1e-3) / 1e12  # noqa: E731
        line = f"{r['K']:>5}->{r['N']:<6} {r['M']:>5} | {r['bf16'] * 1e3:8.1f} {tf(r['bf16']):5.0f}"
        for kind in OURS:
            base, ws = r[f"triton_{kind}"], r.get(f"ws_{kind}")
            line += f" | {base * 1e3:9.1f} {r['bf16'] / base:6.2f} | "
            line += (f"{ws * 1e3:8.1f} {tf(ws):5.0f} {r['bf16'] / ws:6.2f} {base / ws:8.2f} | {r[f'ws_{kind}_tile']}" if ws
                     else f"{'fail':>8} {'':>5} {'':>6} {'':>8} |")
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ms", default="1024,2048,4096")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    timer = Timer("graph")
    meta = {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "commit": commit(), "torch": torch.__version__, "triton": triton.__version__,
            "floor_us": launch_floor(timer, "cuda") * 1e3}
    print(json.dumps(meta), flush=True)
    checks = check()
    bound = {"w1a8": 1e-2, "w1a16": 1e-2}  # bf16 output rounding is ~2e-3; a wrong kernel is off by far more
    good = {kind: [t for t in TILES[kind] if all(c.get("vs_own_numerics", 1.0) < bound[kind]
                                                  for c in checks if c["kernel"] == kind and c["tile"] == t)]
            for kind in OURS}
    print(json.dumps({"timed_tiles": good}), flush=True)
    rows = []
    for k, n in SHAPES["4b"]:
        for m in (int(s) for s in args.ms.split(",")):
            rows.append(time_shape(k, n, m, timer, good))
            print(json.dumps(rows[-1]), flush=True)
    text = table(rows)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gluon_ws.json").write_text(json.dumps({"meta": meta, "checks": checks, "rows": rows}, indent=1))
        (args.out / "gluon_ws.txt").write_text(json.dumps(meta) + "\n" + text + "\n")


if __name__ == "__main__":
    main()
