"""CPU benchmark: the compiled 1-bit kernel (bonsai.kernels.cpu) vs PyTorch fp32 matmul.

For every GEMM shape of bonsai-emoji and bonsai-4b (K -> N, weight [N, K]) and M rows, one run prints
torch fp32 `F.linear` time and GFLOP/s (2*M*N*K / t), the kernel's time and GOP/s, and the ratio;
then the weight memory of a packed layer vs fp32. Times are medians of interleaved repeats
(wall clock, the same thread count for both), so a burst of other load hits both sides alike; the
load average is printed because a shared machine changes absolute numbers. --cpu-time measures
one thread's CPU time instead (both sides single-threaded): robust to being descheduled by other
processes, though not to a busy sibling hyperthread.

    python benchmarks/bench_cpu.py                   # all shapes, M = 1, 64, 256, 1024, 2048
    python benchmarks/bench_cpu.py --models 4b --m 256 --group-size 128 --isa avx2
    python benchmarks/bench_cpu.py --cpu-time         # on a machine shared with other work (also --e2e)
    python benchmarks/bench_cpu.py --models emoji --m 512 --rank 16 --bias   # bonsai-emoji's layers
    python benchmarks/bench_cpu.py --e2e              # seconds per bonsai-emoji image: kernel, reference, fp32
    python benchmarks/bench_cpu.py --breakdown        # where one bonsai-emoji denoiser step spends its time
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bonsai.kernels import PackedWeight, pack_signs
from bonsai.heap import keep_large_blocks
from bonsai.kernels.cpu import available_isas, bitmatmul_cpu, chosen_isa

SHAPES = {  # (K, N) of each linear layer
    "emoji": [(320, 960), (320, 320), (320, 640), (320, 1280), (1280, 320)],
    "4b": [(3072, 9216), (3072, 3072), (3072, 12288), (12288, 3072)],
}
PROMPT = "grinning face, grinning, smileys & emotion, noto style"
TIME_BUDGET_S = 1.5  # per (shape, M) and side; at least 2 repeats after a warm-up call


def random_packed(n: int, k: int, group_size: int, rank: int) -> PackedWeight:
    """A packed layer as the default 'mean' scheme stores it (row scale + row offset), plus options."""
    fields: dict = {"signs": pack_signs(torch.randn(n, k)), "row_scale": torch.rand(n) + 0.5}
    fields["row_offset"] = torch.randn(n) * 0.01
    if group_size:
        fields["group_scale"] = (torch.rand(n, -(-k // group_size)) + 0.5).half()
    if rank:
        fields["lowrank_u"] = torch.randn(n, rank).bfloat16()
        fields["lowrank_v"] = torch.randn(rank, k).bfloat16()
    return PackedWeight(in_features=k, group_size=group_size, **fields)


def packed_bytes(w: PackedWeight) -> int:
    return sum(t.numel() * t.element_size() for t in w.tensors().values())


def interleaved_medians(fns: list, clock=time.perf_counter) -> list[float]:
    """Median seconds per call of each fn, calls interleaved; repeats sized by a time budget."""
    first = []
    for fn in fns:
        t = clock()
        fn()  # warm-up (and first estimate)
        first.append(clock() - t)
    reps = max(2, min(20, int(TIME_BUDGET_S / max(max(first), 1e-6))))
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, bucket in zip(fns, times):
            t = clock()
            fn()
            bucket.append(clock() - t)
    return [statistics.median(b) for b in times]


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def machine_line() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    model = names[0] if names else platform.processor()
    commit = git("rev-parse", "--short", "HEAD") or "uncommitted"
    if git("status", "--porcelain"):
        commit += " + local changes"
    return (
        f"{model}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"kernel ISA {chosen_isa()} (available: {', '.join(available_isas())}), "
        f"{datetime.date.today()}, commit {commit}"
    )


def dense_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same network with every 1-bit layer replaced by an fp32 nn.Linear of its dequantized weight."""
    import copy

    from bonsai.quant import BitLinear

    dense = copy.deepcopy(model)
    for name, layer in [(n, m) for n, m in dense.named_modules() if isinstance(m, BitLinear)]:
        linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        linear.weight.data = layer.packed.dequantize(torch.float32)
        if layer.bias is not None:
            linear.bias.data = layer.bias.float()
        parent, _, child = name.rpartition(".")
        setattr(dense.get_submodule(parent) if parent else dense, child, linear)
    return dense


