"""Batch-invariant evaluation: image i of a batch must be the image of seed + i generated alone."""

from __future__ import annotations

from typing import Callable

import torch


def per_sample(fn: Callable[..., torch.Tensor], *xs: torch.Tensor) -> torch.Tensor:
    """fn applied to each sample (along the first dim) of xs alone, concatenated.

    A BLAS picks its kernel, and with it the order of the sums, by the number of rows, so a batched
    product can differ from the one-sample product in the last bit; the 1-bit layers' rounding of
    activations to int8 then grows that into visible pixel differences. Layers computed row by row
    (the compiled CPU kernel, norms, attention per sample) need no such care."""
    return torch.cat([fn(*(x[i : i + 1] for x in xs)) for i in range(xs[0].shape[0])])
