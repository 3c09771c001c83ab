"""Fresh processes' first torch.sin, with and without bonsai.vml.settle_vml, on a busy CPU.

    python scripts/vml_first_call.py [--processes 100]

Each child computes the sin of bonsai-emoji's position-embedding arguments (256 x 80 float32, which
torch splits over its intra-op threads) as its first VML call, optionally after settle_vml, and
prints its largest error against float64. Children run two at a time next to a busy-loop process,
as a loaded machine runs them. A child above 1e-6 ran a low-accuracy MKL kernel on one thread's
chunk (pytorch/pytorch#188792); settle_vml should leave none.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

CHILD = """
import sys, torch
if sys.argv[1] == "settled":
    from bonsai.vml import settle_vml
    settle_vml()
from bonsai.models.dit import sincos_pos_embed  # noqa: F401  (imports as the pipeline does)
grid = torch.arange(16, dtype=torch.float32)
omega = 1.0 / 10000 ** (torch.arange(80, dtype=torch.float32) / 80)
args = grid.repeat_interleave(16)[:, None] * omega[None]
print((args.sin().double() - args.double().sin()).abs().max().item())
"""


def storm(mode: str, processes: int, env: dict) -> list[float]:
    errors = []
    for _ in range(processes // 2):
        pair = [subprocess.Popen([sys.executable, "-c", CHILD, mode], stdout=subprocess.PIPE, text=True, env=env)
                for _ in range(2)]
        errors += [float(p.communicate()[0]) for p in pair]
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=100, help="fresh processes per mode")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for mode in ("cold", "settled"):
            errors = storm(mode, args.processes, env)
            bad = [e for e in errors if e > 1e-6]
            worst = f", worst {max(bad):.2e}" if bad else ""
            print(f"{mode:8s} {len(bad)} of {len(errors)} processes computed sin with a low-accuracy kernel{worst}")
    finally:
        busy.kill()


if __name__ == "__main__":
    main()
