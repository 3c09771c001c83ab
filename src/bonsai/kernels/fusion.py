"""Row-wise operations that a bitmatmul call may fuse around its product, and their reference.

    y = epilogue(prologue(x) @ W.T + bias)

- Prologue, per input row: LayerNorm over K (optional affine), then the adaLN modulation
  x * (1 + scale) + shift.
- Epilogue, per output row: tanh-GELU, then RMSNorm of each head of d columns among the first
  `norm_cols` (the q / k normalization of attention: those columns are G equal parts, q then k,
  and the heads of part g are weighted by norm_weight[g] of shape [d]), then residual + gate * y.

x is [B, T, K] (or [M, K] when nothing is per sample): shift, scale and gate are [B, K] / [B, N]
rows of sample b, applied to its T rows.

A kernel may fuse some of these PARTS (Kernel.fuses): the prologue, and of the epilogue, whose
parts run in the order gelu -> head_norm -> residual, a prefix of the parts a call has (a kernel
that cannot normalize heads still takes the GELU before them, but then not the residual after
them). `split` divides one call's row operations into the kernel's share and the rest, which the
dispatcher applies with `apply_prologue` / `apply_epilogue` around the kernel. The kernel's share
computes the same as those references, to within the kernel's own tolerance.
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


PROLOGUE = "prologue"
EPILOGUE_PARTS = ("gelu", "head_norm", "residual")  # the order the epilogue applies them in
PARTS = frozenset((PROLOGUE, *EPILOGUE_PARTS))


def epilogue_parts(epilogue: Epilogue) -> tuple[str, ...]:
    """The parts `epilogue` has, in the order they apply."""
    present = (epilogue.gelu, epilogue.norm_weight is not None, epilogue.residual is not None)
    return tuple(part for part, has in zip(EPILOGUE_PARTS, present) if has)


def _epilogue_of(epilogue: Epilogue, parts: tuple[str, ...]) -> Epilogue | None:
    """The sub-epilogue made of `parts` of `epilogue` (None when empty)."""
    if not parts:
        return None
    return Epilogue(
        gelu=epilogue.gelu and "gelu" in parts,
        **({"norm_weight": epilogue.norm_weight, "norm_cols": epilogue.norm_cols, "norm_eps": epilogue.norm_eps}
           if "head_norm" in parts else {}),
        **({"residual": epilogue.residual, "gate": epilogue.gate} if "residual" in parts else {}),
    )  # fmt: skip


@dataclass(frozen=True)
class Split:
    """One call's row operations divided between a kernel and the torch references around it:
    y = after(kernel(before(x), prologue, epilogue))."""

    before: Prologue | None  # applied to x by torch, before the kernel
    prologue: Prologue | None  # the kernel's
    epilogue: Epilogue | None  # the kernel's
    after: Epilogue | None  # applied to the kernel's output by torch


_NO_ROW_OPS = Split(None, None, None, None)


def split(prologue: Prologue | None, epilogue: Epilogue | None, fuses: frozenset[str]) -> Split:
    """Give a kernel that fuses `fuses` (a subset of PARTS) the largest share that keeps the order:
    the prologue if it fuses it, and the longest prefix of the epilogue's parts that it fuses
    (Kernel checks its `fuses` against PARTS when it is made)."""
    if prologue is None and epilogue is None:  # most calls: nothing to divide
        return _NO_ROW_OPS
    takes_prologue = prologue is not None and PROLOGUE in fuses
    before, kernel_prologue = (None, prologue) if takes_prologue else (prologue, None)
    if epilogue is None:
        return Split(before, kernel_prologue, None, None)
    parts = epilogue_parts(epilogue)
    taken = 0
    while taken < len(parts) and parts[taken] in fuses:
        taken += 1
    return Split(before, kernel_prologue, _epilogue_of(epilogue, parts[:taken]), _epilogue_of(epilogue, parts[taken:]))


def rows_per_sample(x: torch.Tensor, prologue: Prologue | None, epilogue: Epilogue | None) -> int:
    """T for x [B, T, K] when a per-sample row (shift, scale, gate) is given; else 1. Raises
    ValueError when x does not have the B samples those rows are for."""
    per_sample_rows = [t for t in (prologue and prologue.shift, epilogue and epilogue.gate) if t is not None]
    for t in per_sample_rows:
        if x.dim() != 3 or t.shape[0] != x.shape[0]:
            raise ValueError(
                f"bitmatmul: per-sample shift/scale/gate need x [B, T, K] with B rows each, x is {tuple(x.shape)}"
            )
    return x.shape[1] if per_sample_rows else 1


def per_sample(t: torch.Tensor) -> torch.Tensor:
    """[B, C] -> [B, 1, C], broadcasting over the T rows of each sample (as DiT's modulate does)."""
    return t[:, None]


def apply_prologue(x: torch.Tensor, prologue: Prologue) -> torch.Tensor:
    """The reference prologue on x [..., K]."""
    x = F.layer_norm(x, x.shape[-1:], prologue.weight, prologue.bias, prologue.eps)
    if prologue.shift is not None:
        x = x * (1 + per_sample(prologue.scale)) + per_sample(prologue.shift)
    return x


def apply_epilogue(y: torch.Tensor, epilogue: Epilogue, inplace: bool = False) -> torch.Tensor:
    """The reference epilogue on y [..., N]. inplace=True may overwrite y (for a kernel's fresh output:
    the head norms then write their columns back instead of copying all N columns into a new tensor)."""
    if epilogue.gelu:
        y = F.gelu(y, approximate="tanh")
    if epilogue.norm_weight is not None:
        c, (groups, d) = epilogue.norm_cols, epilogue.norm_weight.shape
        heads = y[..., :c].unflatten(-1, (groups, c // (groups * d), d))
        normed = F.rms_norm(heads, (d,), eps=epilogue.norm_eps) * epilogue.norm_weight[:, None].to(y.dtype)
        if inplace:
            y[..., :c] = normed.flatten(-3)
        else:
            y = torch.cat([normed.flatten(-3), y[..., c:]], dim=-1)
    if epilogue.residual is not None:
        y = epilogue.residual + (y if epilogue.gate is None else per_sample(epilogue.gate) * y)
    return y
