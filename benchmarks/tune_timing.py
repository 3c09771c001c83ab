"""How well the fragment kernels' autotuner picks a tile at M <= 16, timed two ways, against graph timing.

    PYTHONPATH=src python benchmarks/tune_timing.py [--ms 1,16] [--repeats 3] [--idle 0] [--out DIR]

For each bonsai-4b shape, M and kernel (W1A16 with ops.split_k's shares; W1A8 with its quantization), every
candidate tile of ops' "small" bucket is first timed as the model runs it (bench_triton.py's graph Timer: a
CUDA graph of calls, each on its own weight copy, the copies over twice the L2). Then the autotuner tunes the
product afresh `repeats` times with each timing, and the tile it picks is scored by that graph time against
the best tile's (1.00 = it picked the fastest):
- "do_bench": the autotuner's own (ops._bench: triton.testing.do_bench with 5 ms of warm-up, one launch at a
  time, L2 cleared before each);
- "do_bench 25": the same with Triton's default 25 ms of warm-up;
- "cudagraph": triton.testing.do_bench_cudagraph (launches replayed from a CUDA graph, no host, L2 warm).
--idle S leaves the GPU idle for S seconds before each tuning, as it may be between a process's start and its first
product (its clocks may drop meanwhile; not measured). On an H100 (RESULTS.md, eleventh session) 2 s of idling made
every timing's picks worse: 1.064-1.075x the best tile's time on average, against 1.006-1.023 without; 25 ms of
warm-up instead of 5 did not help (1.065 against 1.064 over the same 48 tunings).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import triton
import triton.testing

from bench_gluon_ws import operands
from bench_triton import SHAPES, Timer, commit, rel_err
from bonsai.kernels.triton import ops, w1a8, w1a16

TIMINGS = {
    "do_bench": ops._bench,
    "do_bench 25": lambda fn, quantiles: triton.testing.do_bench(fn, warmup=25, rep=20, quantiles=quantiles),
    "cudagraph": lambda fn, quantiles: triton.testing.do_bench_cudagraph(fn, rep=20, quantiles=quantiles),
}
KERNELS = {"w1a16": (w1a16, ops._w1a16_frag_tuned, ops._W1A16_FRAG_TILES),
           "w1a8": (w1a8, ops._w1a8_frag_tuned, ops._W1A8_FRAG_TILES)}


def tile_of(config: triton.Config) -> tuple:
    return config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"], config.num_warps, config.num_stages


def fresh_tuning(kind: str, timing: str, x: torch.Tensor, weight, idle: float) -> tuple:
    """Tune `kind` for this product with `timing`, forgetting every earlier choice, after `idle` seconds with the
    GPU idle; the tile it picks."""
    fn, tuned, _ = KERNELS[kind]
    torch.cuda.synchronize()
    time.sleep(idle)
    tuned._do_bench = TIMINGS[timing]
    tuned.cache_results = False  # Triton's disk cache would hand back the first choice
    tuned.cache.clear()
    ops._chosen.clear()
    fn(x, weight, variant="fragment")
    return tile_of(tuned.best_config)


def case(kind: str, k: int, n: int, m: int, timer: Timer, repeats: int, idle: float) -> dict:
    fn, _, tiles = KERNELS[kind]
    row, weights, x, ref = operands(k, n, m, timer)
    sms = ops._sm_count(x.device)
    truth = {}
    for _, bn, bk, warps, stages in tiles["small"]:
        split = ops.split_k(m, n, k, bn, bk, sms) if kind == "w1a16" else 1
        config = ops.TileConfig(ops.SMALL_M, bn, bk, warps, stages, split_k=split)
        err = rel_err(fn(x, weights[0], config=config, variant="fragment"), ref)
        truth[(bn, bk, warps, stages)] = timer(lambda i, c=config: fn(x, weights[i], config=c, variant="fragment"),
                                               len(weights))
        print(json.dumps({"kind": kind, "K": k, "N": n, "M": m, "tile": [bn, bk, warps, stages], "split": split,
                          "rel_err": err, "graph_us": truth[(bn, bk, warps, stages)] * 1e3}), flush=True)
    best = min(truth.values())
    out = {"kind": kind, "K": k, "N": n, "M": m, "bf16_us": row["bf16"] * 1e3,
           "tiles": {"x".join(map(str, t)): v * 1e3 for t, v in truth.items()}, "best_us": best * 1e3}
    for timing in TIMINGS:
        picks = [fresh_tuning(kind, timing, x, weights[0], idle) for _ in range(repeats)]
        out[timing] = [{"tile": "x".join(map(str, p)), "vs_best": truth[p] / best} for p in picks]
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ms", default="1,16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kernels", default="w1a16,w1a8")
    parser.add_argument("--idle", type=float, default=0.0, help="seconds the GPU idles before each tuning")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    timer = Timer("graph")
    rows = [case(kind, k, n, int(m), timer, args.repeats, args.idle) for kind in args.kernels.split(",")
            for m in args.ms.split(",") for k, n in SHAPES["4b"]]
    lines = [f"{'kernel':<6} {'K->N':>12} {'M':>3} | best tile us | " + " | ".join(f"{t} picks (x best)" for t in TIMINGS)]
    for r in rows:
        picks = " | ".join(" ".join(f"{p['vs_best']:.2f}" for p in r[t]) for t in TIMINGS)
        lines.append(f"{r['kind']:<6} {r['K']:>5}->{r['N']:<6} {r['M']:>3} | {r['best_us']:12.1f} | {picks}")
    means = {t: sum(p["vs_best"] for r in rows for p in r[t]) / sum(len(r[t]) for r in rows) for t in TIMINGS}
    lines.append("mean (x best): " + ", ".join(f"{t} {v:.3f}" for t, v in means.items()))
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"device": torch.cuda.get_device_name(), "commit": commit(), "idle_s": args.idle}
        (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (args.out / "table.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
