"""One bonsai-4b DiT block, 1-bit: dit_fused.block_forward (row operations in the kernels) against
dit.py's own forward, in the same process on the same weights and inputs.

    PYTHONPATH=src python3 benchmarks/bench_fused_block.py            # CUDA, bf16, with and without a CUDA graph
    PYTHONPATH=src python3 benchmarks/bench_fused_block.py --tiny     # a scaled-down smoke test (CPU too)

Inputs as in a 512x512 bonsai-4b step with CFG: x [2, 1024, 3072], text [2, 64, 3072]. Prints the
time per block of each path (median of CUDA-event timings), the difference between their updates
out - x (relative Frobenius error), the kernel each linear chose and which row operations it fused.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from bonsai.kernels import dispatch
from bonsai.models import DiTConfig, dit_fused
from bonsai.models.bonsai4b import BONSAI_4B
from bonsai.models.dit import DiTBlock
from bonsai.quant import QuantPolicy, quantize_


def random_block(config: DiTConfig, device: torch.device, dtype: torch.dtype) -> DiTBlock:
    torch.manual_seed(0)
    block = DiTBlock(config)
    for module in block.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=module.in_features**-0.5)
            nn.init.normal_(module.bias, std=0.02)
    nn.init.normal_(block.modulation_table, std=0.1)
    quantize_(block, QuantPolicy())  # the bonsai-4b default: 1-bit, per-row scale and offset
    return block.to(device, dtype).eval()


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median milliseconds per call."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graphed(fn):
    """fn replayed from a CUDA graph (the inputs it closes over stay where they are)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="width 64, 64 tokens: a smoke test of this script")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = DiTConfig(hidden_size=64, num_heads=4, depth=1) if args.tiny else BONSAI_4B.denoiser
    tokens, text_tokens = (64, 8) if args.tiny else (1024, 64)
    block = random_block(config, device, dtype)
    g = torch.Generator().manual_seed(1)
    D = config.hidden_size
    x = torch.randn(2, tokens, D, generator=g).to(device, dtype)
    mod = (torch.randn(2, 6, D, generator=g) * 0.3).to(device, dtype)
    text = torch.randn(2, text_tokens, D, generator=g).to(device, dtype)
    mask = torch.ones(2, text_tokens, dtype=torch.bool, device=device)

    chosen = {}
    select = dispatch.select_kernel

    def recording_select(xx, weight):
        kernel = select(xx, weight)
        chosen.setdefault((tuple(xx.shape), weight.out_features, weight.in_features), kernel)
        return kernel

    dispatch.select_kernel = recording_select
    with torch.no_grad():
        if not dit_fused.applies(block, x):
            print(f"the kernel chosen for this block fuses nothing here ({select(x, block.attn.qkv.packed).name}): "
                  "both paths are dit.py's forward")
        paths = {"dit_fused.block_forward": lambda: dit_fused.block_forward(block, x, mod, text, mask),
                 "dit.py forward": lambda: unfused_forward(block, x, mod, text, mask)}
        outputs = {name: fn() for name, fn in paths.items()}
        dispatch.select_kernel = select
        print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, dtype {dtype}, "
              f"x {tuple(x.shape)}, text {tuple(text.shape)}")
        print("kernels per linear (x shape, N, K): kernel, fused parts")
        for (shape, n, k), kernel in chosen.items():
            print(f"  {shape} N={n} K={k}: {kernel.name}, {sorted(kernel.fuses) or 'none'}")
        a, b = (o.double() - x.double() for o in outputs.values())  # the block's update (the residual x dominates)
        print(f"fused vs dit.py, the block's update out - x: relative error {((a - b).norm() / b.norm()).item():.2e}")
        graph_modes = [False, True] if device.type == "cuda" else [False]
        for use_graph in graph_modes:
            for name, fn in paths.items():
                run = graphed(fn) if use_graph else fn
                ms = timed(run, device, args.repeats)
                print(f"  {name:24s} CUDA graph {'on ' if use_graph else 'off'}: {ms:7.3f} ms per block"
                      f" ({ms * config.depth:6.1f} ms for {config.depth} blocks)")


def unfused_forward(block: DiTBlock, x, mod, text, mask):
    """dit.py's DiTBlock.forward with the fused path turned off."""
    applies = dit_fused.applies
    dit_fused.applies = lambda *_: False
    try:
        return block(x, mod, text, mask)
    finally:
        dit_fused.applies = applies


if __name__ == "__main__":
    main()
