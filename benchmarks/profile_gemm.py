"""Run one GEMM of one path inside a CUDA profiler range, after its tuning: for Nsight Compute.

    ncu --clock-control none --profile-from-start off --set full \
        python3 benchmarks/profile_gemm.py --path w1a16 --m 4096 --k 3072 --n 3072

Paths: bf16 (torch.matmul, cuBLAS), w1a16, w1a8 (our fragment kernels). Everything before
the range (random weights, autotuning, the first call) stays out of the profile, so ncu sees exactly
the kernels of one call: W1A8's quantization kernel and GEMM, or W1A16's GEMM (which also adds its
K shares at M <= 16).
"""

from __future__ import annotations

import argparse

import torch

from bonsai.kernels import PackedWeight, pack_signs
from bonsai.kernels.triton import w1a8, w1a16

PATHS = ("bf16", "w1a16", "w1a8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", choices=PATHS, required=True)
    parser.add_argument("--m", type=int, default=4096)
    parser.add_argument("--k", type=int, default=3072)
    parser.add_argument("--n", type=int, default=3072)
    args = parser.parse_args()
    torch.manual_seed(0)
    w = PackedWeight(pack_signs(torch.randn(args.n, args.k, device="cuda")), args.k,
                     (torch.rand(args.n, device="cuda") + 0.5) / args.k**0.5)
    x = torch.randn(args.m, args.k, device="cuda", dtype=torch.bfloat16)
    if args.path == "bf16":
        w_bf16 = w.dequantize(torch.bfloat16)
        call = lambda: x @ w_bf16.t()  # noqa: E731
    elif args.path == "w1a16":
        call = lambda: w1a16(x, w, variant="fragment")  # noqa: E731
    else:
        call = lambda: w1a8(x, w, variant="fragment")  # noqa: E731
    for _ in range(3):  # tune, then settle
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
