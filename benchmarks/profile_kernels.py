"""One call of a bitmatmul kernel inside an NVTX range named "profile", for Nsight Compute to profile alone.

    bash benchmarks/profile_kernels.sh OUT K x N x M [kernel] [variant]    # ncu around this script

The call is made after a first one with the same shape (compiling, tuning), so the range holds the kernels of
the path as the model runs it: W1A16 is one kernel; W1A8 is the activation quantization kernel and the GEMM;
"bf16" is cuBLAS on the dequantized weight (torch.matmul), the baseline profiled the same way.
Random signs and scales (bench_triton.random_weight), x ~ N(0, 1). The result is checked against float64 so a
profile of a wrong kernel is not taken for one of the right one.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench_triton import random_weight, rel_err
from bonsai.kernels.triton import ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", help="K x N x M, e.g. 12288x3072x16")
    parser.add_argument("--kernel", choices=("w1a16", "w1a8", "bf16"), default="w1a16")
    parser.add_argument("--variant", choices=ops.VARIANTS, default="auto")
    args = parser.parse_args()
    k, n, m = (int(v) for v in args.shape.split("x"))
    torch.manual_seed(0)
    weight = random_weight(n, k, False, "cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    if args.kernel == "bf16":
        dense = weight.dequantize(torch.bfloat16).t()
        run = lambda: x @ dense  # noqa: E731
    else:
        run = lambda: getattr(ops, args.kernel)(x, weight, variant=args.variant)  # noqa: E731
    err = rel_err(run(), x.double() @ weight.dequantize(torch.float64).t())  # compiles and tunes
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("profile")
    run()
    torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    print(json.dumps({"kernel": args.kernel, "variant": args.variant, "K": k, "N": n, "M": m, "rel_err": err}))


if __name__ == "__main__":
    main()
