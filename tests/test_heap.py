"""bonsai.heap: large freed blocks stay in glibc's heap for reuse instead of going back to the kernel."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc")

SRC = str(Path(__file__).resolve().parents[1] / "src")
# Page faults of the second 64 MiB malloc + memset after one was freed: with the blocks kept, none.
PROBE = """
import ctypes, resource
from bonsai.heap import keep_large_blocks
print(keep_large_blocks())
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20
for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    libc.memset(block, 1, size)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(block)
print(faults)
"""


def probe(**env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "BONSAI_MALLOC"))}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, "PYTHONPATH": SRC, **env}, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    return out[0], int(out[1])


def test_a_freed_large_block_is_reused_without_new_pages() -> None:
    tuned, faults = probe()
    assert tuned == "True" and faults < 100
    untouched, faults = probe(BONSAI_MALLOC_TUNING="0")
    assert untouched == "False" and faults >= 16000  # 64 MiB of fresh 4 KiB pages


def test_thresholds_the_user_set_are_left_alone() -> None:
    assert probe(MALLOC_TRIM_THRESHOLD_="1000000")[0] == "False"
    assert probe(GLIBC_TUNABLES="glibc.malloc.mmap_threshold=1000000")[0] == "False"
