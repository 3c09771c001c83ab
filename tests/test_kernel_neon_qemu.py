"""The CPU kernel's NEON path (Apple Silicon, ARM servers) on an x86 machine: the kernel sources and
tests/native/neon_check.cpp cross-compiled for aarch64 and run under qemu, NEON against the scalar
path (which the other kernel tests check against float64). Skipped where the cross compiler or
qemu is missing (.ci/run installs them: g++-aarch64-linux-gnu, qemu-user)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "src/bonsai/kernels/cpu" / f"{name}.cpp" for name in ("bitmm", "bitmm_rows", "bitmm_x86", "bitmm_amx", "bitmm_neon")]
CXX, QEMU = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")

pytestmark = pytest.mark.skipif(not (CXX and QEMU), reason="needs aarch64-linux-gnu-g++ and qemu-aarch64")


# Baseline NEON (a generic AArch64 build) and the sdot kernel of a build for CPUs with the dot product
# extension (as setup.py builds on Apple Silicon Macs); qemu's "max" CPU runs both.
@pytest.mark.parametrize("march, built_for", [(None, "baseline NEON"), ("armv8.2-a+dotprod", "the dot product extension")])
def test_neon_path_matches_the_scalar_path(tmp_path: Path, march: str | None, built_for: str) -> None:
    exe = tmp_path / "neon_check"
    build = subprocess.run(
        [CXX, "-O2", "-std=c++17", "-fopenmp", "-fno-math-errno", "-static", *([f"-march={march}"] if march else []),
         *map(str, SOURCES), str(ROOT / "tests/native/neon_check.cpp"), "-o", str(exe)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([QEMU, "-cpu", "max", str(exe)], capture_output=True, text=True, timeout=600)
    first, *cases = run.stdout.splitlines()
    assert run.returncode == 0, run.stdout + run.stderr
    assert built_for in first, first
    assert len(cases) == 7 and all(line.endswith(" ok") for line in cases), run.stdout
