"""W1A16 at M <= 16: the mma.sync kernel (variant "mma": small.py, gluon_small.py) beside cuBLAS bf16 and the
default path (the fragment kernel with split-K), on bonsai-4b's shapes, under CUDA graphs, in one run.

    PYTHONPATH=src python benchmarks/bench_small_m.py [--ms 1,16] [--out DIR]

Each call runs on its own weight copy, the copies over twice the L2 (bench_triton.py's Timer). Every tile of
small.candidates runs on its own, and the "mma" path as it chooses by its own timing; each is checked against
float64 first (x @ W.T on the dequantized weight). A fused epilogue (row offset, bias, GELU; and residual +
gate) and fp16 activations are checked on one shape.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench_gluon_ws import operands
from bench_triton import SHAPES, Timer, commit, launch_floor, random_weight, rel_err
from bonsai.kernels.fusion import Epilogue
from bonsai.kernels.triton import ops, small


def run(x, w, tile: small.SmallTile | None = None, variant: str = "mma", epilogue=None, bias=None):
    config = None if tile is None else ops.TileConfig(ops.SMALL_M, tile.rows, 64 * tile.chunks, tile.warps)
    return ops.w1a16(x, w, bias=bias, epilogue=epilogue, config=config, variant=variant)


def time_shape(k: int, n: int, m: int, timer: Timer) -> dict:
    row, weights, x, ref = operands(k, n, m, timer)
    copies = len(weights)
    paths = {"default": (None, "fragment"), "mma": (None, "mma")}
    paths.update({f"mma {t.rows}x{t.chunks}x{t.warps}": (t, "mma") for t in small.candidates(k)})
    for key, (tile, variant) in paths.items():
        try:
            row[f"{key} rel_err"] = rel_err(run(x, weights[0], tile, variant), ref)  # tunes, then checks
            row[key] = timer(lambda i, tile=tile, variant=variant: run(x, weights[i], tile, variant), copies)
        except Exception as err:  # report and go on with the other paths
            row[key], row[f"{key} error"] = None, f"{type(err).__name__}: {str(err)[-300:]}"
        print(json.dumps({k_: v for k_, v in row.items() if k_.startswith(key) or k_ in ("K", "N", "M", "bf16")}),
              flush=True)
    return row


def check_fused() -> dict:
    """The fused epilogue and fp16 against float64, at M = 5, on a shape off the tile (N, K not multiples)."""
    m, k, n = 5, 3088, 1040
    w = random_weight(n, k, False, "cuda")
    w = type(w)(w.signs, w.in_features, w.row_scale, row_offset=torch.randn(n, device="cuda") * 0.01)
    x = (torch.randn(m, k, device="cuda") * 2 + 0.3).bfloat16()
    bias = torch.randn(n, device="cuda").bfloat16()
    res = torch.randn(1, m, n, device="cuda").bfloat16()  # one sample of m tokens: the gate is per sample
    gate = torch.randn(1, n, device="cuda").bfloat16()
    y = x.double() @ w.dequantize(torch.float64).t() + bias.double()
    out = {}
    gelu = torch.nn.functional.gelu(y, approximate="tanh")
    out["gelu"] = rel_err(run(x, w, epilogue=Epilogue(gelu=True), bias=bias), gelu)
    gated = y[None] * gate.double()[:, None] + res.double()
    out["residual+gate"] = rel_err(run(x[None], w, epilogue=Epilogue(residual=res, gate=gate), bias=bias), gated)
    xh = x.half()
    out["fp16"] = rel_err(run(xh, w), xh.double() @ w.dequantize(torch.float64).t())
    for chunks in (8, 32):  # 7 shares, 2 shares (the second part empty)
        out[f"chunks {chunks}"] = rel_err(run(x, w, small.SmallTile(64, chunks, 4)),
                                          x.double() @ w.dequantize(torch.float64).t())
    print(json.dumps({"fused": out}), flush=True)
    return out


def table(rows: list[dict], floor: float) -> str:
    lines = [f"empty kernel under graphs: {floor * 1e3:.2f} us"]
    for r in rows:
        lines.append(f"{r['K']}->{r['N']} M={r['M']}: bf16 {r['bf16'] * 1e3:.1f} us")
        for key, t in r.items():
            if key in ("default", "mma") or (key.startswith("mma ") and not key.endswith(("rel_err", "error"))):
                err = r.get(f"{key} rel_err") or float("nan")
                lines.append(f"  {key:<16} " + (f"{t * 1e3:7.1f} us {r['bf16'] / t:5.2f}x bf16  rel err {err:.2e}"
                                                 if t else f"fail: {r.get(key + ' error', '')[:200]}"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ms", default="16,1")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    timer = Timer("graph")
    floor = launch_floor(timer, "cuda")
    fused = check_fused()
    rows = [time_shape(k, n, int(m), timer) for m in args.ms.split(",") for k, n in SHAPES["4b"]]
    text = table(rows, floor)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"device": torch.cuda.get_device_name(), "commit": commit(), "floor_ms": floor, "fused": fused}
        (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
        (args.out / "table.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
