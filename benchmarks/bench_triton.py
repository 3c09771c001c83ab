"""Benchmark the Triton bitmatmul kernels against cuBLAS bf16, torch._int_mm and torch._scaled_mm on one CUDA GPU.

    PYTHONPATH=src python benchmarks/bench_triton.py [--out DIR] [--models 4b,emoji] [--ms 1,16,1024,2048,4096]
        [--variants fragment,ws] [--timing do_bench|graph] [--split-ks 1,16]

For every GEMM shape of bonsai-4b and bonsai-emoji and every M it times, in one run with
triton.testing.do_bench (median; do_bench clears L2 before each repetition, so weights are read
from memory every time): torch.matmul in bf16 (cuBLAS), torch._int_mm in int8 and torch._scaled_mm
in float8 e4m3 (GEMMs only, no activation quantization), and for each kernel variant (ops.VARIANTS:
"k-major" expands the weight into shared memory, "fragment" into the A-operand registers, "ws" has
warps specialized to expand it; the default "auto" is "ws" from ops.WS_MIN_ROWS rows on, else "fragment")
our W1A16 and our W1A8 (including its activation quantization kernel). `--models 4b --ms 1024,2048,4096`
restricts to the 4B compute-bound shapes.
It first checks every kernel's relative error against a float64 reference. Prints a table last;
with --out, writes the full results as JSON and the table as text. It also times a kernel that does
nothing (one element += 1) the same way: the floor under every small-M time in the table.

--timing graph times without the host: each path runs `calls` times in one CUDA graph, every call on its
own copy of the weights (the copies together are at least twice the L2 cache, so the weights still come
from memory; where the copy count cap leaves them smaller, "cold" is false in the JSON), and the graph's
median replay time is divided by `calls`. This is how a model runs its layers under CUDA graphs
(bonsai.cuda_graph), and it measures the small-M kernels below do_bench's launch floor.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
from pathlib import Path

import torch
import triton
import triton.testing

from bonsai.kernels import PackedWeight, pack_signs
from bonsai.kernels.triton import ops, quantize_rows, w1a8, w1a16
from bonsai.kernels.triton.ops import FP8_CAPABILITY, VARIANTS

SHAPES = {  # model -> [(K, N)]: qkv, attention out, (emoji: cross-attention kv,) MLP up, MLP down
    "4b": [(3072, 9216), (3072, 3072), (3072, 12288), (12288, 3072)],
    "emoji": [(320, 960), (320, 320), (320, 640), (320, 1280), (1280, 320)],  # as benchmarks/bench_cpu.py
}


def random_weight(n: int, k: int, full: bool, device: str) -> PackedWeight:
    """Random signs and positive scales; `full` adds group scales, column scales, row offset and rank 32."""
    extra = {}
    if full:
        g = 128
        extra = dict(group_size=g, group_scale=(torch.rand(n, -(-k // g), device=device) + 0.5).half(),
                     col_scale=torch.rand(k, device=device) + 0.5, row_offset=torch.randn(n, device=device) * 0.01,
                     lowrank_u=(torch.randn(n, 32, device=device) * 0.02).bfloat16(),
                     lowrank_v=(torch.randn(32, k, device=device) * 0.02).bfloat16())
    signs = pack_signs(torch.randn(n, k, device=device))
    return PackedWeight(signs, k, (torch.rand(n, device=device) + 0.5) / k**0.5, **extra)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y = y.double()
    if not torch.isfinite(y).all():
        return float("nan")
    return ((y - ref).norm() / ref.norm()).item()


SPLIT_KS: list[int] = []  # --split-ks: extra W1A16 fragment columns with another MAX_SPLIT_K


def kernels(variants: list[str]) -> list[tuple[str, object]]:
    """(column name, fn(x, weight)) for W1A16 and W1A8 in each variant, and W1A16 fragment at each of SPLIT_KS."""
    paths = [(f"{name}:{v}", lambda x, w, fn=fn, v=v: fn(x, w, variant=v))
             for v in variants for name, fn in (("w1a16", w1a16), ("w1a8", w1a8))]
    return paths + [(f"w1a16-sk{s}:fragment", lambda x, w, s=s: with_max_split(s, x, w)) for s in SPLIT_KS]


def with_max_split(shares: int, x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """W1A16 fragment with at most `shares` K shares (and PROGRAMS_PER_SM = max(4, shares))."""
    saved = ops.MAX_SPLIT_K, ops.PROGRAMS_PER_SM
    ops.MAX_SPLIT_K, ops.PROGRAMS_PER_SM = shares, max(4, shares)
    try:
        return w1a16(x, w, variant="fragment")
    finally:
        ops.MAX_SPLIT_K, ops.PROGRAMS_PER_SM = saved


def check_errors(device: str, variants: list[str]) -> list[dict]:
    """Relative error vs float64 of every path, on a 4B shape and an odd one, plain and full weights."""
    rows = []
    for m, k, n in [(1024, 3072, 3072), (77, 3000, 1000), (5, 3072, 9216)]:
        for full in (False, True):
            w = random_weight(n, k, full, device)
            wd = w.dequantize(torch.float64)
            for dtype in (torch.bfloat16, torch.float16):
                x = torch.randn(m, k, device=device).to(dtype)
                ref = x.double() @ wd.T
                row = {"M": m, "K": k, "N": n, "full": full, "dtype": str(dtype).split(".")[-1],
                       "cublas": rel_err(x @ w.dequantize(dtype).T, ref)}
                for name, fn in kernels(variants):
                    try:
                        fn(x, w)  # the first call autotunes; check the launch path every later call takes
                        row[name] = rel_err(fn(x, w), ref)
                    except Exception as err:  # report and go on: one failing path must not hide the others
                        row[name] = describe(err)
                rows.append(row)
    return rows


def describe(err: Exception) -> str:
    """The exception's type and the end of its message (compiler errors put the cause last)."""
    return f"error: {type(err).__name__}: {str(err)[-600:]}"