def end_to_end(prompt: str, steps: int, repeats: int, clock=time.perf_counter) -> None:
    """Seconds per 64x64 bonsai-emoji image (text encoding, denoising, decoding; model loaded), three
    ways in one run, repeats interleaved so that other load on the machine hits all three alike
    (with --cpu-time: one thread's CPU time, the whole image on that thread)."""
    from bonsai.kernels import set_kernel
    from bonsai.pipeline import Pipeline

    pipe = Pipeline.from_pretrained("bonsai-emoji", device="cpu")
    one_bit = pipe.denoiser
    variants = {"1-bit, compiled kernel": ("cpu", one_bit), "1-bit, reference path": ("reference", one_bit),
                "same model, fp32 dense": ("reference", dense_copy(one_bit))}
    print(f"\nend to end: bonsai-emoji, 64x64, {steps} steps, cfg 4 (batch of 2 with guidance), "
          f"{repeats} interleaved repeats; kernel ISA {chosen_isa()}; "
          f"{'thread CPU time, 1 thread' if clock is time.thread_time else 'wall clock'}")
    runs: dict[str, list[float]] = {label: [] for label in variants}
    for kernel, model in variants.values():  # warm-up
        set_kernel(kernel)
        pipe.denoiser = model
        pipe.generate(prompt, steps=2, seed=0)
    for i in range(repeats):
        for label, (kernel, model) in variants.items():
            set_kernel(kernel)
            pipe.denoiser = model
            t = clock()
            pipe.generate(prompt, steps=steps, seed=i)
            runs[label].append(clock() - t)
    set_kernel(None)
    pipe.denoiser = one_bit
    base = runs["same model, fp32 dense"]
    print(f"{'':26s} {'median':>8s} {'best':>7s} {'worst':>7s} | vs fp32: median, best (each run / fp32 of that round)")
    for label, ts in runs.items():
        ratios = [b / t for b, t in zip(base, ts)]
        print(f"{label:26s} {statistics.median(ts):7.2f}s {min(ts):6.2f}s {max(ts):6.2f}s | "
              f"{statistics.median(base) / statistics.median(ts):5.2f}x {min(base) / min(ts):5.2f}x "
              f"(per round {min(ratios):.2f}-{max(ratios):.2f}x)")


# Profiler op names of each group in --breakdown ("bonsai::bitmm" is the compiled kernel's call).
OP_GROUPS = {
    "1-bit GEMMs (kernel, with fused ops)": ("bonsai::bitmm",),
    "fp32 GEMMs": ("aten::addmm", "aten::mm", "aten::bmm"),
    "attention (SDPA)": ("aten::_scaled_dot_product_flash_attention_for_cpu",),
    "GELU": ("aten::gelu",),
    "LayerNorm": ("aten::native_layer_norm",),
    "q/k RMSNorm": ("aten::_fused_rms_norm",),
    "add / mul (modulate, gates, residuals)": ("aten::add", "aten::mul", "aten::add_", "aten::mul_"),
    "copies (copy_, cat, stack)": ("aten::copy_", "aten::cat", "aten::stack"),
    "patch-embedding conv": ("aten::mkldnn_convolution",),
}


