"""Two builds of the compiled CPU kernel against each other, in one process, calls interleaved.

For kernel work: build the baseline from another commit and compare it with this checkout's library on
the same inputs (medians of interleaved calls, so a burst of load on a shared machine hits both):

    git worktree add /tmp/base <commit> && (cd /tmp/base && python setup.py build_ext --inplace -q)
    python benchmarks/ab_cpu_kernel.py /tmp/base/src/bonsai/kernels/cpu/_bitmm*.so     # vs this checkout's
    python benchmarks/ab_cpu_kernel.py A.so B.so --models emoji --m 512 4096 --isa avx512
    python benchmarks/ab_cpu_kernel.py src/bonsai/kernels/cpu/_bitmm*.so --isa avx2 --isa-b avxvnni   # two paths

Prints per shape both times, the ratio A/B (> 1: B is faster) and the largest difference between the
two outputs relative to max |y| (0 when both do the same integer sums and float operations). Weights
are bonsai-4b's "mean" layers (row scale + row offset) unless --rank/--group-size say otherwise.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench_cpu import SHAPES, random_packed
from bonsai.heap import keep_large_blocks
from bonsai.kernels.cpu import _prepare, binding


def load_copy(path: Path, folder: Path, name: str):
    """The library at `path`, loaded from a copy under its own name (dlopen hands back an already
    loaded library for the same file name)."""
    copy = folder / f"{name}.so"
    shutil.copy(path, copy)
    return binding.load_library(copy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lib_a", type=Path)
    parser.add_argument("lib_b", type=Path, nargs="?", help="default: this checkout's library")
    parser.add_argument("--models", nargs="+", default=["4b"], choices=list(SHAPES))
    parser.add_argument("--m", nargs="+", type=int, default=[1024, 2048])
    parser.add_argument("--isa", default=None, help="kernel path for both (default: the best this CPU runs)")
    parser.add_argument("--isa-b", default=None, help="another path for B (default: --isa)")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--group-size", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()

    keep_large_blocks()  # as a CPU Pipeline does
    lib_b_path = args.lib_b or binding.library_path()
    if lib_b_path is None:
        raise SystemExit("this checkout has no built kernel: python setup.py build_ext --inplace")
    folder = Path(tempfile.mkdtemp())
    libs = [load_copy(args.lib_a, folder, "a"), load_copy(lib_b_path, folder, "b")]
    isas = [args.isa or binding.chosen_isa(libs[1])] * 2
    isas[1] = args.isa_b or isas[0]
    threads = binding.thread_count()
    print(f"A = {args.lib_a} ({isas[0]})\nB = {lib_b_path} ({isas[1]})\n{threads} threads, {args.repeats} interleaved calls each")
    torch.manual_seed(0)
    for model in args.models:
        for k, n in SHAPES[model]:
            packed = random_packed(n, k, args.group_size, args.rank)
            prepared = packed.prepared("cpu", _prepare)  # owns the tensors c_weight points into: keep it
            weight = prepared.c_weight
            for m in args.m:
                x = torch.randn(m, k)
                ys = [binding.call_bitmm(lib, isa, threads, x, weight, None) for lib, isa in zip(libs, isas)]  # + warm-up
                diff = ((ys[0] - ys[1]).abs().max() / ys[0].abs().max()).item()
                times: list[list[float]] = [[], []]
                for _ in range(args.repeats):
                    for lib, isa, bucket in zip(libs, isas, times):
                        start = time.perf_counter()
                        binding.call_bitmm(lib, isa, threads, x, weight, None)
                        bucket.append(time.perf_counter() - start)
                a, b = (statistics.median(t) for t in times)
                print(f"{model:<6}{k:>6}->{n:<6}M={m:<5} A {a * 1e3:8.2f} ms  B {b * 1e3:8.2f} ms  A/B {a / b:5.2f}x  "
                      f"B {2 * m * n * k / b / 1e12:.2f} TOP/s  max diff {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