def bench(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


GRAPH_CALLS = 20  # calls per graph at least: the graph's own launch is shared by all of them
MAX_COPIES = 256


def copies_for(bytes_per_call: int) -> int:
    """Weight copies that together exceed twice the L2 cache (capped at MAX_COPIES)."""
    l2 = torch.cuda.get_device_properties().L2_cache_size
    return max(1, min(MAX_COPIES, -(-2 * l2 // bytes_per_call)))


def graph_time(calls: list) -> float:
    """Median ms per call of `calls` (callables) captured once in a CUDA graph, over 50 replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # allocations and lazy setup outside the capture
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2] / len(calls)


class Timer:
    """Times a path given as fn(i) -> result of call i: do_bench on call 0, or a CUDA graph of calls over copies."""

    def __init__(self, timing: str):
        self.timing = timing

    def __call__(self, fn, copies: int) -> float:
        if self.timing == "do_bench":
            return bench(lambda: fn(0))
        calls = max(GRAPH_CALLS, copies)
        return graph_time([lambda i=i: fn(i % copies) for i in range(calls)])


def launch_floor(timer: Timer, device: str) -> float:
    """The time (ms) of one trivial kernel: launch, events and the rest that any kernel pays."""
    one = torch.zeros(1, device=device)
    return timer(lambda i: one.add_(1), 1)


def time_shape(k: int, n: int, m: int, device: str, variants: list[str], timer: Timer) -> dict:
    graph = timer.timing == "graph"
    packed = copies_for(n * k // 8) if graph else 1
    ws = [random_weight(n, k, False, device) for _ in range(packed)]
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    dense = copies_for(n * k * 2) if graph else 1
    w_bf16 = [w.dequantize(torch.bfloat16) for w in ws[:dense]]
    row = {"K": k, "N": n, "M": m, "timing": timer.timing, "copies": packed,
           "cold": not graph or packed * n * k // 8 >= 2 * torch.cuda.get_device_properties().L2_cache_size}
    row["bf16"] = timer(lambda i: torch.matmul(x, w_bf16[i].t()), len(w_bf16))
    ours = kernels(variants)
    for key, fn in ours:  # tune every kernel before timing anything of ours
        try:
            fn(x, ws[0])
        except Exception as err:  # reported below, when timing it fails the same way
            print(json.dumps({"K": k, "N": n, "M": m, "kernel": key, "tuning_error": describe(err)}), flush=True)
    q, _, _ = quantize_rows(x, None)
    dense_int8 = copies_for(n * k) if graph else 1
    w_int8 = [torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8) for _ in range(dense_int8)]
    try:
        row["int8"] = timer(lambda i: torch._int_mm(q, w_int8[i].t()), dense_int8)
    except RuntimeError as err:  # _int_mm rejects some shapes (e.g. M <= 16)
        row["int8"], row["int8_error"] = None, str(err).splitlines()[0]
    del w_int8
    row["fp8"] = None
    if torch.cuda.get_device_capability() >= FP8_CAPABILITY:
        q8, xs8 = quantize_rows(x, None, fp8=True)[:2]
        w_fp8 = [torch.randn(n, k, device=device).to(torch.float8_e4m3fn) for _ in range(dense_int8)]
        one = torch.ones(1, n, device=device)
        try:  # per-token and per-channel scales, as our W1A8 applies them
            row["fp8"] = timer(lambda i: torch._scaled_mm(q8, w_fp8[i].t(), xs8[:, None], one,
                                                          out_dtype=torch.bfloat16), dense_int8)
        except RuntimeError as err:  # _scaled_mm rejects some shapes (dimensions not multiples of 16)
            row["fp8_error"] = str(err).splitlines()[0]
        del w_fp8
    timed = [(key, lambda i, fn=fn: fn(x, ws[i]), packed) for key, fn in ours]
    timed.append(("quant", lambda i: quantize_rows(x, None), 1))
    for key, fn, copies in timed:
        try:
            row[key] = timer(fn, copies)
        except Exception as err:  # report and go on: one failing kernel must not hide the others
            row[key], row[f"{key}_error"] = None, describe(err)
    for key in ["bf16", "int8", "fp8"] + [key for key, _ in ours]:
        if row[key] is not None:
            row[f"{key}_tflops"] = 2 * m * n * k / (row[key] * 1e-3) / 1e12
    return row


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "uncommitted"


def _cell(r: dict, key: str, tflops: bool = True) -> str:
    if r.get(key) is None:
        return f"{'fail':>8}" + (f" {'':>5} {'':>6}" if tflops else "")
    if not tflops:
        return f"{r[key] * 1e3:8.1f}"
    return f"{r[key] * 1e3:8.1f} {r[key + '_tflops']:5.0f} {r['bf16'] / r[key]:6.2f}"


def table(rows: list[dict], variants: list[str]) -> str:
    """One line per shape; per kernel: microseconds, TF/s and cuBLAS bf16 time / our time (> 1: faster)."""
    keys = [key for key, _ in kernels(variants)]
    head = f"{'K->N':>12} {'M':>5} | {'bf16 us':>8} {'TF/s':>5} | {'int8 us':>8} | {'fp8 us':>8} | "
    head += " | ".join(f"{key:>22}" for key in keys) + f" | {'quant us':>8}"
    sub = f"{'':>12} {'':>5} | {'':>8} {'':>5} | {'':>8} | {'':>8} | " + " | ".join(
        f"{'us':>8} {'TF/s':>5} {'x bf16':>6}" for _ in keys) + f" | {'':>8}"
    lines = [head, sub]
    for r in rows:
        lines.append(f"{r['K']:>5}->{r['N']:<6} {r['M']:>5} | {r['bf16'] * 1e3:8.1f} {r['bf16_tflops']:5.0f} | "
                     f"{_cell(r, 'int8', False)} | {_cell(r, 'fp8', False)} | " + " | ".join(_cell(r, key) for key in keys) + " | "
                     f"{_cell(r, 'quant', False)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for results.json and table.txt")
    parser.add_argument("--models", default="4b,emoji")
    parser.add_argument("--ms", default="1,16,1024,2048,4096")
    parser.add_argument("--variants", default="fragment,ws", help=f"comma-separated, from {VARIANTS}")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--timing", choices=("do_bench", "graph"), default="do_bench",
                        help="do_bench: one call at a time, L2 cleared; graph: calls on weight copies in one CUDA graph")
    parser.add_argument("--split-ks", default="", help="W1A16 fragment also at these MAX_SPLIT_K (1: no split)")
    args = parser.parse_args()
    variants = args.variants.split(",")
    SPLIT_KS.extend(int(s) for s in args.split_ks.split(",") if s)
    device = "cuda"
    torch.manual_seed(0)
    timer = Timer(args.timing)
    meta = {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "commit": commit(), "torch": torch.__version__, "triton": triton.__version__, "timing": args.timing,
            "floor_us": launch_floor(timer, device) * 1e3}
    print(json.dumps(meta), flush=True)
    errors = [] if args.skip_check else check_errors(device, variants)
    for e in errors:
        print(json.dumps(e), flush=True)
    rows = []
    for model in args.models.split(","):
        for k, n in SHAPES[model]:
            for m in (int(s) for s in args.ms.split(",")):
                try:
                    rows.append(time_shape(k, n, m, device, variants, timer))
                except Exception as err:  # report and go on with the other shapes
                    print(json.dumps({"K": k, "N": n, "M": m, "error": describe(err)}))
                    continue
                print(json.dumps(rows[-1]), flush=True)
    text = table(rows, variants)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"meta": meta, "errors": errors, "rows": rows}, indent=1))
        (args.out / "table.txt").write_text(text + "\n")
    print(json.dumps(meta))
    print(text)


if __name__ == "__main__":
    main()
