"""Binarization schemes: a float weight [N, K] -> signs + scales (+ optional low-rank residual).

Schemes (all combine with per-group scales along K and a low-rank residual):
- "xnor":   W ~ a_n * sign(W)                       (XNOR-Net: a_n = mean |W_n|)
- "mean":   W ~ a_n * sign(W - m_n) + m_n           (mean-centred; m_n = row mean)
- "onebit": W ~ sign(W) * (a b^T)                    (OneBit's sign-value-independent decomposition:
                                                     a b^T is the rank-1 approximation of |W|)
A residual R = W - W_bin can be kept as U V (rank r, from the SVD), stored in bfloat16.

The same math serves post-training binarization (`binarize`) and quantization-aware training
(`fake_quantize`, differentiable through a straight-through sign), so a trained layer converts
to its packed form with identical outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..kernels.packed import GROUP_SCALE_DTYPE, LOWRANK_DTYPE, PackedWeight
from ..kernels.packing import pack_signs

Scheme = Literal["xnor", "mean", "onebit"]
SCHEMES: tuple[str, ...] = ("xnor", "mean", "onebit")


@dataclass(frozen=True)
class BinarizeConfig:
    scheme: Scheme = "mean"
    group_size: int = 0  # 0: one scale per row; G > 0: one scale per G columns of a row
    rank: int = 0  # low-rank residual rank (0: none)

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown binarization scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)}")
        if self.group_size < 0 or self.rank < 0:
            raise ValueError("group_size and rank must be >= 0")
        if self.scheme == "onebit" and self.group_size:
            raise ValueError("the onebit scheme has per-column scales already; use group_size=0 with it")

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "group_size": self.group_size, "rank": self.rank}


class _SignSTE(torch.autograd.Function):
    """sign(x) in {-1, +1} forward; gradient passed straight through where |x| <= clip."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, clip)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, clip = ctx.saved_tensors
        return grad * (x.abs() <= clip).to(grad.dtype), None


