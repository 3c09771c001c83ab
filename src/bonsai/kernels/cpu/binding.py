"""ctypes binding of the compiled CPU kernel library (`_bitmm*.so`, built by setup.py).

ctypes over a plain C ABI: the library needs neither Python nor torch headers to build (fast,
and independent of the torch version installed), and ctypes releases the GIL during the call.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
import warnings
from pathlib import Path

import torch

ISAS = {"scalar": 0, "avx2": 1, "avxvnni": 5, "avx512": 2, "neon": 3, "amx": 4}
_ERRORS = {1: "the requested ISA path cannot run on this CPU", 2: "out of memory", 3: "invalid sizes"}
_warned = False


class Weight(ctypes.Structure):
    """The C struct BonsaiWeight (bitmm.cpp): pointers to one layer's contiguous tensors."""

    _fields_ = [
        ("signs", ctypes.c_void_p), ("n", ctypes.c_int64), ("k", ctypes.c_int64),
        ("row_scale", ctypes.c_void_p), ("group_size", ctypes.c_int64), ("group_scale", ctypes.c_void_p),
        ("col_scale", ctypes.c_void_p), ("row_offset", ctypes.c_void_p),
        ("rank", ctypes.c_int64), ("lowrank_v", ctypes.c_void_p), ("lowrank_ub", ctypes.c_void_p),
        ("lowrank_vb", ctypes.c_void_p),
    ]  # fmt: skip


class Fusion(ctypes.Structure):
    """The C struct Fusion (bitmm.h): a call's row-wise prologue and epilogue (null pointer: absent)."""

    _fields_ = [
        ("rows_per_sample", ctypes.c_int64),
        ("layer_norm", ctypes.c_int64), ("ln_eps", ctypes.c_float), ("ln_weight", ctypes.c_void_p),
        ("ln_bias", ctypes.c_void_p), ("shift", ctypes.c_void_p), ("scale", ctypes.c_void_p),
        ("gelu", ctypes.c_int64), ("norm_cols", ctypes.c_int64), ("norm_dim", ctypes.c_int64),
        ("norm_groups", ctypes.c_int64), ("norm_eps", ctypes.c_float), ("norm_weight", ctypes.c_void_p),
        ("residual", ctypes.c_void_p), ("gate", ctypes.c_void_p),
    ]  # fmt: skip


def library_path() -> Path | None:
    """The built library next to this file, or None when the package was installed without it."""
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"_bitmm{suffix}"
        if candidate.is_file():
            return candidate
    return None


def load_library(path: Path | None) -> ctypes.CDLL:
    """Open the library and declare its C signatures; raise ImportError when it is missing or broken."""
    if path is None or not path.is_file():
        raise ImportError("the compiled CPU kernel (bonsai/kernels/cpu/_bitmm) is not built")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        raise ImportError(f"cannot load the compiled CPU kernel {path}: {err}") from err
    ptr = ctypes.c_void_p
    lib.bonsai_bitmm.argtypes = [
        ctypes.c_int, ctypes.c_int, ctypes.POINTER(Weight), ptr, ctypes.c_int64, ptr, ptr, ctypes.POINTER(Fusion)
    ]  # fmt: skip
    lib.bonsai_bitmm.restype = ctypes.c_int
    lib.bonsai_bitmm_has_isa.argtypes = [ctypes.c_int]
    lib.bonsai_bitmm_has_isa.restype = ctypes.c_int
    lib.bonsai_bitmm_best_isa.restype = ctypes.c_int
    return lib


def warn_reference_path(reason: str, fix: str = "Reinstall with a C++ compiler available (pip install -e .) to build it.") -> None:
    """Say once per process that bitmatmul falls back to the slower reference path on CPU."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"{reason}; Bonsai runs 1-bit layers on the slower reference path on CPU. {fix}",
                      RuntimeWarning, stacklevel=3)


def available_isas(lib: ctypes.CDLL) -> list[str]:
    """ISA paths this CPU can run, scalar first."""
    return [name for name, code in ISAS.items() if lib.bonsai_bitmm_has_isa(code)]


@functools.cache
def _best_isa(lib: ctypes.CDLL) -> str:
    best = lib.bonsai_bitmm_best_isa()
    return next(k for k, v in ISAS.items() if v == best)


def chosen_isa(lib: ctypes.CDLL) -> str:
    """BONSAI_CPU_ISA (auto|scalar|avx2|avxvnni|avx512|neon|amx), or the fastest path this CPU runs."""
    name = os.environ.get("BONSAI_CPU_ISA", "auto").strip().lower() or "auto"
    if name == "auto":
        return _best_isa(lib)
    if name not in ISAS:
        raise ValueError(f"BONSAI_CPU_ISA={name!r}: expected auto or one of {', '.join(ISAS)}")
    if not lib.bonsai_bitmm_has_isa(ISAS[name]):
        raise RuntimeError(f"BONSAI_CPU_ISA={name}: this CPU runs only {', '.join(available_isas(lib))}")
    return name


def thread_count() -> int:
    """BONSAI_CPU_THREADS, else torch.get_num_threads()."""
    env = os.environ.get("BONSAI_CPU_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"BONSAI_CPU_THREADS={env!r}: expected a positive integer")
        return int(env)
    return torch.get_num_threads()


def pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def make_weight(
    signs: torch.Tensor,
    in_features: int,
    row_scale: torch.Tensor,
    group_size: int,
    group_scale: torch.Tensor | None,
    col_scale: torch.Tensor | None,
    row_offset: torch.Tensor | None,
    lowrank_v: torch.Tensor | None,
    lowrank_ub: torch.Tensor | None,
    lowrank_vb: torch.Tensor | None,
) -> Weight:
    """The C view of contiguous weight tensors (signs uint8 [N, ceil(K/8)], scales float32, group
    scales float16, the low-rank factor V [r, K] in float32 and V and U in bfloat16 tiles (bitmm.h,
    Problem::lowrank_vb and lowrank_ub)); the caller keeps them alive."""
    rank = 0 if lowrank_v is None else lowrank_v.shape[0]
    return Weight(
        pointer(signs), signs.shape[0], in_features, pointer(row_scale), group_size if group_scale is not None else 0,
        pointer(group_scale), pointer(col_scale), pointer(row_offset), rank, pointer(lowrank_v), pointer(lowrank_ub),
        pointer(lowrank_vb),
    )  # fmt: skip


def call_bitmm(
    lib: ctypes.CDLL,
    isa: str,
    threads: int,
    x: torch.Tensor,
    weight: Weight,
    bias: torch.Tensor | None,
    fusion: Fusion | None = None,
) -> torch.Tensor:
    """y [M, N] float32 = epilogue(prologue(x) @ W.T + bias) for x float32 [M, K] contiguous, bias
    float32 [N] contiguous or None, and the fused row operations (None: none); the caller keeps the
    fusion's tensors alive."""
    y = torch.empty(x.shape[0], weight.n, dtype=torch.float32)
    status = lib.bonsai_bitmm(
        ISAS[isa], threads, ctypes.byref(weight), x.data_ptr(), x.shape[0], pointer(bias), y.data_ptr(),
        None if fusion is None else ctypes.byref(fusion),
    )  # fmt: skip
    if status:
        raise RuntimeError(f"CPU bitmm kernel ({isa}) failed: {_ERRORS.get(status, f'status {status}')}")
    return y
