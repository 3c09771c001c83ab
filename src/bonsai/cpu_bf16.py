"""Whether the heavy float parts of a CPU run (large attentions, the latent decoder) may run in bfloat16.

They may where the processor computes bfloat16 itself (AMX-BF16 or AVX512-BF16): there torch runs
them 2.1-2.2x faster than in float32 (benchmarks/RESULTS.md, "CPU, 2026-12-05"), and their results
carry bfloat16 rounding, as they do on a GPU. Elsewhere bfloat16 is emulated and slower.
BONSAI_CPU_BF16=0 keeps float32 everywhere.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

_NATIVE_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def cpu_computes_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic and BONSAI_CPU_BF16 (auto or 0) allows its use."""
    choice = os.environ.get("BONSAI_CPU_BF16", "auto")
    if choice not in ("auto", "0"):
        raise ValueError(f"BONSAI_CPU_BF16 must be auto or 0, got {choice!r}")
    cpuinfo = Path("/proc/cpuinfo")
    if choice == "0" or not cpuinfo.exists():
        return False
    lines = cpuinfo.read_text().splitlines()
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return any(flag in flags for flag in _NATIVE_FLAGS)