def step_breakdown(forwards: int = 10) -> None:
    """Wall time of one denoiser forward (one sampler step: batch 2 x 256 tokens) and the profiler's
    self time per op group, for the 1-bit model on the kernel and the same model in fp32."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from bonsai.kernels import set_kernel
    from bonsai.kernels.cpu import binding
    from bonsai.pipeline import Pipeline

    one_bit = Pipeline.from_pretrained("bonsai-emoji", device="cpu").denoiser
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 32, dtype=torch.bool)
    mask[:, 12:] = False
    inputs = (torch.randn(2, 3, 64, 64, generator=gen), torch.full((2,), 0.5), torch.randn(2, 32, 384, generator=gen), mask)
    call = binding.call_bitmm

    def recorded(*args):
        with record_function("bonsai::bitmm"):
            return call(*args)

    rows = {}
    for label, kernel, model in (("1-bit", "cpu", one_bit), ("fp32", "reference", dense_copy(one_bit))):
        set_kernel(kernel)
        with torch.no_grad():
            walls = interleaved_medians([lambda: model(*inputs)])
            binding.call_bitmm = recorded
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(forwards):
                    model(*inputs)
            binding.call_bitmm = call
        self_ms = {e.key: e.self_cpu_time_total / forwards / 1e3 for e in prof.key_averages()}
        groups = {name: sum(self_ms.get(op, 0.0) for op in ops) for name, ops in OP_GROUPS.items()}
        groups["other ops"] = sum(self_ms.values()) - sum(groups.values())
        rows[label] = (walls[0] * 1e3, groups)
    set_kernel(None)
    (w1, g1), (w32, g32) = rows["1-bit"], rows["fp32"]
    print(f"\none denoiser step (bonsai-emoji, batch 2 x 256 tokens): wall {w1:.1f} ms (1-bit) vs {w32:.1f} ms "
          f"(fp32) = {w32 / w1:.2f}x; profiler self time per op group, ms (the profiler adds its own overhead):")
    for name in g1:
        print(f"  {name:40s} {g1[name]:7.1f} {g32[name]:7.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--m", nargs="+", type=int, default=[1, 64, 256, 1024, 2048])
    parser.add_argument("--group-size", type=int, default=0)
    parser.add_argument("--rank", type=int, default=0, help="low-rank residual (bonsai-emoji: 16)")
    parser.add_argument("--bias", action="store_true", help="layers with a bias (fused in the kernel; F.linear's for fp32)")
    parser.add_argument("--repeats", type=int, default=3, help="end-to-end repeats per variant")
    parser.add_argument("--isa", help="force a kernel path (sets BONSAI_CPU_ISA)")
    parser.add_argument("--threads", type=int, help="threads for torch and the kernel (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true", help="one thread each, timed by thread CPU time")
    parser.add_argument("--e2e", action="store_true", help="also time whole bonsai-emoji images")
    parser.add_argument("--e2e-only", action="store_true", help="only the end-to-end part")
    parser.add_argument("--breakdown", action="store_true", help="only the per-op breakdown of one denoiser step")
    args = parser.parse_args()
    if args.cpu_time:
        args.threads = 1
        os.environ["BONSAI_CPU_THREADS"] = "1"
    if args.isa:
        os.environ["BONSAI_CPU_ISA"] = args.isa
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("BONSAI_CPU_THREADS", str(torch.get_num_threads()))
    heap = keep_large_blocks()  # as a CPU Pipeline does (BONSAI_MALLOC_TUNING=0: glibc's defaults)

    print(machine_line())
    print(f"C heap: {'large freed blocks kept for reuse (bonsai.heap)' if heap else 'the C library defaults'}")
    clock = time.thread_time if args.cpu_time else time.perf_counter
    if args.breakdown:
        step_breakdown()
        return
    if args.e2e_only:
        end_to_end(PROMPT, steps=20, repeats=args.repeats, clock=clock)
        return
    print(f"timing: {'thread CPU time, 1 thread' if args.cpu_time else 'wall clock'}; "
          f"load average at start: {os.getloadavg()[0]:.2f}; weight: row scale + row offset"
          f"{f', group size {args.group_size}' if args.group_size else ''}{f', rank {args.rank}' if args.rank else ''}"
          f"{', bias' if args.bias else ''}")
    header = f"{'fp32 ms':>9} {'GFLOP/s':>8} | {'1-bit ms':>9} {'GOP/s':>8} | {'speedup':>7}"
    print(f"{'model':6} {'K->N':>12} {'M':>5} | {header}")
    memory = []
    for model in args.models:
        for k, n in SHAPES[model]:
            w = random_packed(n, k, args.group_size, args.rank)
            w_fp32 = torch.randn(n, k)
            b = torch.randn(n) if args.bias else None
            memory.append((model, k, n, packed_bytes(w), n * k * 4))
            for m in args.m:
                x = torch.randn(m, k)
                ops = 2.0 * m * n * k
                fns = [lambda: F.linear(x, w_fp32, b), lambda: bitmatmul_cpu(x, w, b)]
                t_fp32, t_bit = interleaved_medians(fns, clock)
                fp32 = f"{t_fp32 * 1e3:9.3f} {ops / t_fp32 / 1e9:8.1f}"
                bit = f"{t_bit * 1e3:9.3f} {ops / t_bit / 1e9:8.1f}"
                print(f"{model:6} {f'{k}->{n}':>12} {m:>5} | {fp32} | {bit} | {t_fp32 / t_bit:6.2f}x", flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    print("\nweight memory of one layer (all stored tensors of the packed layer vs fp32 [N, K]):")
    for model, k, n, packed, fp32 in memory:
        ratio = f"{packed / 2**20:8.3f} MiB vs {fp32 / 2**20:8.2f} MiB = 1/{fp32 / packed:.1f}"
        print(f"{model:6} {f'{k}->{n}':>12}: {ratio}")
    if args.e2e:
        end_to_end(PROMPT, steps=20, repeats=args.repeats, clock=clock)


if __name__ == "__main__":
    main()
