"""Row-wise operations that a bitmatmul call may fuse around its product, and their reference.

    y = epilogue(prologue(x) @ W.T + bias)

- Prologue, per input row: LayerNorm over K (optional affine), then the adaLN modulation
  x * (1 + scale) + shift.
- Epilogue, per output row: tanh-GELU, then RMSNorm of each head of d columns among the first
  `norm_cols` (the q / k normalization of attention: those columns are G equal parts, q then k,
  and the heads of part g are weighted by norm_weight[g] of shape [d]), then residual + gate * y.

x is [B, T, K] (or [M, K] when nothing is per sample): shift, scale and gate are [B, K] / [B, N]
rows of sample b, applied to its T rows. A kernel that fuses these (Kernel.fuses_rows) computes
the same as `apply_prologue` / `apply_epilogue` composed around its plain product, to within its
own tolerance; every other kernel gets exactly that composition from the dispatcher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Prologue:
    eps: float  # LayerNorm epsilon
    weight: torch.Tensor | None = None  # [K] LayerNorm affine (None: no affine)
    bias: torch.Tensor | None = None  # [K]
    shift: torch.Tensor | None = None  # [B, K] modulation, given together with scale
    scale: torch.Tensor | None = None  # [B, K]

    def __post_init__(self) -> None:
        if (self.shift is None) != (self.scale is None):
            raise ValueError("Prologue: shift and scale must be given together")


@dataclass(frozen=True)
class Epilogue:
    gelu: bool = False  # tanh approximation
    norm_weight: torch.Tensor | None = None  # [G, d]: RMSNorm weights of the heads of each part
    norm_cols: int = 0  # columns normalized: G parts of whole heads
    norm_eps: float = 1e-6
    residual: torch.Tensor | None = None  # [..., N], shaped like the output
    gate: torch.Tensor | None = None  # [B, N]: y = residual + gate * y

    def __post_init__(self) -> None:
        if self.norm_weight is not None:
            groups, d = self.norm_weight.shape
            if self.norm_cols < 1 or self.norm_cols % (groups * d):
                raise ValueError(f"Epilogue: {self.norm_cols} normalized columns are not {groups} parts of heads of {d}")
        if self.gate is not None and self.residual is None:
            raise ValueError("Epilogue: a gate needs a residual")


def per_sample(t: torch.Tensor) -> torch.Tensor:
    """[B, C] -> [B, 1, C], broadcasting over the T rows of each sample (as DiT's modulate does)."""
    return t[:, None]


def apply_prologue(x: torch.Tensor, prologue: Prologue) -> torch.Tensor:
    """The reference prologue on x [..., K]."""
    x = F.layer_norm(x, x.shape[-1:], prologue.weight, prologue.bias, prologue.eps)
    if prologue.shift is not None:
        x = x * (1 + per_sample(prologue.scale)) + per_sample(prologue.shift)
    return x


def apply_epilogue(y: torch.Tensor, epilogue: Epilogue) -> torch.Tensor:
    """The reference epilogue on y [..., N]."""
    if epilogue.gelu:
        y = F.gelu(y, approximate="tanh")
    if epilogue.norm_weight is not None:
        c, (groups, d) = epilogue.norm_cols, epilogue.norm_weight.shape
        heads = y[..., :c].unflatten(-1, (groups, c // (groups * d), d))
        normed = F.rms_norm(heads, (d,), eps=epilogue.norm_eps) * epilogue.norm_weight[:, None].to(y.dtype)
        y = torch.cat([normed.flatten(-3), y[..., c:]], dim=-1)
    if epilogue.residual is not None:
        y = epilogue.residual + (y if epilogue.gate is None else per_sample(epilogue.gate) * y)
    return y