def _round_ste(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round to `dtype` and back (the storage precision), identity gradient."""
    return t + (t.to(dtype).to(t.dtype) - t).detach()


def _rank1_abs(w: torch.Tensor, iters: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """a [N], b [K] >= 0 with a b^T ~ |W| (power iteration; |W| >= 0 so the top pair is non-negative)."""
    m = w.detach().abs().float()
    b = m.mean(0)
    for _ in range(iters):
        a = m @ b
        a = a / a.norm().clamp(min=1e-12)
        b = m.T @ a
    # b carries the singular value; split it evenly between the two factors
    s = b.norm().clamp(min=1e-12)
    return (a * s.sqrt()).clamp(min=1e-8), (b / s.sqrt()).clamp(min=1e-8)


@dataclass
class BinaryFactors:
    """The binarized weight before packing: W_bin = signs * row_scale * group_scale * col_scale + row_offset."""

    signs: torch.Tensor  # [N, K], +-1
    row_scale: torch.Tensor  # [N]
    group_scale: torch.Tensor | None  # [N, ceil(K/G)], values already rounded to float16
    col_scale: torch.Tensor | None  # [K]
    row_offset: torch.Tensor | None  # [N]

    def compose(self, group_size: int) -> torch.Tensor:
        k = self.signs.shape[1]
        w = self.signs * self.row_scale[:, None]
        if self.group_scale is not None:
            w = w * self.group_scale.repeat_interleave(group_size, dim=1)[:, :k]
        if self.col_scale is not None:
            w = w * self.col_scale[None, :]
        if self.row_offset is not None:
            w = w + self.row_offset[:, None]
        return w


def binary_factors(w: torch.Tensor, config: BinarizeConfig) -> BinaryFactors:
    """Signs and scales of `w` [N, K] (float32). Differentiable: sign through a straight-through
    estimator, scales through their means; used both for packing and for training."""
    n, k = w.shape
    if config.scheme == "onebit":
        a, b = _rank1_abs(w)
        clip = (a[:, None] * b[None, :]) * 3  # let gradients through where |W| is within range
        return BinaryFactors(_SignSTE.apply(w, clip), a, None, b, None)

    offset = w.mean(dim=1) if config.scheme == "mean" else None
    centred = w - offset[:, None] if offset is not None else w
    mag = centred.abs()
    if config.group_size:
        g = config.group_size
        pad = -k % g
        padded = torch.nn.functional.pad(mag, (0, pad)).reshape(n, -1, g)
        counts = torch.full((padded.shape[1],), float(g), device=w.device, dtype=w.dtype)
        counts[-1] = g - pad
        group_mean = padded.sum(-1) / counts  # [N, ceil(K/G)]
        row = group_mean.amax(dim=1).clamp(min=1e-8)
        group = _round_ste((group_mean / row[:, None]).clamp(min=1e-4), GROUP_SCALE_DTYPE)
        clip = (row[:, None] * group).repeat_interleave(g, dim=1)[:, :k] * 3
    else:
        row = mag.mean(dim=1).clamp(min=1e-8)
        group = None
        clip = row[:, None].expand(n, k) * 3
    return BinaryFactors(_SignSTE.apply(centred, clip), row, group, None, offset)


def lowrank_residual(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """U [N, r], V [r, K] with U V the best rank-r approximation of `residual` (SVD), float32."""
    if rank > min(residual.shape):
        # The stored factors must have the rank the layer's config (and the checkpoint) says.
        raise ValueError(f"low-rank residual rank {rank} exceeds min(N, K) = {min(residual.shape)} of a {tuple(residual.shape)} weight")
    u, s, vh = torch.linalg.svd(residual.float(), full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root[None, :], root[:, None] * vh[:rank]


ROW_BLOCK_WEIGHTS = 4 * 2**20  # weights binarized at once by row-separable configs (16 MiB in float32)


def row_separable(config: BinarizeConfig) -> bool:
    """Whether every row's signs and scales depend on that row alone (no column scales, no SVD)."""
    return config.scheme in ("xnor", "mean") and not config.rank


@torch.no_grad()
def binarize(weight: torch.Tensor, config: BinarizeConfig = BinarizeConfig(), block_weights: int = ROW_BLOCK_WEIGHTS) -> PackedWeight:
    """Post-training binarization of a float weight [N, K] (any float dtype) into a PackedWeight.

    Row-separable configs are computed `block_weights // K` rows at a time in float32, bit for bit
    the same as whole: the temporaries are a few blocks, not a few float32 copies of the layer
    (binarizing SD 1.5's largest conv whole took ~470 MiB more while streaming a checkpoint)."""
    if weight.dim() != 2:
        raise ValueError(f"binarize expects a 2-D weight [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    rows = max(64, block_weights // k)  # not a handful: torch may then split one row's sum across threads
    if not row_separable(config) or rows >= n:
        return _binarize_block(weight, config)
    parts = [_binarize_block(weight[i : i + rows], config) for i in range(0, n, rows)]
    fields = parts[0].tensors().keys()
    return PackedWeight(in_features=k, group_size=config.group_size, **{f: torch.cat([p.tensors()[f] for p in parts]) for f in fields})


def _binarize_block(weight: torch.Tensor, config: BinarizeConfig) -> PackedWeight:
    w = weight.detach().float()
    f = binary_factors(w, config)
    u = v = None
    if config.rank:
        u, v = lowrank_residual(w - f.compose(config.group_size), config.rank)
        u, v = u.to(LOWRANK_DTYPE), v.to(LOWRANK_DTYPE)
    return PackedWeight(
        signs=pack_signs(f.signs > 0),
        in_features=w.shape[1],
        row_scale=f.row_scale.float().contiguous(),
        group_size=config.group_size,
        group_scale=None if f.group_scale is None else f.group_scale.to(GROUP_SCALE_DTYPE).contiguous(),
        col_scale=None if f.col_scale is None else f.col_scale.float().contiguous(),
        row_offset=None if f.row_offset is None else f.row_offset.float().contiguous(),
        lowrank_u=u,
        lowrank_v=v,
    )


def fake_quantize(
    w: torch.Tensor, config: BinarizeConfig, lowrank: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """The weight a packed layer would use, computed differentiably from latent float weights
    (and trainable low-rank factors, rounded to their storage dtype)."""
    out = binary_factors(w, config).compose(config.group_size)
    if lowrank is not None:
        u, v = lowrank
        out = out + _round_ste(u, LOWRANK_DTYPE) @ _round_ste(v, LOWRANK_DTYPE)
    return out
