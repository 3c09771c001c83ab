"""A 1-bit DiT of odd sizes for the fused-block tests (CPU kernel and Triton kernels alike): head dim
12, 3 heads, 5 x 3 patches, 7 text tokens; row offsets and a rank-4 residual on every 1-bit layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bonsai.models import DiT, DiTConfig, dit_fused
from bonsai.quant import BinarizeConfig, QuantPolicy, quantize_

CONFIG = DiTConfig(hidden_size=36, depth=2, num_heads=3, sample_size=16, patch_size=4, text_dim=24)


def one_bit_dit() -> DiT:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = DiT(CONFIG)
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.2)
                nn.init.normal_(module.bias, std=0.1)
        for block in model.blocks:  # norms with non-trivial weights, so that the tests see them
            for norm in (block.norm2, block.attn.q_norm, block.attn.k_norm, block.cross.q_norm, block.cross.k_norm):
                nn.init.uniform_(norm.weight, 0.5, 1.5)
            nn.init.normal_(block.norm2.bias, std=0.1)
    quantize_(model, QuantPolicy(binarize=BinarizeConfig(rank=4), min_params=256))
    return model.eval()


def fused_and_unfused(model: DiT, inputs: tuple, monkeypatch: pytest.MonkeyPatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's output with every block on its fused form (checked), then with dit.py's forward
    (dit_fused.applies stays off for the rest of the test)."""
    calls = []
    fused_forward = dit_fused.block_forward
    monkeypatch.setattr(dit_fused, "block_forward", lambda *a: calls.append(1) or fused_forward(*a))
    with torch.no_grad():
        fused = model(*inputs)
        assert len(calls) == model.config.depth
        monkeypatch.setattr(dit_fused, "applies", lambda block, x: False)
        unfused = model(*inputs)
    return fused, unfused


def dit_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(5)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    return torch.randn(2, 3, 20, 12, generator=g), torch.rand(2, generator=g), torch.randn(2, 7, 24, generator=g), mask
