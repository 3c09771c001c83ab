"""What a LoRA costs on CPU: bonsai-emoji images with no LoRA, with a LoRA on every block layer as the
pipeline runs it (branches folded into the fused blocks' low-rank term), and with the same LoRA through
dit.py's own unfused forward (how it ran before the fold), interleaved in one run.

    PYTHONPATH=src python benchmarks/bench_lora_cpu.py [--rank 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch

from bonsai.lora import add_trainable_lora, lora_targets, set_lora_weights
from bonsai.models import dit_fused
from bonsai.pipeline import Pipeline

PROMPT = "grinning face, grinning, smileys & emotion, noto style"


@contextmanager
def unfused():
    """Every block through dit.py's own forward (the LoRA wrappers compute their branches there)."""
    applies = dit_fused.applies
    dit_fused.applies = lambda *args: False
    try:
        yield
    finally:
        dit_fused.applies = applies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    pipe = Pipeline.from_pretrained("bonsai-emoji", device="cpu")
    add_trainable_lora(pipe.denoiser, "bench", args.rank, ("blocks.*",))
    torch.manual_seed(0)
    for layer in lora_targets(pipe.denoiser).values():  # a fresh LoRA's up factors are zero: give them values
        if "bench" in getattr(layer, "ups", {}):
            layer.ups["bench"].data.normal_(std=0.02)

    def image() -> float:
        start = time.perf_counter()
        pipe.generate(PROMPT, seed=1, steps=20, cfg=4.0, batch=2)
        return time.perf_counter() - start

    def no_lora() -> float:
        set_lora_weights(pipe.denoiser, {"bench": 0.0})
        return image()

    def lora() -> float:
        set_lora_weights(pipe.denoiser, {"bench": 1.0})
        return image()

    def lora_unfused() -> float:
        set_lora_weights(pipe.denoiser, {"bench": 1.0})
        with unfused():
            return image()

    variants = {"no LoRA": no_lora, f"LoRA rank {args.rank}, fused (folded)": lora, f"LoRA rank {args.rank}, unfused": lora_unfused}
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(fn())
    base = statistics.median(times["no LoRA"])
    print(f"bonsai-emoji, 64x64, 20 steps, cfg 4, batch 2, {torch.get_num_threads()} threads, {args.repeats} interleaved repeats")
    for name, ts in times.items():
        median = statistics.median(ts)
        print(f"{name:<32} median {median:.2f} s  (best {min(ts):.2f}, worst {max(ts):.2f})  x{median / base:.2f} of no LoRA")


if __name__ == "__main__":
    main()
