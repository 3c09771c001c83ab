"""Settle MKL VML's kernel choice before torch uses it from several threads at once.

ATen hands contiguous float32/float64 unary ops on CPU (sin, exp, sqrt, ...) to oneMKL's VML, one
call per intra-op thread on its chunk. oneMKL picks each VML function's kernel on that function's
first call; when the first call runs on several threads at once, one thread can run a low-accuracy
kernel for its whole chunk (pytorch/pytorch#188792, oneMKL 2024.2). For Bonsai that was the
position embedding's sin, ~1e-4 off in half its rows in about one fresh process in 10-50 on a
busy machine, and so an image that differs from the one the same seed gives in another run. One
one-element call of each function, which runs on the calling thread alone, settles the choice."""

from __future__ import annotations

import functools

import torch

# The unary ops ATen routes to VML (ATen/cpu/vml.h, IMPLEMENT_VML_MKL), per float dtype.
VML_OPS = ("acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp", "log", "log10", "sin", "sqrt", "tan",
           "tanh", "trunc")


@functools.cache
def settle_vml() -> None:
    """Call each VML op once, single-threaded (a no-op without MKL); once per process."""
    if not torch.backends.mkl.is_available():
        return
    for dtype in (torch.float32, torch.float64):
        x = torch.full((1,), 0.5, dtype=dtype)
        for op in VML_OPS:
            getattr(torch, op)(x)
