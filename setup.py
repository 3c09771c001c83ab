"""Build hook for the compiled CPU kernel (all package metadata lives in pyproject.toml).

The kernel is a plain C ABI shared library (loaded with ctypes by bonsai.kernels.cpu), so it needs no
Python or torch headers. It is optional: without a working C++ compiler the install still succeeds
and Bonsai uses its reference path on CPU (and says so once at run time).
"""

import os
import platform
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CPU_DIR = "src/bonsai/kernels/cpu"
OPENMP_PROBE = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
# The AMX path needs a compiler and assembler that know the tile instructions (GCC 11+, binutils 2.36+).
AMX_PROBE = (
    "#include <immintrin.h>\n"
    '__attribute__((target("amx-tile,amx-int8,avx512bf16,avx512vbmi"))) void f(void* p) { _tile_loadd(1, p, 64);\n'
    "  _tile_dpbsud(0, 1, 2); __m512i z = _mm512_setzero_si512(); _mm512_storeu_si512(p, _mm512_permutex2var_epi8(z, z, z));\n"
    "  _mm512_storeu_si512(p, (__m512i)_mm512_cvtne2ps_pbh(_mm512_setzero_ps(), _mm512_setzero_ps())); }\n"
    "int main() { return 0; }\n"
)
# Every Apple Silicon Mac has the dot product extension: built for it there, the NEON path uses sdot.
DOTPROD_PROBE = (
    "#include <arm_neon.h>\n"
    "int main() { int32x4_t a = vdupq_n_s32(1); int8x16_t b = vdupq_n_s8(2);\n"
    "  return vgetq_lane_s32(vdotq_s32(a, b, b), 0) == 17 ? 0 : 1; }\n"
)
# The AVX-VNNI path (vpdpbusd on 256 bits, VEX-encoded) needs GCC 11+ and binutils 2.36+ as well.
AVX_VNNI_PROBE = (
    "#include <immintrin.h>\n"
    '__attribute__((target("avx2,avxvnni"))) void f(__m256i* p) { p[0] = _mm256_dpbusd_avx_epi32(p[0], p[1], p[2]); }\n'
    "int main() { return 0; }\n"
)
SOURCES = [
    f"{CPU_DIR}/{name}.cpp" for name in ("bitmm", "bitmm_rows", "bitmm_x86", "bitmm_amx", "bitmm_neon")
]


class BuildCpuKernel(build_ext):
    def get_export_symbols(self, ext):
        return []  # not a Python module: no PyInit_ symbol to export

    def _compiles_with(self, flags: list[str], code: str = OPENMP_PROBE) -> bool:
        with tempfile.TemporaryDirectory() as tmp:
            source = os.path.join(tmp, "probe.cpp")
            with open(source, "w") as f:
                f.write(code)
            try:
                objects = self.compiler.compile([source], output_dir=tmp, extra_postargs=flags)
                self.compiler.link_executable(objects, "probe", output_dir=tmp, extra_postargs=flags)
            except Exception:
                return False
        return True

    def build_extensions(self):
        if self.compiler.compiler_type == "msvc":
            compile_args, link_args = ["/O2", "/std:c++17", "/openmp"], []
        else:
            compile_args = ["-O3", "-std=c++17", "-fvisibility=hidden", "-fno-math-errno"]
            openmp = ["-fopenmp"] if sys.platform != "darwin" else ["-Xpreprocessor", "-fopenmp", "-lomp"]
            if self._compiles_with(openmp):
                compile_args, link_args = compile_args + openmp, openmp
            else:
                self.warn("OpenMP not found: the CPU kernel is built single-threaded")
                link_args = []
            x86 = platform.machine().lower() in ("x86_64", "amd64")
            if x86 and not self._compiles_with([], AMX_PROBE):
                self.warn("the compiler does not know AMX instructions: the CPU kernel is built without its AMX path")
                compile_args.append("-DBONSAI_NO_AMX")
            if x86 and not self._compiles_with([], AVX_VNNI_PROBE):
                self.warn("the compiler does not know AVX-VNNI: the CPU kernel is built without its AVX-VNNI path")
                compile_args.append("-DBONSAI_NO_AVX_VNNI")
            apple_silicon = sys.platform == "darwin" and platform.machine().lower() == "arm64"
            if apple_silicon and self._compiles_with(["-mcpu=apple-m1"], DOTPROD_PROBE):
                compile_args.append("-mcpu=apple-m1")
        for ext in self.extensions:
            ext.extra_compile_args, ext.extra_link_args = compile_args, link_args
        super().build_extensions()


setup(
    ext_modules=[
        Extension(
            "bonsai.kernels.cpu._bitmm",
            sources=SOURCES,
            depends=[f"{CPU_DIR}/bitmm.h"],
            language="c++",
            optional=True,
        )
    ],
    cmdclass={"build_ext": BuildCpuKernel},
)
