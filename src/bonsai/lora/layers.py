"""LoRA as a low-rank side branch next to a (1-bit or float) layer: y = base(x) + sum_i w_i s_i up_i(down_i(x)).

The base layer is never touched (a packed BitLinear stays packed; nothing is re-quantized), so
LoRAs can be stacked, re-weighted or removed at any time. Loaded factors are kept in bfloat16;
trainable ones in float32 (the optimizer needs the precision)."""

from __future__ import annotations

import fnmatch
import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.packed import LOWRANK_DTYPE, PackedWeight
from ..quant import BitConv2d, BitLinear
from .formats import LoRAError, LoRAFactors

_LINEAR = (nn.Linear, BitLinear)
_CONV = (nn.Conv2d, BitConv2d)


class LoRALayer(nn.Module):
    """Wraps `base` (nn.Linear, BitLinear, nn.Conv2d or BitConv2d) with named LoRA branches."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.downs = nn.ParameterDict()
        self.ups = nn.ParameterDict()
        self.scales: dict[str, float] = {}  # alpha / r
        self.weights: dict[str, float] = {}  # user weight (e.g. 0.8 from <lora:name:0.8>)
        # (the packed weight, the rest it was built from, the folded weight)
        self._folded: tuple[PackedWeight, tuple, PackedWeight] | None = None
        self._added = 0  # counts add() calls: a LoRA added again under its name refolds

    def add(self, name: str, factors: LoRAFactors, weight: float, dtype: torch.dtype, trainable: bool = False) -> None:
        down, up = fit_factors(self.base, factors, name)
        device = next(itertools.chain(self.base.parameters(), self.base.buffers())).device
        self.downs[name] = nn.Parameter(down.to(device=device, dtype=dtype), requires_grad=trainable)
        self.ups[name] = nn.Parameter(up.to(device=device, dtype=dtype), requires_grad=trainable)
        self.scales[name], self.weights[name] = factors.scale, weight
        self._added += 1

    def _branch_weights(self) -> dict[str, float]:
        """name -> weight * scale of the branches that add something (a LoRA at weight 0 is loaded, switched off)."""
        return {name: w for name in self.downs if (w := self.weights[name] * self.scales[name])}

    @property
    def active(self) -> bool:
        return bool(self._branch_weights())

    def folded(self) -> PackedWeight:
        """The base BitLinear's packed weight with the active branches folded into its low-rank term:
        U' = [U | w_i s_i up_i], V' = [V; down_i], so a kernel that applies the low-rank term inside its
        fused row operations runs the LoRA there too. Kept until the weights change."""
        packed = self.base.packed
        active = list(self._branch_weights().items())
        # Not ids: a freed tensor's id comes back for the next one. The packed weight itself, the adds (a LoRA
        # added again under its name) and the factors' versions (trained in place) say when to refold.
        versions = tuple(t._version for name, _ in active for t in (self.downs[name], self.ups[name]))
        key = (self._added, tuple(active), versions)
        if self._folded is None or self._folded[0] is not packed or self._folded[1] != key:
            us = [] if packed.lowrank_u is None else [packed.lowrank_u]
            vs = [] if packed.lowrank_v is None else [packed.lowrank_v]
            us += [(w * self.ups[name].float()).to(LOWRANK_DTYPE) for name, w in active]
            vs += [self.downs[name].to(LOWRANK_DTYPE) for name, _ in active]
            fields = {**packed.tensors(), "lowrank_u": torch.cat(us, 1), "lowrank_v": torch.cat(vs, 0)}
            folded = PackedWeight(in_features=packed.in_features, group_size=packed.group_size, **fields)
            self._folded = (packed, key, folded)
        return self._folded[2]

    def remove(self, name: str) -> None:
        del self.downs[name], self.ups[name], self.scales[name], self.weights[name]

    def __getstate__(self) -> dict:
        # The folded weight may hold kernel caches (C structs) that cannot be copied: a copy refolds.
        return {**super().__getstate__(), "_folded": None}

    def branch(self, x: torch.Tensor, name: str) -> torch.Tensor:
        down, up = self.downs[name].to(x.dtype), self.ups[name].to(x.dtype)
        if isinstance(self.base, _LINEAR):
            return F.linear(F.linear(x, down), up)
        b = self.base
        return F.conv2d(F.conv2d(x, down, None, b.stride, b.padding, b.dilation), up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for name, w in self._branch_weights().items():
            y = y + w * self.branch(x, name)
        return y


def fit_factors(base: nn.Module, f: LoRAFactors, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors in the layout the branch uses: Linear [r, K] / [N, r]; Conv [r, I, kh, kw] / [N, r, 1, 1]."""
    r = f.rank
    up = f.up.reshape(f.up.shape[0], r) if f.up.numel() == f.up.shape[0] * r else f.up  # else a mismatch below
    if isinstance(base, _LINEAR):
        n, k = base.out_features, base.in_features
        down = f.down.reshape(r, -1)
        want = ((r, k), (n, r))
    else:
        kh, kw = base.kernel_size
        n, i = base.out_channels, base.in_channels
        down = f.down.reshape(r, i, kh, kw) if f.down.numel() == r * i * kh * kw else f.down
        up = up.reshape(*up.shape, 1, 1) if up.ndim == 2 else up
        want = ((r, i, kh, kw), (n, r, 1, 1))
    if (tuple(down.shape), tuple(up.shape)) != want:
        raise LoRAError(
            f"LoRA '{name}': factors {tuple(f.down.shape)} / {tuple(f.up.shape)} do not fit a layer of "
            f"{type(base).__name__} shape (out {n}, in {want[0][1]}) — the LoRA is for a different model"
        )
    return down, up


def lora_targets(model: nn.Module) -> dict[str, nn.Module]:
    """Layers a LoRA can attach to, by the names LoRA files use (a wrapped layer keeps its name)."""
    out: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if isinstance(m, (LoRALayer, BitConv2d)):
            inside.append(name + ".")
        if isinstance(m, (LoRALayer, *_LINEAR, *_CONV)) and name:
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                continue
            out[name] = m
    return out


def wrap(model: nn.Module, name: str) -> LoRALayer:
    """The LoRALayer at `name`, wrapping the layer there first if needed."""
    module = model.get_submodule(name)
    if isinstance(module, LoRALayer):
        return module
    layer = LoRALayer(module)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)
    return layer


def add_trainable_lora(model: nn.Module, name: str, rank: int, patterns: tuple[str, ...], alpha: float | None = None) -> list[str]:
    """New LoRA `name` of `rank` on every linear layer matching a pattern: down ~ Kaiming-uniform,
    up = 0 (starts as the identity), float32, requires_grad. Everything else is frozen."""
    model.requires_grad_(False)
    names = [n for n, m in lora_targets(model).items() if isinstance(_base(m), _LINEAR) and any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not names:
        raise LoRAError(f"no linear layer matches {', '.join(patterns)}")
    for n in names:
        base = _base(model.get_submodule(n))
        down = torch.empty(rank, base.in_features)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        factors = LoRAFactors(down, torch.zeros(base.out_features, rank), float(alpha or rank))
        wrap(model, n).add(name, factors, 1.0, torch.float32, trainable=True)
    return names


def _base(m: nn.Module) -> nn.Module:
    return m.base if isinstance(m, LoRALayer) else m
